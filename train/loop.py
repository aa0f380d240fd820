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
  norm is inf or NaN is not applied either, and counted in `nonfinite_steps`.
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
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from filtering.conditioning import where
from filtering.policies import FilterPolicy, item_groups
from filtering.protect import Protect
from filtering.records import RecordWriter
from train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from train.data.collate import CollateForTraining
from train.data.report import DataReport, merge_reports, write_report
from train.data.transforms import ImageTransform
from train.data.wds import WebDatasetSource
from train.export import export_pipeline, save_images, validation_images
from train.families import get_family
from train.models import Components, add_lora
from train.step import StepStats, filtered_diffusion_step
from train.tracking import NullTracker

log = logging.getLogger("memfilter.train")


@dataclass
class TrainArgs:
    """Loop settings; names follow diffusers' train_text_to_image.py.

    Args:
        output_dir: the run directory.
        resolution: training resolution in pixels. Default 512.
        center_crop: centre (True) or random crop. Default True.
        random_flip: random horizontal flip. Default False.
        interpolation: resize filter, "bicubic" or "lanczos". Default "bicubic".
        train_batch_size: samples per rank per micro-batch. Default 8.
        num_train_epochs: passes over the data when max_train_steps is None. Default 1.
        max_train_steps: optimizer steps; overrides num_train_epochs. Default None.
        gradient_accumulation_steps: micro-batches per step. Default 1.
        gradient_checkpointing: recompute UNet activations in backward. Default False.
        max_grad_norm: gradient clipping norm; 0 disables. Default 1.0.
        seed: base seed (data order, noise; each rank derives its own). Default 0.
        snr_gamma: Min-SNR weighting gamma; None disables. Default None.
        noise_offset: diffusers' noise offset. Default 0.
        proportion_empty_prompts: caption dropout for classifier-free guidance. Default 0.
        use_ema: keep an EMA of the UNet (exported instead of the raw weights). Default False.
        ema_decay: EMA decay. Default 0.9999.
        lora_rank: train LoRA adapters of this rank instead of the full UNet; 0 = full. Default 0.
        checkpointing_steps: save checkpoint-<step> every this many steps; 0 = never. Default 500.
        checkpoints_total_limit: keep at most this many checkpoints; None = all. Default None.
        resume_from_checkpoint: "latest" or a checkpoint path; None starts fresh. Default None.
        validation_prompts: prompts sampled every validation_steps and at the end. Default none.
        validation_steps: 0 = only at the end. Default 0.
        num_validation_images: images per validation prompt. Default 1.
        validation_inference_steps: DDIM steps for validation images. Default 20.
        logging_steps: log scalars every this many steps (histograms at the same rate). Default 10.
        dataloader_num_workers: DataLoader workers per rank. Default 0.
        records_flush_every: rows a rank buffers before writing a Parquet part. Default 65536.
        log_magnitudes: with filter `none`, still measure m (one extra no-grad forward a step) so the
            records of an unfiltered baseline carry it; false makes a plain fine-tune. Default True.
    """

    output_dir: str
    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = False
    interpolation: str = "bicubic"
    train_batch_size: int = 8
    num_train_epochs: int = 1
    max_train_steps: int | None = None
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    max_grad_norm: float = 1.0
    seed: int = 0
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    proportion_empty_prompts: float = 0.0
    use_ema: bool = False
    ema_decay: float = 0.9999
    lora_rank: int = 0
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    validation_prompts: list[str] = field(default_factory=list)
    validation_steps: int = 0
    num_validation_images: int = 1
    validation_inference_steps: int = 20
    logging_steps: int = 10
    dataloader_num_workers: int = 0
    records_flush_every: int = 65536
    log_magnitudes: bool = True


@dataclass
class OptimArgs:
    """AdamW and the lr schedule (diffusers' names and defaults).

    Args:
        learning_rate: peak learning rate. Default 1e-4.
        scale_lr: multiply lr by accumulation x batch size x processes. Default False.
        lr_scheduler: a diffusers schedule name ("constant", "constant_with_warmup", "linear",
            "cosine", "cosine_with_restarts", "polynomial"). Default "constant".
        lr_warmup_steps: warm-up steps. Default 500.
        lr_num_cycles: cycles for cosine_with_restarts. Default 1.
        lr_power: power for polynomial. Default 1.0.
        adam_beta1, adam_beta2, adam_weight_decay, adam_epsilon: AdamW. Defaults 0.9, 0.999, 1e-2, 1e-8.
    """

    learning_rate: float = 1e-4
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 500
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8


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


