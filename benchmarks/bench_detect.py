"""Prompts/s of memfilter's detection at step 1 with n generations, against the official code's approach and against
the floor, side by side in one run.

    python benchmarks/bench_detect.py                          # 32 prompts, tiny SD model, about a minute on 2 cores
    python benchmarks/bench_detect.py --prompts 64 --generations 4 --json out/detect.json
    python benchmarks/bench_detect.py --pipeline /models/sd-v1-4 --device cuda --prompts 100   # a real model

The same model, prompts and n in every variant:
- `memfilter`: evaluation.detect.run_detectors(detectors=[magnitude], num_steps=1): prompts and generations batched
  (--batch-size pairs per denoiser call), the trajectory stopped after step 1;
- `official`: what Wen et al.'s code does per prompt: one full pipeline call (--inference-steps, default 50, guidance
  7.5, num_images_per_prompt=n, images decoded), one prompt at a time (the norms it tracks come from the same calls);
- `floor`: the denoiser work detection cannot avoid: one CFG denoiser call (conditional and unconditional rows,
  two forwards per generation) on the same batches, inputs prepared before the clock starts.
Ratios: official time / memfilter time (the issue's target: at least 30x) and memfilter time / floor time (at most
1.3x). Variants run in alternating rounds; the medians are printed. Nothing here fails on timing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def load(args):
    from memfilter.evaluation.generate import load_pipeline
    from memfilter.train.families import build_tiny, get_family

    if args.pipeline:
        return load_pipeline(args.pipeline, args.device)
    c = build_tiny(resolution=args.resolution)
    pipe = get_family(c).pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(args.device)


def prompts_of(n: int) -> list[str]:
    from memfilter.evaluation.prompts import load_prompt_file, prompt_set

    rows = load_prompt_file(prompt_set("sdv1_500_memorized.jsonl"), limit=n // 2)
    rows += load_prompt_file(prompt_set("sd1_nonmemorized_500.txt"), limit=n - len(rows))
    return [r["prompt"] for r in rows]


def memfilter_variant(pipe, prompts, args) -> float:
    from memfilter.evaluation.detect import run_detectors

    t0 = time.perf_counter()
    run_detectors(pipe, prompts, detectors=["magnitude"], num_generations=args.generations, num_steps=1,
                  num_inference_steps=args.inference_steps, batch_size=args.batch_size)
    return time.perf_counter() - t0


def official_variant(pipe, prompts, args) -> float:
    t0 = time.perf_counter()
    for p in prompts:
        pipe(p, num_images_per_prompt=args.generations, num_inference_steps=args.inference_steps,
             guidance_scale=7.5)
    return time.perf_counter() - t0


@torch.no_grad()
def floor_variant(pipe, prompts, args) -> float:
    """The CFG denoiser calls on the same (prompt, generation) batches, everything else done before the clock."""
    from memfilter.filtering.conditioning import cat, expand, select
    from memfilter.train.families import from_pipeline

    fam = from_pipeline(pipe)
    res = fam.native_resolution()
    f = fam.vae_scale_factor()
    cond, uncond = fam.prompt_conditioning(prompts, res), fam.uncond_conditioning(res)
    pairs = [(i, j) for i in range(len(prompts)) for j in range(args.generations)]
    batches = []
    for s in range(0, len(pairs), args.batch_size):
        rows = [i for i, _ in pairs[s:s + args.batch_size]]
        x = torch.randn(len(rows), pipe.unet.config.in_channels, res // f, res // f, device=pipe.device,
                        dtype=pipe.unet.dtype)
        batches.append((torch.cat([x, x]), cat([select(cond, rows), expand(uncond, len(rows))])))
    t = torch.tensor(999, device=pipe.device)
    t0 = time.perf_counter()
    for x, ctx in batches:
        pipe.unet(x, t, **ctx)
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pipeline", help="a diffusers pipeline directory or hub id; default: a tiny SD model")
    p.add_argument("--resolution", type=int, default=32, help="the tiny model's image size")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--inference-steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    pipe, prompts = load(args), prompts_of(args.prompts)
    memfilter_variant(pipe, prompts[:2], args)                                  # warm-up
    runs = {"memfilter": [], "official": [], "floor": []}
    for _ in range(args.rounds):
        runs["memfilter"].append(memfilter_variant(pipe, prompts, args))
        runs["official"].append(official_variant(pipe, prompts, args))
        runs["floor"].append(floor_variant(pipe, prompts, args))
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {"prompts": len(prompts), "generations": args.generations, "device": args.device,
              "pipeline": args.pipeline or f"tiny SD {args.resolution}px", "seconds": runs,
              "prompts_per_s": {k: len(prompts) / v for k, v in med.items()},
              "official_over_memfilter": med["official"] / med["memfilter"],
              "memfilter_over_floor": med["memfilter"] / med["floor"]}
    for k, v in result["prompts_per_s"].items():
        print(f"{k:>10}: {v:8.2f} prompts/s")
    print(f"official / memfilter: {result['official_over_memfilter']:.1f}x (target >= 30x); memfilter / floor: "
          f"{result['memfilter_over_floor']:.2f}x (target <= 1.3x)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
