"""What the magnitude filter costs a training step: filter=fixed vs filter=none, and what the default policy
(filter=item) adds on top of filter=fixed, side by side in one run.

    python benchmarks/bench_filter_overhead.py                                  # tiny UNet on CPU, about 1 min
    python benchmarks/bench_filter_overhead.py --block-out-channels 64,128 --resolution 64
    python benchmarks/bench_filter_overhead.py --device cuda --sd-size --mixed-precision bf16
    python benchmarks/bench_filter_overhead.py --family sdxl [--device cuda --sd-size]  # SDXL's conditioning

Both variants run the project's own step, `train.step.filtered_diffusion_step`, on the same UNet,
optimizer and batch, followed by backward, AdamW step and zero_grad, as the training loop does:
- `none`:  NoFilter with compute_magnitude=False, a plain fine-tune step (forward + backward);
- `fixed`: FixedThreshold with compute_magnitude=True, which adds one no-grad UNet forward with the
  empty-prompt embedding at the same x_t and t (the conditional prediction is reused from the
  training forward), and the policy's decision;
- `item`: the ItemEvidence policy against the population (`filter.null=population`) on the same step, plus
  what the loop does for it: the image ids of the batch (filtering.policies.item_groups; the pipeline computes
  them from the source pictures in its workers, here they are hashed from the pixels on the step's device). Its
  target is the policy's own cost: at most 5% over `fixed` (issues 9 and 25: at batch 256);
- `item-base`: the default, ItemEvidence against the frozen base (`filter.null=base`): `item` plus the base's
  two no-grad forwards (prompt and empty prompt) at every judged sample's x_t and t. That is the null's price,
  printed beside the policy's own (no target: it buys the per-image null; docs/filter-policies.md);
- `item-base-q`: the same with `filter.base_fraction=0.25`: the base runs on every sample of an item seen lately
  and on a quarter of the others (here every picture is new: a quarter of the batch), as on web-scale data.

Why about 1.33x the time: a backward costs about two forwards, so a plain step is ~3 forward-equivalents
and a filtered one ~4. The optimizer step and fixed per-step costs pull the ratio down, and so does the
no-grad forward being cheaper than one that records the graph; a backward dearer than 2 forwards (CPU
attention kernels) or gradient checkpointing (backward recomputes the forward: ~5/4) pulls it down too.

Why about 1x the memory: the extra forward runs under no_grad, so its activations are freed block by
block; on top of the training forward's saved graph it holds only its own skip connections (the down
path's outputs, kept until the up path uses them) and one block's transients. Next to SD's weights
and Adam state that is a percent or so; a tiny model, whose state is next to nothing, shows more.

Timing: the variants alternate in one process after a warm-up (fixed, none, none, fixed, ...), so the
machine's drift hits both alike; both get the same seed at each step (same noise and t); the medians
are compared. Memory: peak bytes of a step = weights + Adam state + the step's working set
(activations, gradients, transients). On CUDA that is max_memory_allocated. On CPU, where no allocator
keeps such a count, each variant runs in a fresh process of this script with glibc told to return
large blocks to the OS, so that the resident set follows the live tensors; the working set is the peak
RSS of the steps above the RSS between steps. Nothing here fails on timing: the figures are printed
next to their targets for a person to judge.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from memfilter.filtering.policies import FilterPolicy, FixedThreshold, ItemEvidence, NoFilter, item_groups  # noqa: E402
from memfilter.train.step import filtered_diffusion_step  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_rss import PeakRss  # noqa: E402

VARIANTS = ("fixed", "none", "item", "item-base", "item-base-q")
TARGET_TIME, TARGET_MEMORY, TARGET_POLICY = 1.35, 1.10, 1.05
CHILD_TAG = "BENCH_CHILD_RESULT "
MiB = 2 ** 20


@dataclass
class Bench:
    """One model, optimizer and batch that both variants train on."""

    unet: torch.nn.Module
    noise_scheduler: object
    optimizer: torch.optim.Optimizer
    latents: torch.Tensor   # [B, 4, h, w]
    cond: dict              # the UNet's keyword arguments, as the family builds them (SD: [B, 77, D] states)
    uncond: dict            # the empty prompt's, batch B
    pixels: torch.Tensor    # [B, 3, H, W] in [-1, 1]: what the item policy hashes
    base: torch.nn.Module   # a frozen copy of the UNet: the base model of filter.null=base
    device: torch.device
    bf16: bool
    description: str


def build_bench(args: argparse.Namespace) -> Bench:
    """The UNet (the family's tiny one, or SD v1's / SDXL's shape), AdamW, and a random batch conditioned as the
    family conditions it (SDXL: pooled embeddings and time ids as added conditions)."""
    from memfilter.train.families import FAMILIES, build_tiny_model

    device = torch.device(args.device)
    if args.sd_size:   # the real UNet shape; no VAE or text encoder: the batch is random anyway
        torch.manual_seed(args.seed)
        unet, noise_scheduler, latent_hw, dim, pooled = sd_size_unet(args.family)
        what, factor = f"{args.family} full-size UNet, latents 4x{latent_hw}x{latent_hw}", 8
    else:
        cad = args.cross_attention_dim * (2 if args.family == "sdxl" else 1)
        c = build_tiny_model(args.family, resolution=args.resolution, block_out_channels=args.block_out_channels,
                             layers_per_block=args.layers_per_block, cross_attention_dim=cad, seed=args.seed)
        unet, noise_scheduler = c.unet, c.noise_scheduler
        latent_hw, dim, pooled, factor = args.resolution // 2, cad, cad // 2, 2   # the tiny VAE: by 2
        what = (f"tiny {args.family} UNet {','.join(map(str, args.block_out_channels))} x{args.layers_per_block}, "
                f"{args.resolution} px -> latents 4x{latent_hw}x{latent_hw}")
    unet.to(device).train().requires_grad_(True)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate)
    g = torch.Generator().manual_seed(args.seed)
    b = args.batch_size
    latents = torch.randn(b, 4, latent_hw, latent_hw, generator=g).to(device)
    family = FAMILIES[args.family](None)      # unet_kwargs needs no weights: random text stands in for encoders

    def text(n):
        t = {"encoder_hidden_states": torch.randn(n, 77, dim, generator=g).to(device)}
        return {**t, "text_embeds": torch.randn(n, pooled, generator=g).to(device)} if args.family == "sdxl" else t
    cond = family.unet_kwargs(text(b), resolution=latent_hw * factor)
    uncond = family.uncond_like(text(1), b, resolution=latent_hw * factor)
    pixels = (torch.rand(b, 3, latent_hw * factor, latent_hw * factor, generator=g) * 2 - 1).to(device)
    n_params = sum(p.numel() for p in unet.parameters()) / 1e6
    desc = (f"{what} ({n_params:.1f}M params), batch {b}, {device.type}, "
            f"{'bf16 autocast' if args.mixed_precision == 'bf16' else 'fp32'}"
            f"{', gradient checkpointing' if args.gradient_checkpointing else ''}")
    base = copy.deepcopy(unet).requires_grad_(False).eval()
    return Bench(unet, noise_scheduler, optimizer, latents, cond, uncond, pixels, base, device,
                 args.mixed_precision == "bf16", desc)


def sd_size_unet(family: str):
    """(UNet, noise scheduler, latent size, text width, pooled width) of SD v1 (860M) or SDXL (2.6B)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from memfilter.train.models import SD_SCHEDULER

    if family == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
        return unet, DDPMScheduler(**SD_SCHEDULER), 128, 2048, 1280
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    return unet, DDPMScheduler(**SD_SCHEDULER), 64, 768, 0


def make_policy(variant: str, threshold: float) -> tuple[FilterPolicy, bool]:
    """(policy, compute_magnitude) of a variant, as the training loop chooses them."""
    if variant.startswith("item"):
        return ItemEvidence(null="population" if variant == "item" else "base",
                            base_fraction=0.25 if variant == "item-base-q" else 1.0), True
    return (FixedThreshold(threshold), True) if variant == "fixed" else (NoFilter(), False)


def state_bytes(bench: Bench) -> int:
    """Bytes of the tensors that live between steps: weights and Adam state (gradients are set to None)."""
    state = [t for st in bench.optimizer.state.values() for t in st.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in [*bench.unet.parameters(), *state])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(bench: Bench, policy: FilterPolicy, compute_magnitude: bool, seed: int) -> int:
    """One optimizer step shaped like the training loop's; returns the number of kept samples."""
    gen = torch.Generator(device=bench.device).manual_seed(seed)
    groups = item_groups(policy.group_by, [], bench.pixels) if policy.uses_groups else None
    def reference(x_t, t, cond):                                   # as the loop's: no grad, autocast
        with torch.no_grad():
            return bench.base(x_t, t, **cond).sample
    with torch.autocast(bench.device.type, dtype=torch.bfloat16, enabled=bench.bf16):
        out = filtered_diffusion_step(bench.unet, bench.noise_scheduler, bench.latents, bench.cond, bench.uncond,
                                      policy, gen, compute_magnitude=compute_magnitude, groups=groups,
                                      reference=reference if policy.uses_base else None, anchor=False,
                                      base_rows=policy.base_rows(groups) if policy.uses_base else None)
    out.loss_sum.backward()      # AdamW is scale-invariant: no division by the kept count needed here
    if out.kept_global:          # the loop skips the update when every sample was dropped
        bench.optimizer.step()
    bench.optimizer.zero_grad(set_to_none=True)
    return out.kept_global


def run_interleaved(bench: Bench, args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, dict]]:
    """Step times per variant in seconds, alternating the variants; on CUDA their memory figures too."""
    policies = {v: make_policy(v, args.threshold) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    working = {v: 0 for v in VARIANTS}
    peak = {v: 0 for v in VARIANTS}
    cuda, dropped = bench.device.type == "cuda", 0
    for i in tqdm(range(args.warmup + args.steps), desc="steps (both variants)", leave=False):
        for v in (VARIANTS if i % 2 == 0 else VARIANTS[::-1]):      # alternating order: drift hits all alike
            sync(bench.device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(bench.device)
                before = torch.cuda.memory_allocated(bench.device)
            t0 = time.perf_counter()
            kept = train_step(bench, *policies[v], seed=args.seed + i)
            sync(bench.device)
            if i < args.warmup:
                continue
            times[v].append(time.perf_counter() - t0)
            dropped += args.batch_size - kept
            if cuda:
                peak[v] = max(peak[v], torch.cuda.max_memory_allocated(bench.device))
                working[v] = max(working[v], torch.cuda.max_memory_allocated(bench.device) - before)
    if dropped:
        print(f"note: filter=fixed dropped {dropped} samples (threshold {args.threshold}); "
              "a dropped sample costs the same compute", file=sys.stderr)
    memory = {v: {"peak_bytes": peak[v], "state_bytes": state_bytes(bench), "working_set_bytes": working[v]}
              for v in VARIANTS} if cuda else {}
    return times, memory


def child_main(args: argparse.Namespace) -> None:
    """Hidden --child-variant mode (CPU): one variant's memory figures, measured in a fresh process.

    One untimed step first loads the kernels' code and creates the Adam state; the RSS after it is the
    baseline, and the step working set is the peak RSS of the next steps above it.
    """
    bench = build_bench(args)
    policy, compute_m = make_policy(args.child_variant, args.threshold)
    train_step(bench, policy, compute_m, seed=args.seed)
    with PeakRss() as rss:
        resident = rss.rss()
        for i in range(args.memory_steps):
            train_step(bench, policy, compute_m, seed=args.seed + 1 + i)
    working, state = rss.peak - resident, state_bytes(bench)
    print(CHILD_TAG + json.dumps({"peak_bytes": state + working, "state_bytes": state,
                                  "working_set_bytes": working, "resident_rss_bytes": resident}), flush=True)


def cpu_memory(argv: list[str]) -> dict[str, dict]:
    """Run each variant in a fresh process of this script; their memory figures."""
    # glibc: serve blocks >= 64 KiB by mmap and trim the heap, so freed tensors leave the RSS at once
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = {}
    for v in tqdm(VARIANTS, desc="memory (a process per variant)", leave=False):
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--child-variant", v],
                              capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(CHILD_TAG)]
        if proc.returncode or not lines:
            raise RuntimeError(f"memory process for {v} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        out[v] = json.loads(lines[-1][len(CHILD_TAG):])
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16"], help="torch.autocast for the step")
    p.add_argument("--family", default="sd", choices=["sd", "sdxl"], help="model family (train/families)")
    p.add_argument("--sd-size", action="store_true",
                   help="SD v1's UNet (320,640,1280,1280, 64x64 latents, 768-d text) instead of the tiny one")
    p.add_argument("--resolution", type=int, default=32, help="tiny model: image px (latents are half)")
    p.add_argument("--block-out-channels", type=lambda s: tuple(int(x) for x in s.split(",")), default=(32, 64),
                   help="tiny model: UNet channels per level, e.g. 64,128,256")
    p.add_argument("--layers-per-block", type=int, default=1, help="tiny model: resnets per level")
    p.add_argument("--cross-attention-dim", type=int, default=32, help="tiny model: text embedding width")
    p.add_argument("--batch-size", type=int, default=8, help="samples per step")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--memory-steps", type=int, default=3, help="CPU: measured steps per memory process")
    p.add_argument("--threshold", type=float, default=float("inf"),
                   help="filter=fixed threshold; inf keeps every sample, so both variants update alike")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--learning-rate", type=float, default=1e-5, help="AdamW lr")
    p.add_argument("--seed", type=int, default=0, help="weights, batch and per-step noise")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--child-variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child_variant:
        child_main(args)
        return {}
    bench = build_bench(args)
    what = f"{bench.description}; {args.steps} timed steps per variant after {args.warmup} warm-up"
    print(f"filter overhead: {what}", file=sys.stderr)
    times, memory = run_interleaved(bench, args)
    if bench.device.type == "cuda":
        memory_how = "max_memory_allocated per step"
    else:
        del bench                               # free this process's model before the memory processes
        memory = cpu_memory(argv)
        memory_how = "weights + Adam state + peak RSS above the between-steps RSS, a fresh process per variant"

    med = {v: statistics.median(times[v]) for v in VARIANTS}
    time_ratio = med["fixed"] / med["none"]
    mem_ratio = memory["fixed"]["peak_bytes"] / memory["none"]["peak_bytes"]
    policy_ratio = med["item"] / med["fixed"]
    base_ratio = med["item-base"] / med["fixed"]
    base_q_ratio = med["item-base-q"] / med["fixed"]
    print(f"\nfilter overhead: {what}")
    print(f"{'variant':<11} {'extra fwd':>9} {'median step':>12} {'min step':>9} {'peak memory':>12} "
          f"{'of it: step working set':>24}")
    for v in VARIANTS:
        m = memory[v]
        print(f"{v:<11} {'no' if v == 'none' else '3' if v == 'item-base' else '1.5' if v == 'item-base-q' else '1':>9} {med[v]:>11.3f}s {min(times[v]):>8.3f}s "
              f"{m['peak_bytes'] / MiB:>8.1f} MiB {m['working_set_bytes'] / MiB:>20.1f} MiB")
    print(f"memory: {memory_how}")
    for label, ratio, target in (("time ratio fixed/none", time_ratio, TARGET_TIME),
                                 ("peak memory ratio fixed/none", mem_ratio, TARGET_MEMORY),
                                 ("time ratio item/fixed (the policy's own cost)", policy_ratio, TARGET_POLICY)):
        print(f"{label}: {ratio:.3f}x (target <= {target:.2f}x)"
              f"{'' if ratio <= target else f'  over target: {ratio:.3f}x'}")
    print(f"time ratio item-base/fixed (the default: the policy and the base null's two forwards): {base_ratio:.3f}x")
    print(f"time ratio item-base-q/fixed (base_fraction 0.25, every picture new): {base_q_ratio:.3f}x")

    config = {k: str(v) if v == float("inf") else v for k, v in vars(args).items()
              if k not in ("json", "child_variant")}          # str(inf): JSON has no infinity
    result = {"setup": what, "config": config,
              "torch": torch.__version__, "memory_method": memory_how, "step_seconds": times,
              "median_step_seconds": med, "memory": memory, "time_ratio": time_ratio, "memory_ratio": mem_ratio,
              "policy_time_ratio": policy_ratio, "base_null_time_ratio": base_ratio,
              "base_null_quarter_time_ratio": base_q_ratio,
              "targets": {"time_ratio": TARGET_TIME, "memory_ratio": TARGET_MEMORY, "policy_time_ratio": TARGET_POLICY}}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
