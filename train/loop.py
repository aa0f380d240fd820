"""The Accelerate loop: fine-tune the UNet of Stable Diffusion with the magnitude filter in every step.

Counting, when samples are dropped:
- A *step* is one optimizer update slot: `gradient_accumulation_steps` micro-batches on every rank.
  The gradient is the mean of the per-sample losses over the samples kept in the whole step (all
  ranks, all micro-batches); each rank backpropagates the sum of its kept losses and the loop divides
  the accumulated gradient by the global kept count before clipping.
- A step in which every sample is dropped still counts: global_step, the data position and the lr
  schedule advance (the schedule is a function of data consumed, not of updates made), but the
  optimizer and EMA are not stepped and the step is counted in `skipped_steps`. Every rank still runs
  its backward, so DDP's all-reduce never waits on a missing rank. A step whose (all-reduced) gradient
  norm is inf or NaN is not applied either, and counted in `nonfinite_steps`. (DeepSpeed steps inside
  backward: there the loss is prescaled by the global kept count instead, see train.backends.)
- Epochs are passes over the data: `max_train_steps` defaults to num_train_epochs x (batches per
  epoch / gradient_accumulation_steps), whatever the filter drops.

Determinism: the noise, timesteps, VAE sampling and caption dropout of micro-batch k of step s on
rank r come from a generator seeded by (seed, r, s, k), and the data order from accelerate's
seedable sampler; a checkpoint stores the data position, the policy state and the EMA, so a resumed
run takes the same decisions and reaches the same weights as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from memfilter.filtering.conditioning import where
from memfilter.filtering.policies import FilterPolicy, item_groups
from memfilter.filtering.protect import Protect
from memfilter.filtering.records import RecordWriter
from memfilter.filtering.settings import check_settings, int_at_least, is_int, num_in, setting
from memfilter.train.backends import check_backend, configure_deepspeed, deepspeed_autocast_dtype, is_deepspeed
from memfilter.train.checkpoint import (find_checkpoint, is_sharded, load_checkpoint, register_diffusers_format,
                                       save_checkpoint)
from memfilter.train.data.collate import CollateForTraining
from memfilter.train.data.report import DataReport, merge_reports, write_report
from memfilter.train.data.transforms import ImageTransform
from memfilter.train.data.feed import data_stream, make_feed
from memfilter.train.export import full_unet, export_pipeline, save_images, validation_images, write_model_card
from memfilter.train.families import get_family
from memfilter.train.mitigation import Mitigation
from memfilter.train.models import Components, add_lora
from memfilter.train.noise import NoiseArgs, check_noise
from memfilter.train.step import StepStats, filtered_diffusion_step
from memfilter.train.tracking import NullTracker

log = logging.getLogger("memfilter.train")

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def _opt(check):
    return lambda v: v is None or check(v)


@dataclass
class TrainArgs(NoiseArgs):
    """Loop settings; names and defaults follow diffusers' train_text_to_image.py, but center_crop (true here)
    and log_magnitudes (memfilter's); the noise and timestep recipes are NoiseArgs' (train.noise). The toy
    world's recipe in conf/train.yaml overrides some. Each field holds its default, its check and its doc
    (filtering.settings); a bad value raises a ValueError naming the key."""

    output_dir: str = setting("???", "a directory path", lambda v: isinstance(v, str) and v != "",
                              "the run directory")
    resolution: int | None = setting(512, "null (the model's size) or a multiple of 8, e.g. resolution=512",
                                     _opt(lambda v: is_int(v) and v >= 8 and v % 8 == 0), "training size in pixels")
    center_crop: bool = setting(True, "true or false", lambda v: isinstance(v, bool), "centre (true) or random crop")
    random_flip: bool = setting(False, "true or false", lambda v: isinstance(v, bool), "random horizontal flip")
    interpolation: str = setting("bicubic", "bicubic, lanczos or bilinear",
                                 lambda v: v in ("bicubic", "lanczos", "bilinear"), "resize filter")
    train_batch_size: int = setting(16, "an integer >= 1, e.g. train_batch_size=8", int_at_least(1),
                                    "samples per process per micro-batch")
    num_train_epochs: int = setting(100, "an integer >= 1", int_at_least(1),
                                    "passes over the data when max_train_steps is null")
    max_train_steps: int | None = setting(None, "null or an integer >= 1", _opt(int_at_least(1)),
                                          "optimizer steps; overrides num_train_epochs")
    max_train_samples: int | None = setting(None, "null or an integer >= 1", _opt(int_at_least(1)),
                                            "train on this many samples of a map-style source, drawn with the seed")
    gradient_accumulation_steps: int = setting(1, "an integer >= 1", int_at_least(1), "micro-batches per step")
    allow_tf32: bool = setting(False, "true or false", lambda v: isinstance(v, bool),
                               "TF32 matmuls and convolutions on Ampere and newer GPUs (faster, fp32 training)")
    gradient_checkpointing: bool = setting(False, "true or false", lambda v: isinstance(v, bool),
                                           "recompute UNet activations in backward")
    max_grad_norm: float = setting(1.0, "a number >= 0 (0 disables clipping)", num_in(0, math.inf),
                                   "gradient clipping norm")
    seed: int = setting(0, "an integer", is_int, "data order, noise (each rank derives its own)")
    snr_gamma: float | None = setting(None, "null or a number > 0, e.g. snr_gamma=5.0",
                                      _opt(num_in(0, math.inf, lo_open=True)), "Min-SNR weighting gamma")
    proportion_empty_prompts: float = setting(0.0, "a number in [0, 1)", num_in(0, 1, hi_open=True),
                                              "caption dropout for classifier-free guidance")
    use_ema: bool = setting(False, "true or false", lambda v: isinstance(v, bool),
                            "keep an EMA of the UNet, exported instead of the raw weights")
    ema_decay: float = setting(0.9999, "a number in (0, 1), e.g. ema_decay=0.9999",
                               num_in(0, 1, lo_open=True, hi_open=True), "EMA decay")
    foreach_ema: bool = setting(False, "true or false", lambda v: isinstance(v, bool),
                                "update the EMA with torch's foreach ops (faster, a little more memory)")
    offload_ema: bool = setting(False, "true or false", lambda v: isinstance(v, bool),
                                "keep the EMA on the CPU between steps, moved to the device for its update")
    lora_rank: int = setting(0, "an integer >= 0 (0: full fine-tuning)", int_at_least(0),
                             "train LoRA adapters of this rank instead of the full UNet (model.lora.rank)")
    checkpointing_steps: int = setting(500, "an integer >= 0 (0: no checkpoints)", int_at_least(0),
                                       "save checkpoint-<step> every this many steps")
    checkpoints_total_limit: int | None = setting(None, "null or an integer >= 1", _opt(int_at_least(1)),
                                                  "keep at most this many checkpoints")
    resume_from_checkpoint: str | None = setting(None, "null, latest or a checkpoint path",
                                                 _opt(lambda v: isinstance(v, str)), "null starts fresh")
    validation_prompts: list = setting(must="a list of prompts", check=lambda v: isinstance(v, (list, tuple)),
                                       doc="prompts sampled every validation_steps and at the end", factory=list)
    validation_steps: int = setting(0, "an integer >= 0 (0: only at the end)", int_at_least(0))
    validation_epochs: int = setting(0, "an integer >= 0 (0: not by epochs)", int_at_least(0),
                                     "also validate after every n-th epoch (diffusers' --validation_epochs)")
    num_validation_images: int = setting(1, "an integer >= 1", int_at_least(1), "images per validation prompt")
    validation_inference_steps: int = setting(20, "an integer >= 1", int_at_least(1), "sampling steps")
    logging_steps: int = setting(10, "an integer >= 1", int_at_least(1), "log scalars and histograms every n steps")
    dataloader_num_workers: int = setting(0, "an integer >= 0", int_at_least(0), "DataLoader workers per process")
    records_flush_every: int = setting(65536, "an integer >= 1", int_at_least(1),
                                       "rows a process buffers before writing a Parquet part")
    log_magnitudes: bool = setting(True, "true or false", lambda v: isinstance(v, bool),
                                   "with filter=none, still measure m (one extra no-grad forward a step)")
    dropped_samples: str = setting("anchor", "anchor or drop", lambda v: v in ("drop", "anchor"),
                                   "what a sample the filter drops does: train toward the base model's prediction "
                                   "for it (anchor: keeps what its caption names, never its image; a frozen copy "
                                   "of the UNet in weight_dtype unless LoRA), or leave the loss (drop: Wen et al.)")
    anchor_weight: float = setting(1.0, "a number > 0", num_in(0, math.inf, lo_open=True),
                                   "weight of an anchored sample's loss (dropped_samples=anchor)")

    def __post_init__(self):
        check_settings(self)
        super().__post_init__()


@dataclass
class OptimArgs:
    """AdamW and the lr schedule (diffusers' names and defaults; a field holds its default, check and doc)."""

    learning_rate: float = setting(1e-4, "a number > 0, e.g. optim.learning_rate=1e-5",
                                   num_in(0, math.inf, lo_open=True), "peak learning rate")
    scale_lr: bool = setting(False, "true or false", lambda v: isinstance(v, bool),
                             "multiply lr by accumulation x batch size x processes")
    lr_scheduler: str = setting("constant", f"one of {', '.join(LR_SCHEDULERS)}", lambda v: v in LR_SCHEDULERS,
                                "a diffusers schedule name")
    lr_warmup_steps: int = setting(500, "an integer >= 0", int_at_least(0), "warm-up steps")
    lr_num_cycles: int = setting(1, "an integer >= 1", int_at_least(1), "cycles of cosine_with_restarts")
    lr_power: float = setting(1.0, "a number > 0", num_in(0, math.inf, lo_open=True), "power of polynomial")
    adam_beta1: float = setting(0.9, "a number in [0, 1)", num_in(0, 1, hi_open=True))
    adam_beta2: float = setting(0.999, "a number in [0, 1)", num_in(0, 1, hi_open=True))
    adam_weight_decay: float = setting(1e-2, "a number >= 0", num_in(0, math.inf))
    adam_epsilon: float = setting(1e-8, "a number > 0", num_in(0, math.inf, lo_open=True))
    use_8bit_adam: bool = setting(False, "true or false", lambda v: isinstance(v, bool),
                                  "bitsandbytes' 8-bit AdamW (pip install 'memfilter[8bit]')")

    def __post_init__(self):
        check_settings(self, "optim.")


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint (memfilter_state.json)."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0       # micro-batches of `epoch` this rank has consumed
    skipped_steps: int = 0          # steps whose every sample was dropped (no optimizer step)
    nonfinite_steps: int = 0        # steps whose gradient norm was inf or NaN (no optimizer or EMA step)
    samples_seen: int = 0           # global, all ranks
    samples_kept: int = 0
    samples_anchored: int = 0       # dropped samples trained toward the base (dropped_samples=anchor)
    dup_seen: int = 0
    dup_kept: int = 0
    positions: dict = field(default_factory=dict)   # streaming: logical worker -> stream position

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def step_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """A seed for (seed, rank, step, micro-batch): independent streams, reproducible on resume."""
    return int(hashlib.sha256(f"{seed}/{rank}/{step}/{micro}".encode()).hexdigest()[:15], 16)


class _Window:
    """Step statistics gathered between two log lines (main process only)."""

    def __init__(self):
        self.parts: list[StepStats] = []

    def add(self, stats: StepStats):
        self.parts.append(stats)

    def pop(self) -> StepStats | None:
        out = StepStats.cat(self.parts) if self.parts else None
        self.parts = []
        return out


class _RankStates:
    """What differs between ranks (data report, streaming positions), gathered for a checkpoint;
    on resume each rank takes back its own entry."""

    def __init__(self, accelerator, report: DataReport, state: "TrainState"):
        self.accelerator, self.report, self.state, self.gathered = accelerator, report, state, []

    def gather(self) -> list[dict]:
        from accelerate.utils import gather_object
        self.gathered = gather_object([{"report": self.report.state_dict(), "positions": dict(self.state.positions)}])
        return self.gathered

    def state_dict(self) -> dict:
        return {"ranks": self.gathered}

    def load_state_dict(self, state: dict) -> None:
        mine = state["ranks"][self.accelerator.process_index]
        self.report.load_state_dict(mine["report"])
        self.state.positions = dict(mine["positions"])


def train(accelerator, components: Components, dataset, policy: FilterPolicy, args: TrainArgs,
          optim: OptimArgs = OptimArgs(), tracker=None, config: dict | None = None,
          protect: Protect | None = None, mitigation: Mitigation | None = None) -> dict:
    """Fine-tune `components.unet` on `dataset` with `policy` filtering every step.

    Args:
        accelerator: an Accelerator created with gradient_accumulation_steps=1 (the loop accumulates
            itself, to normalise by the kept count) and a seedable sampler
            (DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed)).
        components: the model's parts; their family (train.families) encodes, denoises and exports.
        dataset: a map-style dataset of Samples (key, image, caption, meta) or a streaming source with its own
            feed (train.data.feed).
        policy: the filter policy (decides on gathered magnitudes; saved in checkpoints).
        args: loop settings. optim: optimizer and schedule settings.
        tracker: WandbTracker on the main process, NullTracker (default) elsewhere.
        config: the resolved config, copied into checkpoints and the run directory.
        protect: samples the policy never judges (intended memorization); default none.
        mitigation: a training-time baseline perturbing captions or text embeddings (train.mitigation); default none.
    Returns:
        The run summary (also written to <output_dir>/train_summary.json).
    """
    t0 = time.time()
    run = _Run(accelerator, components, policy, args, tracker or NullTracker(), config, protect, mitigation)
    run.build_model()
    run.build_optimizer(optim)
    run.build_data(dataset, optim)
    run.resume()
    stream = data_stream(run.feed, run.state)
    bar = tqdm(total=run.max_steps, initial=run.state.global_step, desc="train",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    while run.state.global_step < run.max_steps:
        kept_total = sum(run.micro_step(stream, micro) for micro in range(args.gradient_accumulation_steps))
        run.update(kept_total)
        bar.update(1)
        run.after_step(bar)
    bar.close()
    return run.finish(t0)


class _Run:
    """The parts of one training run, in the order `train` calls them: build the model, the optimizer and the
    data, resume, then per step `micro_step` x accumulation, `update`, `after_step`; `finish` exports."""

    def __init__(self, accelerator, components: Components, policy: FilterPolicy, args: TrainArgs, tracker,
                 config: dict | None, protect: Protect | None, mitigation: Mitigation | None = None):
        check_backend(accelerator, args)
        if accelerator.gradient_accumulation_steps != 1:
            raise ValueError("create the Accelerator with gradient_accumulation_steps=1: the loop accumulates itself")
        self.accelerator, self.c, self.policy, self.args = accelerator, components, policy, args
        self.tracker, self.config, self.protect = tracker, config, protect
        self.mitigation = mitigation if mitigation is not None and mitigation.active else None
        self.family = get_family(components)
        self.run_dir = Path(args.output_dir)
        self.dev, self.rank, self.world = accelerator.device, accelerator.process_index, accelerator.num_processes
        low = deepspeed_autocast_dtype(accelerator)        # DeepSpeed's torch_autocast, else accelerate's
        self.weight_dtype = low or {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision,
                                                                                        torch.float32)
        self.autocast = (lambda: torch.autocast(self.dev.type, dtype=low)) if low else accelerator.autocast
        self.state, self.data_report, self.window = TrainState(), DataReport(), _Window()
        self.epochs_done = 0            # the last epoch whose final micro-batch was consumed (validation_epochs)
        # m is measured for a policy that reads it, and for a plain fine-tune's records when log_magnitudes
        self.compute_m = policy.needs_magnitude or (policy.name == "none" and args.log_magnitudes)

    def build_model(self) -> None:
        """Frozen parts in weight_dtype; the UNet (or its LoRA adapters) trains in fp32; EMA; the export copy."""
        args, c, dev = self.args, self.c, self.dev
        check_noise(args, c.noise_scheduler)
        if args.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        # the exported pipeline gets the frozen modules in full precision, not their training-time casts (with
        # LoRA the UNet's base weights too: the adapters are fused into this copy)
        low = self.weight_dtype != torch.float32
        frozen_unet = copy.deepcopy(c.unet) if args.lora_rank and low else c.unet
        self.export_c = self.family.frozen_copy(frozen_unet) if low else c
        self.family.prepare_frozen(dev, self.weight_dtype)
        unet = c.unet
        # dropped_samples=anchor: the model before fine-tuning, frozen (LoRA: the same UNet, adapters disabled)
        self.anchor = args.dropped_samples == "anchor" and self.policy.name != "none"   # none drops nothing
        # the same frozen copy is the null of a policy that compares with the base (filter.null=base)
        self.uses_reference = self.anchor or self.policy.uses_base
        self.reference_unet = (copy.deepcopy(unet).requires_grad_(False).eval().to(dev, dtype=self.weight_dtype)
                               if self.uses_reference and not args.lora_rank else None)
        if args.lora_rank:
            with torch.random.fork_rng(devices=[]):      # the same adapters for every run with this seed
                torch.manual_seed(args.seed)
                add_lora(unet, args.lora_rank)
            unet.to(dev, dtype=self.weight_dtype)
            for p in unet.parameters():          # trainable adapters stay in fp32 (diffusers' recipe)
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            unet.train().requires_grad_(True).to(dev)
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.ema = None
        if args.use_ema:
            if args.lora_rank:
                raise ValueError("use_ema=true with model.lora.rank>0 is not supported: EMA the full UNet, "
                                 "or drop EMA")
            start = c.ema_start if c.ema_start is not None else unet   # diffusers' non_ema_revision
            self.ema = EMAModel([p.detach().clone() for p in start.parameters()], decay=args.ema_decay,
                                model_cls=type(unet), model_config=unet.config, foreach=args.foreach_ema)
            self._place_ema()
        c.ema_start = None
        self.unet = unet

    def _place_ema(self) -> None:
        """The EMA on the training device, or on the CPU (pinned on CUDA) with offload_ema."""
        if not self.args.offload_ema:
            self.ema.to(self.dev)
            return
        self.ema.to("cpu")
        if self.dev.type == "cuda":
            self.ema.pin_memory()

    def build_optimizer(self, optim: OptimArgs) -> None:
        args = self.args
        lr = optim.learning_rate
        if optim.scale_lr:
            lr *= args.gradient_accumulation_steps * args.train_batch_size * self.world
        params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = adamw_class(optim.use_8bit_adam)(params, lr=lr, betas=(optim.adam_beta1, optim.adam_beta2),
                                           weight_decay=optim.adam_weight_decay, eps=optim.adam_epsilon)
        self.deepspeed = is_deepspeed(self.accelerator)    # its backward steps: the loss is prescaled (backends)
        if self.deepspeed:
            configure_deepspeed(self.accelerator, args)
        self.unet, self.optimizer = self.accelerator.prepare(self.unet, self.optimizer)
        register_diffusers_format(self.accelerator, self.family, self.ema, lora=bool(args.lora_rank))
        self.raw_unet = self.accelerator.unwrap_model(self.unet)
        self.params = [p for p in self.unet.parameters() if p.requires_grad]   # as prepared (wrappers may replace)
        self.sharded = is_sharded(self.raw_unet)   # FSDP2: every forward needs every rank, the export a gather

    def reference(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The base model's prediction (no grad), the target of an anchored sample."""
        with torch.no_grad(), self.autocast():
            if self.reference_unet is not None:
                return self.reference_unet(x_t, t, **cond).sample
            self.raw_unet.disable_adapters()         # LoRA: the base is the same UNet without its adapters
            try:
                return self.raw_unet(x_t, t, **cond).sample
            finally:
                self.raw_unet.enable_adapters()

    def build_data(self, dataset, optim: OptimArgs) -> None:
        """The feed (train.data.feed), the run length and the lr schedule (a function of data consumed)."""
        args = self.args
        self.excluded = int(getattr(dataset, "excluded", 0))       # left out by data.keep_list
        self.tokenize = self.family.tokenize_fn()
        collate = CollateForTraining(self.tokenize, ImageTransform(args.resolution, args.interpolation,
                                                                   args.center_crop, args.random_flip, args.seed))
        self.feed = make_feed(self.accelerator, dataset, collate, batch_size=args.train_batch_size,
                              num_workers=args.dataloader_num_workers, max_samples=args.max_train_samples,
                              seed=args.seed)
        self.batches_per_epoch = self.feed.batches_per_epoch(0)
        if self.batches_per_epoch == 0:
            raise ValueError(f"data: {len(dataset)} samples give no full batch of train_batch_size="
                             f"{args.train_batch_size} on {self.world} processes; lower train_batch_size or add data")
        self.max_steps = args.max_train_steps or max(1, args.num_train_epochs * self.batches_per_epoch
                                                     // args.gradient_accumulation_steps)
        # The schedule is stepped once per global step by us (not by accelerate, which would step it
        # once per process), so warm-up and length are in optimizer steps whatever the process count.
        self.lr_scheduler = get_scheduler(optim.lr_scheduler, optimizer=self.optimizer,
                                          num_warmup_steps=optim.lr_warmup_steps, num_training_steps=self.max_steps,
                                          num_cycles=optim.lr_num_cycles, power=optim.lr_power)
        self.empty = self.family.empty_text(self.dev)   # unconditional text, batch 1: caption dropout and m

    def resume(self) -> None:
        """Restore the latest (or named) checkpoint; records past its step belong to an attempt that died."""
        args, state = self.args, self.state
        self.rank_states = _RankStates(self.accelerator, self.data_report, state)
        # order matters: the per-rank entry is loaded after train_state and overrides its positions
        self.stateful = {"train_state": state, "lr_scheduler": self.lr_scheduler, "policy": self.policy,
                         "rank_states": self.rank_states}
        self.records = RecordWriter(self.run_dir / "records", self.rank, flush_every=args.records_flush_every)
        path = find_checkpoint(self.run_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
        if args.resume_from_checkpoint and path is None:
            self.accelerator.print(f"resume_from_checkpoint=latest: no checkpoint in {self.run_dir}, starting a new run")
        if path is not None:
            meta = load_checkpoint(self.accelerator, path, self.stateful)
            if (meta["world_size"], meta["train_batch_size"]) != (self.world, args.train_batch_size):
                raise ValueError(f"{path} was written by {meta['world_size']} processes x train_batch_size="
                                 f"{meta['train_batch_size']}; resume with the same values to continue the same "
                                 "data order")
            self.feed.check_resume((meta.get("config") or {}).get("dataloader_num_workers",
                                                                  args.dataloader_num_workers))
            if self.ema is not None:
                self._place_ema()
            self.accelerator.print(f"resumed from {path} at step {state.global_step} "
                                   f"(epoch {state.epoch}, batch {state.batches_in_epoch})")
        dropped = self.records.truncate_after(state.global_step)
        if dropped:
            self.accelerator.print(f"removed {dropped} records written after step {state.global_step} "
                                   "by an earlier attempt")

    def _condition(self, batch: dict, gen: torch.Generator, b: int):
        """Latents, conditioning and the judged mask of a micro-batch, through the family (no grad)."""
        dev, args, family = self.dev, self.args, self.family
        pixels = batch["pixel_values"].to(dev)          # uint8; the family makes the VAE's range and dtype
        latents = family.encode_images(pixels, gen)                         # [n, C, h, w] float32
        n = latents.shape[0]
        dropped = torch.rand(n, generator=gen, device=dev) < args.proportion_empty_prompts
        judged = ~dropped
        if self.protect and b:         # intended memorization: kept, and out of the policy's statistics
            judged[:b] &= ~self.protect.mask(batch["keys"], batch["captions"]).to(dev)
        text = where(dropped, self.empty, self._text(batch, b))
        sizes = {"resolution": args.resolution, "original_sizes": batch["original_sizes"],
                 "crop_top_lefts": batch["crop_top_lefts"]}
        return pixels, latents, family.unet_kwargs(text, **sizes), family.uncond_like(self.empty, n, **sizes), judged

    def _text(self, batch: dict, b: int) -> dict:
        """The micro-batch's text conditioning, after the training-time baseline when there is one."""
        tokens, mit, step = batch, self.mitigation, self.state.global_step
        if mit is not None and b:
            captions = mit.captions(batch["captions"], batch["keys"], step)
            if captions != batch["captions"]:
                tokens = self.tokenize(captions)
        text = self.family.encode_text({k: tokens[k].to(self.dev) for k in self.tokenize.tokenizers})
        return mit.embeddings(text, batch["keys"], step) if mit is not None and b else text

    def micro_step(self, stream, micro: int) -> int:
        """One micro-batch: condition, filtered step, backward, records. Returns the global count of samples in the
        loss (kept, plus anchored with dropped_samples=anchor)."""
        args, state, dev = self.args, self.state, self.dev
        epoch, consumed, last_of_epoch, batch = next(stream)
        if epoch != state.epoch:
            state.positions = {}
        if "position" in batch:
            state.positions[str(batch["position"][0])] = int(batch["position"][1])
        self.data_report.add_skipped(batch.get("skipped", []))
        b = len(batch["keys"])
        self.data_report.add_used(b)
        if b == 0:      # every sample of this batch was bad: one filler row keeps this rank in the all-reduce
            r = args.resolution
            batch = {**batch, **self.tokenize([""]), "pixel_values": torch.zeros(1, 3, r, r),
                     "original_sizes": torch.full((1, 2), r), "crop_top_lefts": torch.zeros(1, 2),
                     "dup_group": torch.full((1,), -1)}
        gen = torch.Generator(device=dev).manual_seed(step_seed(args.seed, self.rank, state.global_step, micro))
        with torch.no_grad():
            pixels, latents, cond, uncond, judged = self._condition(batch, gen, b)
        groups = None
        if self.policy.uses_groups:       # hash only for a policy that reads item ids
            groups = item_groups(self.policy.group_by, batch["captions"], pixels, batch["keys"],
                                 batch.get("item_ids")) if b else \
                torch.zeros(1, len(self.policy.group_by), dtype=torch.long)
        last = micro == args.gradient_accumulation_steps - 1
        with contextlib.nullcontext() if last else self.accelerator.no_sync(self.unet):
            out = filtered_diffusion_step(
                self.unet, self.c.noise_scheduler, latents, cond, uncond, self.policy, gen, eligible=judged,
                is_duplicate=batch["dup_group"].to(dev) >= 0, magnitude_unet=self.raw_unet,
                snr_gamma=args.snr_gamma, noise=args, gather=self.accelerator.gather,
                rank=self.rank, autocast=self.autocast, compute_magnitude=self.compute_m,
                valid=torch.arange(max(b, 1), device=dev) < b, pad_to=args.train_batch_size, groups=groups,
                reference=self.reference if self.uses_reference else None, anchor=self.anchor,
                anchor_weight=args.anchor_weight, base_rows=None if groups is None else self.policy.base_rows(groups))
            total = out.kept_global + out.anchored_global     # the samples in the loss: the gradient's divisor
            self._backward(out.loss_sum, total)
        self.records.append(state.global_step + 1, batch["keys"], out.timesteps[:b], out.magnitudes[:b],
                            out.keep[:b], out.per_sample_loss[:b], out.eligible[:b],
                            None if groups is None else groups[:b, 0], out.base_loss[:b], out.base_magnitude[:b])
        self.window.add(out.stats)
        state.epoch, state.batches_in_epoch = epoch, consumed
        if last_of_epoch:
            self.epochs_done = epoch + 1
        g = out.stats
        state.samples_seen += g.keep.numel()
        state.samples_kept += int(g.keep.sum())
        state.samples_anchored += out.anchored_global
        state.dup_seen += int(g.duplicate.sum())
        state.dup_kept += int((g.duplicate & g.keep).sum())
        return total

    def _backward(self, loss_sum: torch.Tensor, total: int) -> None:
        """x world: DDP and FSDP2 average gradients over ranks, we want their sum (divided by the kept total in
        `update`). DeepSpeed steps inside backward, so the division comes first, and a step with nothing in the
        loss or a non-finite loss on any rank is not backpropagated (train.backends)."""
        if not self.deepspeed:
            self.accelerator.backward(loss_sum * self.world)
            return
        finite = torch.isfinite(loss_sum.detach()).float().reshape(1)
        self.stepped_in_backward = bool(total) and bool(self.accelerator.gather(finite).min() > 0)
        if self.stepped_in_backward:
            self.accelerator.backward(loss_sum * (self.world / total))

    def update(self, kept_total: int) -> None:
        """The optimizer, EMA and schedule step of a global step (module docstring: counting)."""
        optimizer_update(self.accelerator, self.params, self.optimizer, self.ema, self.raw_unet, kept_total,
                         self.args.max_grad_norm, self.state, offload_ema=self.args.offload_ema,
                         stepped_in_backward=self.stepped_in_backward if self.deepspeed else None)
        with warnings.catch_warnings():   # a skipped step advances the schedule on purpose (module docstring)
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step")
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1

    def after_step(self, bar) -> None:
        """Log, checkpoint and validate at their step intervals."""
        args, step = self.args, self.state.global_step
        if step % args.logging_steps == 0 or step == self.max_steps:
            _log(self.tracker, bar, self.window.pop(), self.policy, self.lr_scheduler.get_last_lr()[0], self.state)
        if args.checkpointing_steps and step % args.checkpointing_steps == 0:
            self.checkpoint()
        if args.validation_steps and step % args.validation_steps == 0 and step != self.max_steps:
            self.validate(f"step-{step:06d}")
        done, self.epochs_done = self.epochs_done, 0
        if args.validation_epochs and done and done % args.validation_epochs == 0 and step != self.max_steps:
            self.validate(f"epoch-{done:04d}")

    def checkpoint(self) -> None:
        self.records.flush()
        self.rank_states.gather()
        meta = {**self.state.state_dict(), "world_size": self.world, "train_batch_size": self.args.train_batch_size,
                "config": self.config}
        save_checkpoint(self.accelerator, self.run_dir, self.state.global_step, self.stateful, meta,
                        self.args.checkpoints_total_limit)

    def validate(self, tag: str) -> None:
        """Validation images from the EMA weights when there are any, on the main process."""
        args, ema, raw_unet = self.args, self.ema, self.raw_unet
        if not args.validation_prompts:
            return
        if self.accelerator.is_main_process or self.sharded:       # a sharded forward needs every rank
            if ema is not None:
                ema.store(raw_unet.parameters())
                ema.copy_to(raw_unet.parameters())
            raw_unet.eval()
            with self.autocast():      # frozen modules are in weight_dtype, the UNet in fp32
                images = validation_images(self.c, raw_unet, list(args.validation_prompts),
                                           num_images=args.num_validation_images,
                                           num_inference_steps=args.validation_inference_steps,
                                           resolution=args.resolution, seed=args.seed, device=self.dev)
            raw_unet.train()
            if ema is not None:
                ema.restore(raw_unet.parameters())
        if self.accelerator.is_main_process:
            save_images(images, self.run_dir / "samples" / tag)
            self.tracker.log_images("validation", [im for _, _, im in images], [p for p, _, _ in images],
                                    self.state.global_step)
        self.accelerator.wait_for_everyone()

    def finish(self, t0: float) -> dict:
        """Last records and checkpoint, final validation, the pipeline export and the run summary."""
        args, state = self.args, self.state
        self.records.flush()
        self.accelerator.wait_for_everyone()
        if args.checkpointing_steps and state.global_step % args.checkpointing_steps:   # same on every rank
            self.checkpoint()
        self.validate("final")
        summary = {}
        data_summary = merge_reports([g["report"] for g in self.rank_states.gather()])
        if self.excluded:
            data_summary["excluded_by_keep_list"] = self.excluded
        unet = full_unet(self.raw_unet) if self.sharded else self.raw_unet   # a gather: every rank takes part
        if self.accelerator.is_main_process:
            write_report(self.run_dir / "data_report.json", data_summary)
            if self.ema is not None:
                self.ema.copy_to(self.raw_unet.parameters())
            export_pipeline(self.export_c, unet, self.run_dir, lora=bool(args.lora_rank))
            summary = self.summary(data_summary, t0)
            (self.run_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
            write_model_card(self.run_dir, summary, self.config, self.family.name)
            self.tracker.log({"summary/" + k: v for k, v in summary.items() if isinstance(v, (int, float))},
                             state.global_step)
        self.accelerator.wait_for_everyone()
        return summary

    def summary(self, data_summary: dict, t0: float) -> dict:
        s, args = self.state, self.args
        return {
            "steps": s.global_step, "skipped_steps": s.skipped_steps, "nonfinite_steps": s.nonfinite_steps,
            "epochs": round(s.epoch + s.batches_in_epoch / self.batches_per_epoch, 3),
            "samples_seen": s.samples_seen, "samples_kept": s.samples_kept, "samples_anchored": s.samples_anchored,
            "kept_fraction": s.samples_kept / max(1, s.samples_seen),
            "dup_kept_fraction": s.dup_kept / s.dup_seen if s.dup_seen else None,
            "nondup_kept_fraction": ((s.samples_kept - s.dup_kept) / (s.samples_seen - s.dup_seen)
                                     if s.samples_seen > s.dup_seen else None),
            "samples_per_epoch": self.batches_per_epoch * args.train_batch_size * self.world,
            "data_skipped": data_summary["skipped"], "world_size": self.world, "policy": self.policy.name,
            "mitigation": self.mitigation.args.name if self.mitigation else "none",
            "wall_seconds": round(time.time() - t0, 1), "family": self.family.name,
            "pipeline": str(self.run_dir), "records": str(self.run_dir / "records"),
        }


def adamw_class(use_8bit_adam: bool) -> type:
    """torch's AdamW, or bitsandbytes' AdamW8bit (diffusers' --use_8bit_adam), an optional extra."""
    if not use_8bit_adam:
        return torch.optim.AdamW
    try:
        import bitsandbytes
    except ImportError as e:
        raise ValueError("optim.use_8bit_adam=true needs bitsandbytes: pip install 'memfilter[8bit]' "
                         f"(or set optim.use_8bit_adam=false). ({e})") from None
    return bitsandbytes.optim.AdamW8bit


def optimizer_update(accelerator, params: list, optimizer, ema, unet, kept_total: int, max_grad_norm: float,
                     state: TrainState, offload_ema: bool = False, stepped_in_backward: bool | None = None) -> bool:
    """The step's update from the accumulated gradient: divided by the global kept count, clipped, then the
    optimizer and the EMA step. No update when every sample was dropped (`skipped_steps`) or when the gradient
    norm is not finite (`nonfinite_steps`: an inf/NaN from bf16 overflow or a bad sample would otherwise be
    stepped into the weights and the EMA). The norm is of the all-reduced gradient: every rank decides alike.
    Under DeepSpeed the optimizer already stepped in backward (`stepped_in_backward`; False: the loss was not
    finite, nothing was backpropagated), and only the EMA follows. Returns whether the weights were updated."""
    if kept_total == 0:
        state.skipped_steps += 1
        return False
    if stepped_in_backward is not None:
        if not stepped_in_backward:
            state.nonfinite_steps += 1
            return False
        _ema_step(ema, unet, offload_ema)
        return True
    for p in params:
        if p.grad is not None:
            p.grad.div_(kept_total)
    norm = accelerator.clip_grad_norm_(params, max_grad_norm if max_grad_norm else math.inf)
    if not math.isfinite(float(norm)):
        state.nonfinite_steps += 1
        return False
    optimizer.step()
    _ema_step(ema, unet, offload_ema)
    return True


def _ema_step(ema, unet, offload_ema: bool) -> None:
    if ema is None:
        return
    if offload_ema:                      # diffusers' --offload_ema: to the device for the update, then back
        ema.to(unet.device, non_blocking=True)
    ema.step(unet.parameters())
    if offload_ema:
        ema.to("cpu", non_blocking=True)


def _log(tracker, bar, stats: StepStats | None, policy: FilterPolicy, lr: float, state: TrainState) -> None:
    """Scalars, histograms and the progress bar from the global stats since the last log."""
    if stats is None or stats.keep.numel() == 0:
        return
    m, dup, loss, kept = stats.magnitude, stats.duplicate, stats.loss, stats.keep
    elig = stats.eligible & torch.isfinite(m)        # judged and measured (count, agc and none measure no m)
    keep = kept.float()
    values = {
        "train/loss": float(loss[kept].mean()) if kept.any() else float("nan"),
        "train/loss_all": float(loss.mean()),
        "train/lr": lr,
        "filter/kept_fraction": float(keep.mean()),
        "filter/magnitude_mean": float(m[elig].mean()) if elig.any() else 0.0,
        "filter/magnitude_median": float(m[elig].median()) if elig.any() else 0.0,
        "filter/skipped_steps": state.skipped_steps,
        "train/nonfinite_steps": state.nonfinite_steps,
        "train/epoch": state.epoch,
        **{f"filter/{k}": v for k, v in policy.thresholds().items()},
    }
    if dup.any():
        values["filter/kept_fraction_dup"] = float(keep[dup].mean())
    if (~dup).any():
        values["filter/kept_fraction_nondup"] = float(keep[~dup].mean())
    tracker.log(values, state.global_step)
    if elig.any():
        tracker.log_histogram("filter/magnitude", m[elig].numpy(), state.global_step)
    if (dup & elig).any():
        tracker.log_histogram("filter/magnitude_dup", m[dup & elig].numpy(), state.global_step)
    bar.set_postfix(loss=f"{values['train/loss']:.4f}", kept=f"{values['filter/kept_fraction']:.2f}")
