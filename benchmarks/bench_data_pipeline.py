"""Samples/s of the webdataset pipeline with 0, 1 and 2 dataloader workers, against plain decode loops.

    python benchmarks/bench_data_pipeline.py                          # 2048 JPEGs 256 px, 1-2 min on 2 cores
    python benchmarks/bench_data_pipeline.py --resolution 128 --workers 0,1,2,4
    python benchmarks/bench_data_pipeline.py --torch-threads 1                # a shared machine
    python benchmarks/bench_data_pipeline.py --data-dir /tmp/bench-shards --json out/data_pipeline.json

The script writes its own shards (webdataset.TarWriter, K shards plus shards.json, as the prep CLI
lays them out): N JPEGs (quality 90) that compress like photos (a smooth colour field, a gradient
and sensor-like noise), each with a caption of 8-16 words and a json with dup_group. With
--data-dir it reuses the shards already there, or writes them there.

What is timed, one epoch each, over the same JPEG bytes:
- `decode`: the floor. A plain loop over the JPEG bytes, already in memory (read from the tars
  untimed), `Image.open(...).convert("RGB")` + `.load()`; no resize, no tensor.
- `decode, block cache`: the same loop with Pillow's freed-block cache on (IMAGE_BLOCKS blocks), as the
  pipeline decodes (`reuse_image_memory`): Pillow's default returns every image's memory to the OS and
  faults it in again, which is a large share of a plain loop's time. The pipeline's ratio is printed
  against both loops.
- `decode+transform`: the unavoidable per-image work of training. The same loop plus the project's
  `ImageTransform(resolution)` (resize the short side, centre crop, to a [-1,1] float tensor [3,H,W]).
  It runs in this process with torch's intra-op thread count; where that is above 1 the loop is also
  timed with 1 thread (what a dataloader worker uses: torch sets 1 thread in workers).
- `pipeline w=N`: the training loop's data path. `WebDatasetSource` bound with
  `CollateForTraining(build_tiny_tokenizer(), ImageTransform(resolution))`, read through
  `DataLoader(src, batch_size=None, num_workers=N)` exactly as `train/loop.py` does. Its cost includes
  everything `decode+transform` does plus the pipeline's own: tar reading (page cache, the shards are
  fresh), the seeded shard shuffle and shuffle buffer (filled before the first sample comes out),
  the source's load_image checks (header pixel count, EXIF transpose), caption and json parsing,
  CLIP tokenization (transformers' CLIPTokenizer, padded to 77), stacking the batch and, with
  workers, their start-up (fork by default on Linux) and passing each batch back through shared memory
  (each batch released when the next is taken, as the loop's data stream does, so that the workers refill
  their PixelRing segments).
  `total` counts the whole epoch from creating the DataLoader iterator to the last batch, start-up
  and the shuffle-buffer fill included; `steady` leaves out the first batch of each worker
  (the first max(1, N) batches) and times from its arrival to the end.

Besides samples/s the table gives, per variant, the CPU time of this process and its workers per
sample (`cpu ms/sample`: what the work costs, less sensitive to other load than samples/s, though
threads that spin while they wait inflate it) and the cores that other processes kept busy meanwhile
(`others`, from /proc/stat). On a shared machine read `others` first: torch's intra-op threads in the
main process (decode+transform, pipeline w=0) slow down many times over when a core is taken by
someone else; --torch-threads 1 takes that effect out.

Ratios: pipeline samples/s over decode samples/s (and over decode+transform). Above 1 means the
workers together outrun a single-threaded decode loop. On a machine with C cores, N workers share
them with the main process (which only receives batches here, no training step); on 2 cores,
2 workers cannot give 2x. Variants run in rounds in one process (decode, decode+transform,
pipeline w=0, 1, 2, then again), so drift hits all alike; the tables give the median over rounds.
Nothing here fails on timing: the figures are printed for a person to judge.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from memfilter.train.data.collate import CollateForTraining, release_pixels  # noqa: E402
from memfilter.train.data.transforms import IMAGE_BLOCKS, ImageTransform  # noqa: E402
from memfilter.train.data.wds import WebDatasetSource  # noqa: E402
from memfilter.train.tokenizer import DEFAULT_WORDS, build_tiny_tokenizer  # noqa: E402

KiB = 1024


# -- data ---------------------------------------------------------------------------------------------
def photo_like_jpeg(rng: np.random.Generator, size: int, quality: int) -> bytes:
    """A JPEG that compresses like a photo: low-frequency colour blobs + a gradient + grain."""
    low = rng.integers(0, 256, (rng.integers(3, 9), rng.integers(3, 9), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC), dtype=np.float32)
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    img += ramp[None, :, None] * rng.uniform(-60, 60, 3).astype(np.float32)        # [H, W, 3]
    img += ramp[:, None, None] * rng.uniform(-60, 60, 3).astype(np.float32)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(2, 8))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_shards(folder: Path, n: int, n_shards: int, size: int, quality: int, seed: int) -> str:
    """n samples (jpg, txt, json) in n_shards tars plus shards.json; returns the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    table, i = {}, 0
    per = [n // n_shards + (s < n % n_shards) for s in range(n_shards)]
    with tqdm(total=n, desc="writing shards", leave=False) as bar:
        for s, count in enumerate(per):
            name = f"shard-{s:06d}.tar"
            with wds.TarWriter(str(folder / name), mtime=0) as w:   # integer mtime, as prep writes: no pax headers
                for _ in range(count):
                    caption = " ".join(rng.choice(DEFAULT_WORDS, int(rng.integers(8, 17))))
                    w.write({"__key__": f"{i:07d}", "jpg": photo_like_jpeg(rng, size, quality), "txt": caption,
                             "json": json.dumps({"dup_group": -1})})
                    i += 1
                    bar.update()
            table[name] = count
    (folder / "shards.json").write_text(json.dumps(table))
    return pattern_of(folder, n_shards)


def pattern_of(folder: Path, n_shards: int) -> str:
    return str(folder / f"shard-{{000000..{n_shards - 1:06d}}}.tar")


def existing_shards(folder: Path) -> tuple[str, int] | None:
    """(pattern, samples) of shards this script wrote earlier into folder, or None."""
    counts = folder / "shards.json"
    if not counts.exists():
        return None
    table = json.loads(counts.read_text())
    names = [f"shard-{s:06d}.tar" for s in range(len(table))]
    if sorted(table) != names or not all((folder / n).exists() for n in names):
        return None
    return pattern_of(folder, len(names)), sum(table.values())


def read_jpegs(folder: Path) -> list[bytes]:
    """The JPEG bytes of every sample, in tar order (untimed: the plain loops start from memory)."""
    out = []
    for tar in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                if m.isfile() and m.name.endswith(".jpg"):
                    out.append(tf.extractfile(m).read())
    return out


# -- the timed loops ------------------------------------------------------------------------------------
class CpuMeter:
    """CPU cores used during a `with` block: by this process and its reaped children (`own`, the
    dataloader workers are joined when their epoch ends), and by everything else on the machine
    (`others`, from /proc/stat; None off Linux). A shared machine shows up in `others`."""

    def __enter__(self) -> "CpuMeter":
        self._t0, self._own0, self._busy0 = time.perf_counter(), self._own(), self._busy()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._t0
        own = self._own() - self._own0
        busy = self._busy()
        self.own, self.own_seconds = own / wall, own
        self.others = None if busy is None or self._busy0 is None else max(0.0, (busy - self._busy0 - own) / wall)

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    @staticmethod
    def _busy() -> float | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def measured(fn) -> dict:
    """fn() with the CPU figures of its run added."""
    with CpuMeter() as cpu:
        out = fn()
    return {**out, "own_cores": cpu.own, "other_cores": cpu.others,
            "cpu_ms_per_sample": 1e3 * cpu.own_seconds / out["samples"]}


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image.load()
    return image


@contextlib.contextmanager
def pillow_blocks(blocks: int):
    """Pillow's freed-block cache set to `blocks` inside, restored after (Pillow's default is 0: no cache)."""
    before = Image.core.get_blocks_max()
    Image.core.set_blocks_max(blocks)
    try:
        yield
    finally:
        Image.core.set_blocks_max(before)


def plain_loop(jpegs: list[bytes], transform: ImageTransform | None, threads: int | None = None,
               blocks: int = 0) -> dict:
    """Samples/s of decoding (and transforming) every JPEG in this process, with Pillow's block cache at
    `blocks` (default 0, Pillow's default: a plain loop)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with pillow_blocks(blocks):
            t0 = time.perf_counter()
            for i, data in enumerate(jpegs):
                image = decode(data)
                if transform is not None:
                    transform(image, f"{i:07d}", 0)
            seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)
    return {"samples": len(jpegs), "seconds": seconds, "samples_per_s": len(jpegs) / seconds}


def pipeline_epoch(pattern: str, workers: int, args: argparse.Namespace) -> dict:
    """One epoch of the training loop's data path; total and steady-state samples/s. The source turns on Pillow's
    block cache where it decodes (reuse_image_memory); with w=0 that is this process, restored afterwards so that
    the plain loops stay plain."""
    with pillow_blocks(Image.core.get_blocks_max()):
        return _pipeline_epoch(pattern, workers, args)


def _pipeline_epoch(pattern: str, workers: int, args: argparse.Namespace) -> dict:
    src = WebDatasetSource(pattern, seed=args.seed, shuffle_buffer=args.shuffle_buffer)
    src.bind(CollateForTraining(build_tiny_tokenizer(), ImageTransform(args.resolution)),
             rank=0, world_size=1, batch_size=args.batch_size)
    src.set_epoch(0)
    loader = DataLoader(src, batch_size=None, num_workers=workers,
                        multiprocessing_context=args.mp_context if workers else None)
    warm = max(1, workers)             # the first batch of each worker carries its start-up
    arrivals, samples = [], []
    t0 = time.perf_counter()
    for batch in loader:
        arrivals.append(time.perf_counter() - t0)
        samples.append(len(batch["keys"]))
        release_pixels(batch)          # as the loop's data stream does when it takes the next batch (PixelRing)
    total_s = arrivals[-1]
    n = sum(samples)
    steady_n, steady_s = sum(samples[warm:]), total_s - arrivals[warm - 1]
    return {"samples": n, "batches": len(samples), "seconds": total_s, "samples_per_s": n / total_s,
            "first_batch_s": arrivals[0],
            "steady_samples_per_s": steady_n / steady_s if steady_n and steady_s > 0 else float("nan")}


# -- driver -----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--samples", type=int, default=2048, help="JPEGs to write (ignored when --data-dir has shards)")
    p.add_argument("--shards", type=int, default=16, help="tar shards to spread them over")
    p.add_argument("--image-size", type=int, default=256, help="JPEG width and height")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--data-dir", type=Path, help="reuse the shards there, or write them there; default a temp dir")
    p.add_argument("--resolution", type=int, default=256,
                   help="ImageTransform output size (below --image-size adds a bicubic resize)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per batch")
    p.add_argument("--shuffle-buffer", type=int, default=1000, help="WebDatasetSource shuffle buffer (its default)")
    p.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2],
                   help="dataloader worker counts to time, comma-separated")
    p.add_argument("--mp-context", default=None, choices=[None, "fork", "spawn", "forkserver"],
                   help="worker start method; default torch's (the platform's)")
    p.add_argument("--torch-threads", type=int,
                   help="intra-op threads of this process (decode+transform, pipeline w=0); default torch's. "
                        "Dataloader workers always run with 1 (torch sets it)")
    p.add_argument("--rounds", type=int, default=2, help="times every variant runs; tables show the median")
    p.add_argument("--seed", type=int, default=0, help="image content, captions and pipeline shuffle")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory(prefix="bench-wds-") as tmp:
        folder = args.data_dir or Path(tmp)
        pattern, n = _shards(folder, args)
        jpegs = read_jpegs(folder)
        threads, cores = torch.get_num_threads(), os.cpu_count()
        mp = args.mp_context or torch.multiprocessing.get_start_method()
        setup = _describe_setup(folder, n, jpegs, args, threads, cores, mp)
        print(f"data pipeline: {setup}", file=sys.stderr)
        runs = _time_in_rounds(_variants(jpegs, pattern, args, threads), args.rounds)

    med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
           for v, rs in runs.items()}
    _print_table(setup, args.rounds, med)
    busiest = max((m.get("other_cores", 0.0) for m in med.values()), default=0.0)
    if busiest > 0.25:
        print(f"warning: other processes kept up to {busiest:.2f} of {cores} cores busy during the epochs; "
              "the figures are not those of a quiet machine (threaded torch ops suffer most)")
    derived = _print_ratios(med, cores)

    result = {"setup": setup, "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                         if k != "json"},
              "torch": torch.__version__, "cpu_count": cores, "torch_threads": threads, "mp_context": mp,
              "max_other_cores": busiest, "runs": runs, "median": med, **derived}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


def _shards(folder: Path, args: argparse.Namespace) -> tuple[str, int]:
    """(pattern, samples) of the shards in folder, written first unless an earlier run left them there."""
    found = existing_shards(folder)
    if found is None:
        t0 = time.perf_counter()
        write_shards(folder, args.samples, args.shards, args.image_size, args.quality, args.seed)
        found = existing_shards(folder)
        print(f"wrote {found[1]} samples in {time.perf_counter() - t0:.1f}s to {folder}", file=sys.stderr)
    return found


def _describe_setup(folder: Path, n: int, jpegs: list[bytes], args: argparse.Namespace, threads: int,
                    cores: int | None, mp: str) -> str:
    """One line on the data and the machine, printed before and after the timings and kept in the json."""
    with Image.open(io.BytesIO(jpegs[0])) as im:
        size = im.size
    return (f"{n} JPEGs {size[0]}x{size[1]} (mean {np.mean([len(j) for j in jpegs]) / KiB:.1f} KiB) in "
            f"{len(list(folder.glob('shard-*.tar')))} shards; resolution {args.resolution}, batch "
            f"{args.batch_size}, shuffle buffer {args.shuffle_buffer}; {cores} CPU cores, torch "
            f"{torch.__version__} with {threads} intra-op thread(s), workers start by {mp}")


def _variants(jpegs: list[bytes], pattern: str, args: argparse.Namespace, threads: int) -> dict:
    """Variant name -> one timed epoch; the plain loops first, as the tables list them."""
    transform = ImageTransform(args.resolution)
    variants = {"decode": lambda: plain_loop(jpegs, None),
                "decode, block cache": lambda: plain_loop(jpegs, None, blocks=IMAGE_BLOCKS),
                "decode+transform": lambda: plain_loop(jpegs, transform)}
    if threads > 1:
        variants["decode+transform 1 thread"] = lambda: plain_loop(jpegs, transform, threads=1)
    for w in args.workers:
        variants[f"pipeline w={w}"] = lambda w=w: pipeline_epoch(pattern, w, args)
    return variants


def _time_in_rounds(variants: dict, rounds: int) -> dict[str, list[dict]]:
    """Every variant once per round, round after round, so drift in the machine's load hits all alike."""
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    with tqdm(total=rounds * len(variants), desc="epochs", leave=False) as bar:
        for _ in range(rounds):
            for name, fn in variants.items():
                runs[name].append(measured(fn))
                bar.update()
    return runs


def _print_table(setup: str, rounds: int, med: dict[str, dict]) -> None:
    """The median figures of every variant, against the decode floor and the decode+transform loop."""
    floor, unavoidable = med["decode"]["samples_per_s"], med["decode+transform"]["samples_per_s"]
    print(f"\ndata pipeline: {setup}; median of {rounds} round(s)")
    print(f"{'variant':<26} {'samples/s':>10} {'steady/s':>9} {'1st batch':>10} {'epoch':>8} "
          f"{'/decode':>8} {'/dec+tf':>8} {'cpu ms/sample':>13} {'own cpu':>8} {'others':>7}")
    for v, m in med.items():
        steady = f"{m['steady_samples_per_s']:>9.0f}" if "steady_samples_per_s" in m else f"{'':>9}"
        first = f"{m['first_batch_s']:>9.2f}s" if "first_batch_s" in m else f"{'':>10}"
        others = f"{m['other_cores']:>7.2f}" if "other_cores" in m else f"{'-':>7}"
        print(f"{v:<26} {m['samples_per_s']:>10.0f} {steady} {first} {m['seconds']:>7.2f}s "
              f"{m['samples_per_s'] / floor:>7.2f}x {m['samples_per_s'] / unavoidable:>7.2f}x "
              f"{m['cpu_ms_per_sample']:>13.2f} {m['own_cores']:>8.2f} {others}")
    print("(cpu ms/sample: CPU time of this process and its workers per sample, less sensitive to other load "
          "than samples/s; own cpu, others: cores busy during the epoch in this process and its workers, "
          "and in other processes on the machine)")


def _print_ratios(med: dict[str, dict], cores: int | None) -> dict:
    """Prints the pipeline's speed against the plain loops and its own cost per sample; returns those
    figures under their keys in the json."""
    floor, unavoidable = med["decode"]["samples_per_s"], med["decode+transform"]["samples_per_s"]
    cached = med["decode, block cache"]["samples_per_s"]
    ratios = {v: {"total": m["samples_per_s"] / floor, "steady": m["steady_samples_per_s"] / floor,
                  "total_vs_decode_block_cache": m["samples_per_s"] / cached,
                  "steady_vs_decode_block_cache": m["steady_samples_per_s"] / cached,
                  "total_vs_decode_transform": m["samples_per_s"] / unavoidable}
              for v, m in med.items() if v.startswith("pipeline")}
    print("ratio pipeline/decode (samples/s; total, steady): "
          + "; ".join(f"{v.split()[-1]}: {r['total']:.2f}x, {r['steady']:.2f}x" for v, r in ratios.items()))
    print("ratio pipeline/decode with Pillow's block cache, as the pipeline decodes (total, steady): "
          + "; ".join(f"{v.split()[-1]}: {r['total_vs_decode_block_cache']:.2f}x, "
                      f"{r['steady_vs_decode_block_cache']:.2f}x" for v, r in ratios.items()))
    per_sample_ms = {v: 1e3 / m["samples_per_s"] for v, m in med.items()}
    overhead = {v: per_sample_ms[v] - per_sample_ms["decode+transform"] for v in ratios}
    cpu_overhead = {v: med[v]["cpu_ms_per_sample"] - med["decode+transform"]["cpu_ms_per_sample"] for v in ratios}
    print(f"per sample: decode {per_sample_ms['decode']:.2f} ms, decode+transform "
          f"{per_sample_ms['decode+transform']:.2f} ms"
          + (f" ({per_sample_ms['decode+transform 1 thread']:.2f} ms with 1 torch thread)"
             if "decode+transform 1 thread" in per_sample_ms else "")
          + "; pipeline w=0 " + (f"{per_sample_ms['pipeline w=0']:.2f} ms, of it "
                                 f"{overhead['pipeline w=0']:.2f} ms pipeline overhead in one process "
                                 f"({cpu_overhead['pipeline w=0']:.2f} CPU-ms)"
                                 if "pipeline w=0" in overhead else "not timed"))
    print("(pipeline = tar reading, shuffle, checks, captions, tokenization, collate and, with workers, "
          f"start-up and IPC, on top of decode+transform; {cores} cores shared by the workers and the main process)")
    return {"ratios_vs_decode": ratios, "per_sample_ms": per_sample_ms, "overhead_ms_per_sample": overhead,
            "overhead_cpu_ms_per_sample": cpu_overhead}

if __name__ == "__main__":
    main()
