"""What chunked nearest-neighbour search costs: `nearest_neighbours` next to one plain matrix product.

    python benchmarks/bench_nn_search.py        # Q=1000 x N=200k x 512, then 1M memory; ~1 min on 2 CPU cores
    python benchmarks/bench_nn_search.py --device cuda --database 1000000 --memory-database 10000000
    python benchmarks/bench_nn_search.py --json

Throughput: generations x training descriptors compared per second, for
- `plain`: `(q @ db.T).max(1)`, one [Q, N] float32 matrix (Q x N x 4 bytes: 0.8 GB at the defaults),
  the fastest exact answer when it fits;
- `chunked k=1` and `chunked k=10`: `evaluation.replication.nearest_neighbours` with its defaults
  (blocks of 1024 queries x 65536 training rows, a running top-k merge).
Same random unit vectors for all; the variants alternate over repeats and the medians are compared.
The chunked answers are checked against the plain ones (same indices).

Memory: a database of `--memory-database` rows (1M x 512 float32 = 2 GB, held in memory as the
evaluation holds it) is searched with chunked k=1; the figure is the peak RSS above the RSS before
the search (Linux: the kernel's VmHWM high-water mark, reset through /proc/self/clear_refs; elsewhere
a thread samples the RSS each millisecond). On CUDA it is torch.cuda.max_memory_allocated above the
allocated bytes before. The plain product would need Q x N x 4 bytes for its matrix alone.
Nothing here asserts on time: the figures are for a person.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from memfilter.evaluation.replication import nearest_neighbours  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_rss import PeakRss  # noqa: E402

GiB, MiB = 2 ** 30, 2 ** 20


def unit_rows(n: int, dim: int, seed: int, device: torch.device, block: int = 65536) -> torch.Tensor:
    """[n, dim] random unit vectors, made a block at a time (no full-size temporaries)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, dim, device=device)
    for s in range(0, n, block):
        out[s:s + block] = F.normalize(torch.randn(min(block, n - s), dim, generator=g), dim=1).to(device)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain(q: torch.Tensor, db: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (q @ db.T).max(dim=1)                                           # [Q, N] at once


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def throughput(args: argparse.Namespace, device: torch.device) -> dict:
    q = unit_rows(args.queries, args.dim, 0, device)                       # [Q, D]
    db = unit_rows(args.database, args.dim, 1, device)                     # [N, D]
    variants = {"plain": lambda: plain(q, db),
                "chunked k=1": lambda: nearest_neighbours(q, db, k=1, chunk_size=args.chunk_size),
                "chunked k=10": lambda: nearest_neighbours(q, db, k=10, chunk_size=args.chunk_size)}
    plain(q[:8], db[:4096])                                                # warm-up on a slice
    nearest_neighbours(q[:8], db[:4096], k=10)
    times: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    for r in range(args.repeats):
        for name in (order if r % 2 == 0 else order[::-1]):
            times[name].append(timed(variants[name], device))
    _, ref_i = plain(q, db)
    _, got_i = nearest_neighbours(q, db, k=1, chunk_size=args.chunk_size)
    pairs = args.queries * args.database
    rows = {k: {"seconds": statistics.median(v), "pairs_per_second": pairs / statistics.median(v)}
            for k, v in times.items()}
    return {"queries": args.queries, "database": args.database, "dim": args.dim, "repeats": args.repeats,
            "variants": rows, "ratio_chunked_k1_vs_plain": rows["chunked k=1"]["pairs_per_second"]
            / rows["plain"]["pairs_per_second"],
            "ratio_chunked_k10_vs_plain": rows["chunked k=10"]["pairs_per_second"] / rows["plain"]["pairs_per_second"],
            "same_answers": bool(torch.equal(ref_i.cpu(), got_i[:, 0])),
            "plain_matrix_bytes": pairs * 4}


def memory(args: argparse.Namespace, device: torch.device) -> dict:
    q = unit_rows(args.queries, args.dim, 0, device)
    db = unit_rows(args.memory_database, args.dim, 2, device)              # [N, D]: 2 GB at 1M x 512
    nearest_neighbours(q[:8], db[:4096], k=1)                              # load kernels outside the window
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        seconds = timed(lambda: nearest_neighbours(q, db, k=1, chunk_size=args.chunk_size), device)
        growth, how = torch.cuda.max_memory_allocated(device) - base, "torch.cuda.max_memory_allocated above before"
    else:
        with PeakRss() as rss:
            base = rss.rss()
            seconds = timed(lambda: nearest_neighbours(q, db, k=1, chunk_size=args.chunk_size), device)
        growth, how = rss.peak - base, "peak RSS above the RSS before the search"
    n = args.memory_database
    block = min(args.queries, 1024) * min(args.chunk_size, n) * 4
    return {"queries": args.queries, "database": n, "dim": args.dim, "database_bytes": db.numel() * 4,
            "search_seconds": seconds, "pairs_per_second": args.queries * n / seconds,
            "peak_growth_bytes": growth, "measured_as": how, "block_bytes": block,
            "plain_matrix_bytes": args.queries * n * 4}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--queries", type=int, default=1000, help="generations Q (default 1000)")
    p.add_argument("--database", type=int, default=200_000, help="training descriptors N for throughput (default 200k)")
    p.add_argument("--memory-database", type=int, default=1_000_000,
                   help="N for the memory run; 0 skips it (default 1M)")
    p.add_argument("--dim", type=int, default=512, help="descriptor size D (default 512, sscd_disc_mixup)")
    p.add_argument("--chunk-size", type=int, default=65536, help="database rows per block (default 65536)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (default 3)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args()
    device = torch.device(args.device)

    result = {"device": str(device), "torch_threads": torch.get_num_threads(), "throughput": throughput(args, device)}
    if args.memory_database:
        result["memory"] = memory(args, device)
    if args.json:
        print(json.dumps(result, indent=1))
        return

    t = result["throughput"]
    print(f"\nnearest-neighbour search, Q={t['queries']} x N={t['database']:,} x D={t['dim']} on {device} "
          f"({result['torch_threads']} threads), median of {t['repeats']}")
    print(f"{'variant':<14}{'seconds':>10}{'pairs/s':>12}{'vs plain':>10}")
    for name, r in t["variants"].items():
        ratio = r["pairs_per_second"] / t["variants"]["plain"]["pairs_per_second"]
        print(f"{name:<14}{r['seconds']:>10.3f}{r['pairs_per_second']:>12.3g}{ratio:>10.2f}")
    print(f"chunked k=1 / plain throughput: {t['ratio_chunked_k1_vs_plain']:.2f}  "
          f"(same nearest neighbours: {'yes' if t['same_answers'] else 'NO'}; plain held a "
          f"{t['plain_matrix_bytes'] / MiB:,.0f} MiB [Q, N] matrix)")
    if "memory" in result:
        m = result["memory"]
        print(f"\nmemory, chunked k=1, Q={m['queries']} x N={m['database']:,} x D={m['dim']} "
              f"(database {m['database_bytes'] / GiB:.2f} GiB, searched in {m['search_seconds']:.1f} s, "
              f"{m['pairs_per_second']:.3g} pairs/s)")
        print(f"  peak growth during the search: {m['peak_growth_bytes'] / MiB:,.0f} MiB ({m['measured_as']})")
        print(f"  one similarity block [<=1024, {args.chunk_size}] float32: {m['block_bytes'] / MiB:,.0f} MiB")
        print(f"  a plain product would need Q x N x 4 = {m['plain_matrix_bytes'] / GiB:.2f} GiB for its matrix alone")


if __name__ == "__main__":
    main()