def _data_stream(accelerator, dataloader, state: "TrainState", num_workers: int):
    """Micro-batches forever, epoch after epoch: (epoch, batches consumed in that epoch, batch).

    Map-style data: accelerate's seedable sampler, skipping the consumed batches on resume.
    Streaming data (WebDatasetSource): the source itself resumes from the saved worker positions.
    """
    source = dataloader.dataset
    streaming = isinstance(source, WebDatasetSource)
    epoch, skip = state.epoch, state.batches_in_epoch
    n = source.batches_per_epoch(epoch) if streaming else len(dataloader)
    if skip >= n:
        epoch, skip = epoch + 1, 0
    while True:
        if streaming:
            if skip:
                source.set_resume(epoch, skip, state.positions, num_workers)
            else:
                source.set_epoch(epoch)
            loader = dataloader
        else:
            if hasattr(source, "set_epoch"):
                source.set_epoch(epoch)       # workers are not persistent: each epoch copies the dataset
            dataloader.set_epoch(epoch)
            loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        for i, batch in enumerate(loader, start=skip + 1):
            yield epoch, i, batch
        epoch, skip = epoch + 1, 0


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
          protect: Protect | None = None) -> dict:
    """Fine-tune `components.unet` on `dataset` with `policy` filtering every step.

    Args:
        accelerator: an Accelerator created with gradient_accumulation_steps=1 (the loop accumulates
            itself, to normalise by the kept count) and a seedable sampler
            (DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed)).
        components: the model's parts; their family (train.families) encodes, denoises and exports.
        dataset: map-style dataset of Samples (key, image, caption, meta).
        policy: the filter policy (decides on gathered magnitudes; saved in checkpoints).
        args: loop settings. optim: optimizer and schedule settings.
        tracker: WandbTracker on the main process, NullTracker (default) elsewhere.
        config: the resolved config, copied into checkpoints and the run directory.
        protect: samples the policy never judges (intended memorization); default none.
    Returns:
        The run summary (also written to <output_dir>/train_summary.json).
    """
    t0 = time.time()
    tracker = tracker or NullTracker()
    run_dir = Path(args.output_dir)
    dev, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    if accelerator.gradient_accumulation_steps != 1:
        raise ValueError("create the Accelerator with gradient_accumulation_steps=1: the loop accumulates itself")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # --- models: only the UNet (or its LoRA adapters) trains --------------------------------------
    from accelerate.utils import DistributedType
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise ValueError(f"{accelerator.distributed_type} is not supported yet: the loop normalises gradients "
                         "by the global kept count itself and exports on rank 0; use DDP (multi_gpu)")
    c = components
    family = get_family(c)
    # the exported pipeline gets the frozen modules in full precision, not their training-time casts (with
    # LoRA the UNet's base weights too: the adapters are fused into this copy)
    frozen_unet = copy.deepcopy(c.unet) if args.lora_rank and weight_dtype != torch.float32 else c.unet
    export_c = family.frozen_copy(frozen_unet) if weight_dtype != torch.float32 else c
    family.prepare_frozen(dev, weight_dtype)
    unet = c.unet
    if args.lora_rank:
        with torch.random.fork_rng(devices=[]):      # the same adapters for every run with this seed
            torch.manual_seed(args.seed)
            add_lora(unet, args.lora_rank)
        unet.to(dev, dtype=weight_dtype)
        for p in unet.parameters():          # trainable adapters stay in fp32 (diffusers' recipe)
            if p.requires_grad:
                p.data = p.data.float()
    else:
        unet.train().requires_grad_(True).to(dev)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    ema = None
    if args.use_ema:
        if args.lora_rank:
            raise ValueError("use_ema=true with model.lora.rank>0 is not supported: EMA the full UNet, or drop EMA")
        ema = EMAModel([p.detach().clone() for p in unet.parameters()], decay=args.ema_decay,
                       model_cls=type(unet), model_config=unet.config)
        ema.to(dev)

    lr = optim.learning_rate
    if optim.scale_lr:
        lr *= args.gradient_accumulation_steps * args.train_batch_size * world
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(optim.adam_beta1, optim.adam_beta2),
                                  weight_decay=optim.adam_weight_decay, eps=optim.adam_epsilon)

    tokenize = family.tokenize_fn()
    collate = CollateForTraining(tokenize, ImageTransform(args.resolution, args.interpolation, args.center_crop,
                                                             args.random_flip, args.seed))
    streaming = isinstance(dataset, WebDatasetSource)
    if streaming:   # the source splits by node and worker and batches itself: accelerate must not shard it
        dataset.bind(collate, rank=rank, world_size=world, batch_size=args.train_batch_size)
        dataloader = DataLoader(dataset, batch_size=None, num_workers=args.dataloader_num_workers)
        unet, optimizer = accelerator.prepare(unet, optimizer)
        batches_per_epoch = dataset.batches_per_epoch(0)
    else:
        dataloader = DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True, drop_last=True,
                                num_workers=args.dataloader_num_workers, collate_fn=collate)
        unet, optimizer, dataloader = accelerator.prepare(unet, optimizer, dataloader)
        batches_per_epoch = len(dataloader)
    raw_unet = accelerator.unwrap_model(unet)
    params = [p for p in unet.parameters() if p.requires_grad]     # as prepared (wrappers may replace them)
    if batches_per_epoch == 0:
        raise ValueError(f"data: {len(dataset)} samples give no full batch of train_batch_size="
                         f"{args.train_batch_size} on {world} processes; lower train_batch_size or add data")
    max_steps = args.max_train_steps or max(1, args.num_train_epochs * batches_per_epoch
                                            // args.gradient_accumulation_steps)
    # The schedule is stepped once per global step by us (not by accelerate, which would step it
    # once per process), so warm-up and length are in optimizer steps whatever the process count.
    lr_scheduler = get_scheduler(optim.lr_scheduler, optimizer=optimizer, num_warmup_steps=optim.lr_warmup_steps,
                                 num_training_steps=max_steps, num_cycles=optim.lr_num_cycles, power=optim.lr_power)

    empty = family.empty_text(dev)        # the unconditional text, batch 1 (caption dropout and the magnitude)

    # --- resume -----------------------------------------------------------------------------------
    state = TrainState()
    data_report = DataReport()
    reports = _RankStates(accelerator, data_report, state)
    # order matters: the per-rank entry is loaded after train_state and overrides its positions
    stateful = {"train_state": state, "lr_scheduler": lr_scheduler, "policy": policy, "rank_states": reports}
    if ema is not None:
        stateful["ema"] = ema
    records = RecordWriter(run_dir / "records", rank, flush_every=args.records_flush_every)
    if args.resume_from_checkpoint:
        path = find_checkpoint(run_dir, args.resume_from_checkpoint)
        if path is None:
            accelerator.print(f"resume_from_checkpoint=latest: no checkpoint in {run_dir}, starting a new run")
        else:
            meta = load_checkpoint(accelerator, path, stateful)
            saved_workers = (meta.get("config") or {}).get("dataloader_num_workers", args.dataloader_num_workers)
            if (meta["world_size"], meta["train_batch_size"]) != (world, args.train_batch_size) or \
                    (streaming and saved_workers != args.dataloader_num_workers):
                raise ValueError(f"{path} was written by {meta['world_size']} processes x train_batch_size="
                                 f"{meta['train_batch_size']} (dataloader_num_workers={saved_workers}); resume "
                                 f"with the same values to continue the same data order")
            if ema is not None:
                ema.to(dev)
            accelerator.print(f"resumed from {path} at step {state.global_step} "
                              f"(epoch {state.epoch}, batch {state.batches_in_epoch})")
    # records past the restored step (all of them for a fresh start) belong to a run that did not finish
    dropped = records.truncate_after(state.global_step)
    if dropped:
        accelerator.print(f"removed {dropped} records written after step {state.global_step} by an earlier attempt")

    def checkpoint():
        records.flush()
        reports.gather()
        meta = {**state.state_dict(), "world_size": world, "train_batch_size": args.train_batch_size,
                "config": config}
        save_checkpoint(accelerator, run_dir, state.global_step, stateful, meta, args.checkpoints_total_limit)

    def validate(tag: str):
        if not args.validation_prompts:
            return
        if accelerator.is_main_process:
            if ema is not None:
                ema.store(raw_unet.parameters())
                ema.copy_to(raw_unet.parameters())
            raw_unet.eval()
            with accelerator.autocast():      # frozen modules are in weight_dtype, the UNet in fp32
                images = validation_images(c, raw_unet, list(args.validation_prompts),
                                           num_images=args.num_validation_images,
                                           num_inference_steps=args.validation_inference_steps,
                                           resolution=args.resolution, seed=args.seed, device=dev)
            raw_unet.train()
            if ema is not None:
                ema.restore(raw_unet.parameters())
            save_images(images, run_dir / "samples" / tag)
            tracker.log_images("validation", [im for _, _, im in images], [p for p, _, _ in images],
                               state.global_step)
        accelerator.wait_for_everyone()

    # --- the loop ---------------------------------------------------------------------------------
    stream = _data_stream(accelerator, dataloader, state, args.dataloader_num_workers)
    window = _Window()
    bar = tqdm(total=max_steps, initial=state.global_step, desc="train", disable=not accelerator.is_main_process,
               dynamic_ncols=True)
    compute_m = policy.name != "none" or args.log_magnitudes
    while state.global_step < max_steps:
        kept_total = 0
        for micro in range(args.gradient_accumulation_steps):
            epoch, consumed, batch = next(stream)
            if epoch != state.epoch:
                state.positions = {}
            if "position" in batch:
                state.positions[str(batch["position"][0])] = int(batch["position"][1])
            data_report.add_skipped(batch.get("skipped", []))
            b = len(batch["keys"])
            data_report.add_used(b)
            if b == 0:      # every sample of this batch was bad: one filler row keeps this rank in the all-reduce
                batch = {**batch, **tokenize([""]), "pixel_values": torch.zeros(1, 3, args.resolution, args.resolution),
                         "original_sizes": torch.full((1, 2), args.resolution), "crop_top_lefts": torch.zeros(1, 2),
                         "dup_group": torch.full((1,), -1)}
            valid = torch.arange(max(b, 1), device=dev) < b
            gen = torch.Generator(device=dev).manual_seed(step_seed(args.seed, rank, state.global_step, micro))
            with torch.no_grad():
                pixels = batch["pixel_values"].to(dev, weight_dtype)
                latents = family.encode_images(pixels, gen)                  # [n, C, h, w] float32
                n = latents.shape[0]
                dropped = torch.rand(n, generator=gen, device=dev) < args.proportion_empty_prompts
                judged = ~dropped
                if protect and b:         # intended memorization: kept, and out of the policy's statistics
                    judged[:b] &= ~protect.mask(batch["keys"], batch["captions"]).to(dev)
                text = where(dropped, empty, family.encode_text({k: batch[k].to(dev) for k in tokenize.tokenizers}))
                sizes = {"resolution": args.resolution, "original_sizes": batch["original_sizes"],
                         "crop_top_lefts": batch["crop_top_lefts"]}
                cond, uncond = family.unet_kwargs(text, **sizes), family.uncond_like(empty, n, **sizes)
            sync = accelerator.no_sync(unet) if micro < args.gradient_accumulation_steps - 1 \
                else contextlib.nullcontext()
            with sync:
                out = filtered_diffusion_step(
                    unet, c.noise_scheduler, latents, cond, uncond, policy, gen,
                    eligible=judged, is_duplicate=batch["dup_group"].to(dev) >= 0, magnitude_unet=raw_unet,
                    snr_gamma=args.snr_gamma, noise_offset=args.noise_offset, gather=accelerator.gather,
                    rank=rank, autocast=accelerator.autocast(), compute_magnitude=compute_m, valid=valid,
                    pad_to=args.train_batch_size,
                    groups=(item_groups(policy.group_by, batch["captions"], pixels) if b else
                            torch.zeros(1, len(policy.group_by), dtype=torch.long))
                    if policy.uses_groups else None)      # hash only for a policy that reads item ids
                # x world: DDP averages gradients over ranks, we want their sum (divided by kept_total below)
                accelerator.backward(out.loss_sum * world)
            kept_total += out.kept_global
            records.append(state.global_step + 1, batch["keys"], out.timesteps[:b], out.magnitudes[:b],
                           out.keep[:b], out.per_sample_loss[:b], out.eligible[:b])
            window.add(out.stats)
            state.epoch, state.batches_in_epoch = epoch, consumed
            g = out.stats
            state.samples_seen += g.keep.numel()
            state.samples_kept += int(g.keep.sum())
            state.dup_seen += int(g.duplicate.sum())
            state.dup_kept += int((g.duplicate & g.keep).sum())

        optimizer_update(accelerator, params, optimizer, ema, raw_unet, kept_total, args.max_grad_norm, state)
        with warnings.catch_warnings():   # a skipped step advances the schedule on purpose (module docstring)
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step")
            lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.global_step += 1
        bar.update(1)

        if state.global_step % args.logging_steps == 0 or state.global_step == max_steps:
            _log(tracker, bar, window.pop(), policy, lr_scheduler.get_last_lr()[0], state)
        if args.checkpointing_steps and state.global_step % args.checkpointing_steps == 0:
            checkpoint()
        if args.validation_steps and state.global_step % args.validation_steps == 0 \
                and state.global_step != max_steps:
            validate(f"step-{state.global_step:06d}")
    bar.close()

    # --- the end: records, pipeline, summary -----------------------------------------------------
    records.flush()
    accelerator.wait_for_everyone()
    if args.checkpointing_steps and state.global_step % args.checkpointing_steps:   # same answer on every rank
        checkpoint()
    validate("final")
    summary = {}
    data_summary = merge_reports([g["report"] for g in reports.gather()])
    if accelerator.is_main_process:
        write_report(run_dir / "data_report.json", data_summary)
        if ema is not None:
            ema.copy_to(raw_unet.parameters())
        export_pipeline(export_c, raw_unet, run_dir / "pipeline", lora=bool(args.lora_rank))
        summary = {
            "steps": state.global_step, "skipped_steps": state.skipped_steps,
            "nonfinite_steps": state.nonfinite_steps,
            "epochs": round(state.epoch + state.batches_in_epoch / batches_per_epoch, 3),
            "samples_seen": state.samples_seen, "samples_kept": state.samples_kept,
            "kept_fraction": state.samples_kept / max(1, state.samples_seen),
            "dup_kept_fraction": state.dup_kept / state.dup_seen if state.dup_seen else None,
            "nondup_kept_fraction": ((state.samples_kept - state.dup_kept) / (state.samples_seen - state.dup_seen)
                                     if state.samples_seen > state.dup_seen else None),
            "samples_per_epoch": batches_per_epoch * args.train_batch_size * world,
            "data_skipped": data_summary["skipped"],
            "world_size": world, "policy": policy.name, "wall_seconds": round(time.time() - t0, 1),
            "pipeline": str(run_dir / "pipeline"), "records": str(run_dir / "records"),
        }
        (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
        tracker.log({"summary/" + k: v for k, v in summary.items() if isinstance(v, (int, float))},
                    state.global_step)
    accelerator.wait_for_everyone()
    return summary


def optimizer_update(accelerator, params: list, optimizer, ema, unet, kept_total: int, max_grad_norm: float,
                     state: TrainState) -> bool:
    """The step's update from the accumulated gradient: divided by the global kept count, clipped, then the
    optimizer and the EMA step. No update when every sample was dropped (`skipped_steps`) or when the gradient
    norm is not finite (`nonfinite_steps`: an inf/NaN from bf16 overflow or a bad sample would otherwise be
    stepped into the weights and the EMA). The norm is of the all-reduced gradient: every rank decides alike.
    Returns whether the weights were updated."""
    if kept_total == 0:
        state.skipped_steps += 1
        return False
    for p in params:
        if p.grad is not None:
            p.grad.div_(kept_total)
    norm = accelerator.clip_grad_norm_(params, max_grad_norm if max_grad_norm else math.inf)
    if not math.isfinite(float(norm)):
        state.nonfinite_steps += 1
        return False
    optimizer.step()
    if ema is not None:
        ema.step(unet.parameters())
    return True


def _log(tracker, bar, stats: StepStats | None, policy: FilterPolicy, lr: float, state: TrainState) -> None:
    """Scalars, histograms and the progress bar from the global stats since the last log."""
    if stats is None or stats.keep.numel() == 0:
        return
    m, elig, dup, loss, kept = stats.magnitude, stats.eligible, stats.duplicate, stats.loss, stats.keep
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
    tracker.log_histogram("filter/magnitude", m[elig].numpy(), state.global_step)
    if dup.any():
        tracker.log_histogram("filter/magnitude_dup", m[dup].numpy(), state.global_step)
    bar.set_postfix(loss=f"{values['train/loss']:.4f}", kept=f"{values['filter/kept_fraction']:.2f}")
