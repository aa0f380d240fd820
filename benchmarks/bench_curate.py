"""Samples/s of the curation pass against the bare model work it needs, side by side in one run.

    python benchmarks/bench_curate.py                      # 256 JPEGs, tiny SD model, 1-2 min on 2 cores
    python benchmarks/bench_curate.py --samples 512 --workers 1 --json out/curate.json

Both variants score the same images with the same model and the same (timesteps x draws):
- `pass`: filtering.curate.score_chunks over an imagefolder of JPEGs, as `memfilter-curate` runs it: reading and
  decoding in the dataloader (`--workers`), the deterministic transform, tokenization, per-(key, draw) seeded noise,
  the item hashes, one Parquet part per chunk written atomically;
- `bare`: only the model work on batches prepared before the clock starts: VAE encode, text encode, and per
  (timestep, draw) the conditional and unconditional denoiser forwards (filtering.signal.text_noise_magnitude),
  with noise from one generator.
They run in alternating rounds; the medians and their ratio (pass time / bare time; the target is at most 1.2 on
CPU with the tiny model) are printed. Nothing here fails on timing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def write_images(root: Path, n: int, size: int) -> None:
    """n JPEGs (smooth colour fields with noise, as photos compress) with captions in metadata.jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        base = rng.uniform(0, 255, 3)
        grad = np.linspace(0, 60, size)[None, :, None]
        img = np.clip(base + grad + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"img{i:05d}.jpg", quality=90)
        rows.append({"file_name": f"img{i:05d}.jpg", "text": f"a photo number {i} of a coloured field"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def bare_batches(source, collate, batch_size: int) -> list[dict]:
    samples = [source[i] for i in range(len(source))]
    return [collate(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]


def time_bare(scorer, batches: list[dict]) -> float:
    """The model work alone: VAE and text encoders, and two denoiser forwards per (timestep, draw)."""
    from memfilter.filtering.signal import text_noise_magnitude

    fam, a = scorer.family, scorer.args
    steps = [t for _ in range(a.draws) for t in a.timesteps]
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            b = len(batch["keys"])
            latents = fam.encode_images(batch["pixel_values"], sample=False)
            text = fam.encode_text({k: batch[k] for k in scorer.tokenizers})
            sizes = {"resolution": scorer.resolution, "original_sizes": batch["original_sizes"],
                     "crop_top_lefts": batch["crop_top_lefts"]}
            cond, uncond = fam.unet_kwargs(text, **sizes), fam.uncond_like(scorer.empty, b, **sizes)
            for t in steps:
                tt = torch.full((b,), t)
                x = scorer.sched.add_noise(latents, torch.randn(latents.shape, generator=gen), tt)
                text_noise_magnitude(scorer.unet, x, tt, uncond, cond=cond)
    return time.perf_counter() - t0


def time_pass(source, plan, scorer, collate, root: Path, round_: int) -> float:
    from memfilter.filtering.curate import score_chunks

    out = root / f"pass-{round_}"
    t0 = time.perf_counter()
    score_chunks(source, plan, list(range(plan["chunks"])), scorer, collate, out)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--image-size", type=int, default=96, help="JPEG side in pixels (resized to --resolution)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from memfilter.filtering.curate import ScoreArgs, Scorer, make_plan
    from memfilter.train.data.collate import CollateForTraining
    from memfilter.train.data.imagefolder import ImageFolderSource
    from memfilter.train.data.transforms import ImageTransform
    from memfilter.train.families import build_tiny, get_family

    family = get_family(build_tiny(resolution=args.resolution))
    score = ScoreArgs(batch_size=args.batch_size, num_workers=args.workers, chunk_size=args.samples // 4)
    scorer = Scorer(family, score, args.resolution, torch.device("cpu"))
    collate = CollateForTraining(family.tokenize_fn(), ImageTransform(args.resolution, center_crop=True))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_images(root / "images", args.samples, args.image_size)
        source = ImageFolderSource(root / "images")
        plan = make_plan(source, score.chunk_size)
        batches = bare_batches(source, collate, args.batch_size)
        times = {"pass": [], "bare": []}
        for r in range(args.rounds):
            times["pass"].append(time_pass(source, plan, scorer, collate, root, r))
            times["bare"].append(time_bare(scorer, batches))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"samples": args.samples, "timesteps": score.timesteps, "draws": score.draws, "workers": args.workers,
              "batch_size": args.batch_size, "resolution": args.resolution,
              "samples_per_s": {k: args.samples / v for k, v in med.items()},
              "seconds": times, "ratio_pass_over_bare": med["pass"] / med["bare"]}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
