"""A policy simulator: synthetic per-sample signal streams, replayed through the real filter policies.

    python benchmarks/sim_policies.py                                  # every regime, seeds 0,1,2
    python benchmarks/sim_policies.py --regimes toy,harmless --seeds 0
    python benchmarks/sim_policies.py --out docs/results/sim_policies.json

No model is trained. A stream of samples is drawn from the signal model below (vectorised, with torch), then
each policy (`filtering.policies.build_policy`) decides on it global batch by global batch through its own
`decide(magnitudes, timesteps, groups=ids, losses=..., base_losses=..., base_magnitudes=...)`, exactly as the
training loop calls it. What the simulator measures is then only what the policy does with signals of a known
ground truth: which items memorize, which only repeat.

Signal model (per item i, per sample s of item i at position k among i's appearances so far):

- items: `dup` *memorizing* duplicated items and `harmless` repeated items, each `repeats` times per epoch, and
  `unique` items once per epoch. Each epoch is a random permutation of all its appearances (a shuffled
  dataset); the epochs are concatenated. Item ids are 1, 2, ... (int64, never 0).
- difficulty: d_i ~ N(0, 0.4^2), one per item, shared by the base and the fine-tuned model (the per-image
  correlation of both models' signals: an easy image is easy for both).
- timestep: t ~ U{0, ..., 999}.
- base model: loss_base = (0.2 - 0.15 t/1000) exp(d_i + 0.6 n1),  m_base = (1 + t/1000) exp(-d_i + 0.4 n2).
- fine-tuned model, at the same input: loss = loss_base exp(0.15 n3) f_loss,  m = m_base exp(0.1 n4) f_m,
  with n1..n4 ~ N(0, 1) independent per sample, and
    f_loss = 0.97, f_m = 1 for unique and harmless items (a population-wide improvement of the loss, no
      magnitude change) and for memorizing items before they memorize;
    for a memorizing item, from its `hot_after`-th earlier exposure on (default 10), a ramp r = (k - hot_after +
      1) / ramp, clipped to [0, 1] (ramp default 10 exposures; --ramp 0: a step at k = hot_after) gives
      f_loss = 0.97 + (0.6 - 0.97) r and f_m = 1 + 0.5 r: fully memorized, loss 0.6x and m 1.5x the base's.
  Harmless repeated items repeat as often as memorizing ones and never shift.

Regimes (`REGIMES`): `toy` (the demo's world), `batch-1/4/32/2048` (one toy stream of 3 epochs replayed at four
global batch sizes: the decisions should not depend on the batch), `wen` (Wen et al.'s 120k unique + 200 items x
200), `web` (1M unique + 20 items x 100 copies at batch 2048), `multi-epoch` (200 clean items x 30 epochs) and
`harmless` (24 harmless repeated items, none memorizing). `--scale` shrinks the unique items (and the duplicated
item count, never below 20) of the two large regimes; the factor used is printed and saved, never implied.

Per regime and policy it reports: duplicated (memorizing) items flagged / total (flagged = at least half of its
last 20% of appearances dropped, or, for a policy that keeps one, its own flag for the item at the end: item's
flag, count's count > max_count), duplicated samples dropped %, unique samples dropped %, harmless repeated
samples kept %, harmless items flagged, wall seconds of the replay, and the state: items tracked and bytes of the
state_dict's tensors. Seeds give mean and spread (sample standard deviation and the min..max range).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from memfilter.filtering.policies import build_policy


@dataclass(frozen=True)
class World:
    """One stream's items and epochs; see the module docstring for the signal model."""
    unique: int
    dup: int = 0
    repeats: int = 0
    harmless: int = 0
    epochs: int = 1
    hot_after: int = 10
    ramp: int = 10


@dataclass(frozen=True)
class Regime:
    world: World
    batch: int
    stream: str          # regimes with the same stream name (and seed) replay the very same samples
    scalable: bool = False
    note: str = ""


TOY = World(unique=1200, dup=8, repeats=75, epochs=9)
TOY3 = replace(TOY, epochs=3)
REGIMES = {
    "toy": Regime(TOY, 32, "toy", note="the demo's default world"),
    **{f"batch-{b}": Regime(TOY3, b, "toy3", note="the toy stream of 3 epochs at another global batch")
       for b in (1, 4, 32, 2048)},
    "wen": Regime(World(unique=120_000, dup=200, repeats=200), 8, "wen", True, "Wen et al.'s protocol"),
    "web": Regime(World(unique=1_000_000, dup=20, repeats=100), 2048, "web", True, "web scale, one epoch"),
    "multi-epoch": Regime(World(unique=200, epochs=30), 16, "multi-epoch", note="clean data, 30 epochs"),
    "harmless": Regime(replace(TOY, dup=0, harmless=24), 32, "harmless",
                       note="24 harmless repeated items x 75, none memorizing"),
}

# name in the report -> (build_policy name, settings)
POLICIES = {
    "item": ("item", {}),
    "item-population": ("item", {"null": "population"}),
    "count": ("count", {}),
    "agc": ("agc", {}),
    "timestep": ("timestep", {}),
}

UNIQUE, MEMORIZING, HARMLESS = 0, 1, 2


def scaled(world: World, scale: float) -> World:
    """`world` with scale x its unique items and duplicated items (at least 20, or all if fewer), same repeats."""
    if scale == 1.0:
        return world
    dup = min(world.dup, max(20, round(world.dup * scale)))
    return replace(world, unique=max(1, round(world.unique * scale)), dup=dup)


def make_stream(world: World, seed: int) -> dict:
    """The samples of `world` in training order, drawn with `seed`: dict of [S] tensors (item ids, kind of item,
    exposure index, t, losses, magnitudes of the fine-tuned and base models)."""
    g = torch.Generator().manual_seed(seed)
    repeated = world.dup + world.harmless
    n_items = repeated + world.unique
    kind = torch.full((n_items,), UNIQUE, dtype=torch.long)
    kind[:world.dup] = MEMORIZING
    kind[world.dup:repeated] = HARMLESS
    epoch = torch.cat([torch.arange(repeated).repeat_interleave(world.repeats), torch.arange(repeated, n_items)])
    order = torch.cat([epoch[torch.randperm(epoch.numel(), generator=g)] for _ in range(world.epochs)])  # item index
    s = order.numel()
    # k: how many times the item appeared before this sample
    counts = torch.bincount(order, minlength=n_items)
    starts = torch.cumsum(counts, 0) - counts
    by_item = torch.sort(order, stable=True).indices
    k = torch.empty(s, dtype=torch.long)
    k[by_item] = torch.arange(s) - starts[order[by_item]]

    difficulty = 0.4 * torch.randn(n_items, generator=g, dtype=torch.float64)
    d = difficulty[order]
    t = torch.randint(0, 1000, (s,), generator=g)
    n1, n2, n3, n4 = torch.randn(4, s, generator=g, dtype=torch.float64)
    tf = t.double() / 1000
    base_loss = (0.2 - 0.15 * tf) * torch.exp(d + 0.6 * n1)
    base_m = (1.0 + tf) * torch.exp(-d + 0.4 * n2)
    if world.ramp > 0:
        r = ((k - world.hot_after + 1).double() / world.ramp).clamp(0.0, 1.0)
    else:
        r = (k >= world.hot_after).double()
    r = torch.where(kind[order] == MEMORIZING, r, torch.zeros_like(r))
    loss = base_loss * torch.exp(0.15 * n3) * (0.97 + (0.6 - 0.97) * r)
    m = base_m * torch.exp(0.1 * n4) * (1.0 + 0.5 * r)
    return {"item": order, "ids": order + 1, "kind": kind, "difficulty": difficulty, "k": k, "count": counts, "t": t,
            "loss": loss.float(), "base_loss": base_loss.float(), "m": m.float(), "base_m": base_m.float()}


def replay(policy, stream: dict, batch: int) -> torch.Tensor:
    """Drives `policy` through `stream` in global batches of `batch`; [S] bool keep decisions."""
    keep = torch.empty(stream["t"].numel(), dtype=torch.bool)
    for a in range(0, keep.numel(), batch):
        b = a + batch
        keep[a:b] = policy.decide(stream["m"][a:b], stream["t"][a:b], groups=stream["ids"][a:b],
                                  losses=stream["loss"][a:b], base_losses=stream["base_loss"][a:b],
                                  base_magnitudes=stream["base_m"][a:b])
    return keep


def own_flags(policy, ids: torch.Tensor) -> torch.Tensor:
    """[len(ids)] bool: the policy's own flag for each item at the end of the stream (False where it keeps none)."""
    if getattr(policy, "_items", None) is not None and policy.name == "item":
        return torch.tensor([bool(policy._items.get(int(i), [0, 0, 0])[2]) for i in ids], dtype=torch.bool)
    if policy.name == "count":
        return torch.tensor([policy._counts.get(int(i), 0) > policy.max_count for i in ids], dtype=torch.bool)
    return torch.zeros(len(ids), dtype=torch.bool)


def tensor_bytes(state) -> int:
    """Sum of the nbytes of every tensor in a (nested) state_dict."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(v) for v in state)
    return 0


def item_flags_by_drops(stream: dict, keep: torch.Tensor) -> torch.Tensor:
    """[n_items] bool: at least half of the item's last 20% of appearances (at least one) dropped."""
    count = stream["count"]
    last_n = torch.clamp(torch.ceil(0.2 * count.double()).long(), min=1)
    last = stream["k"] >= (count - last_n)[stream["item"]]
    n_items = count.numel()
    dropped_last = torch.zeros(n_items, dtype=torch.long).index_add_(0, stream["item"], (last & ~keep).long())
    return (count > 0) & (2 * dropped_last >= last_n)


def measure(stream: dict, keep: torch.Tensor, policy, seconds: float) -> dict:
    kind_of_sample = stream["kind"][stream["item"]]
    flagged = item_flags_by_drops(stream, keep)
    for kind in (MEMORIZING, HARMLESS):
        sel = (stream["kind"] == kind).nonzero().flatten()
        if sel.numel():
            flagged[sel] |= own_flags(policy, sel + 1)

    def dropped(kind):
        sel = kind_of_sample == kind
        return 100.0 * float((~keep[sel]).double().mean()) if sel.any() else None

    def items(kind):
        return int((stream["kind"] == kind).sum())

    # where the unique samples dropped are: easy vs hard images (the quarter of unique items with the lowest /
    # highest difficulty d), and the first vs the second half of each 100-step timestep bucket
    uniq = kind_of_sample == UNIQUE
    d_unique = stream["difficulty"][stream["kind"] == UNIQUE]
    lo, hi = (torch.quantile(d_unique, q) for q in (0.25, 0.75)) if d_unique.numel() else (0.0, 0.0)
    d_sample = stream["difficulty"][stream["item"]]
    late = stream["t"] % 100 >= 50

    def share(sel):
        return 100.0 * float((~keep[sel]).double().mean()) if sel.any() else None

    state = policy.state_dict()
    tracked = (len(policy._items) if policy.name == "item" else len(policy._counts) if policy.name == "count"
               else None)
    harmless_dropped = dropped(HARMLESS)
    return {
        "dup_flagged": int(flagged[stream["kind"] == MEMORIZING].sum()) if items(MEMORIZING) else None,
        "dup_items": items(MEMORIZING),
        "dup_dropped_pct": dropped(MEMORIZING),
        "unique_dropped_pct": dropped(UNIQUE),
        "harmless_kept_pct": None if harmless_dropped is None else 100.0 - harmless_dropped,
        "harmless_flagged": int(flagged[stream["kind"] == HARMLESS].sum()) if items(HARMLESS) else None,
        "harmless_items": items(HARMLESS),
        "unique_dropped_easy_pct": share(uniq & (d_sample <= lo)),
        "unique_dropped_hard_pct": share(uniq & (d_sample >= hi)),
        "unique_dropped_bucket_early_pct": share(uniq & ~late),
        "unique_dropped_bucket_late_pct": share(uniq & late),
        "seconds": seconds,
        "samples": keep.numel(),
        "us_per_sample": 1e6 * seconds / keep.numel(),
        "items_tracked": tracked,
        "state_bytes": tensor_bytes(state),
    }


CONSTANT = ("dup_items", "harmless_items", "samples")     # the same for every seed of a regime


def summarize(runs: list[dict]) -> dict:
    """Per metric: mean, sample sd, min, max over seeds (None where the metric does not apply)."""
    out = {}
    for key in runs[0]:
        vals = [r[key] for r in runs]
        if key in CONSTANT or any(v is None for v in vals):
            out[key] = None if any(v is None for v in vals) else vals[0]
            continue
        out[key] = {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                    "min": min(vals), "max": max(vals), "values": vals}
    return out


def fmt(s, digits=1) -> str:
    if s is None:
        return "-"
    if not isinstance(s, dict):
        return str(s)
    if s["sd"] == 0.0:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


def table(results: dict) -> str:
    head = ("| regime | policy | dup items flagged | dup samples dropped % | unique dropped % | harmless kept % "
            "| harmless items flagged | wall s | items tracked | state bytes |")
    lines = [head, "|" + " --- |" * 10]
    for regime, res in results["regimes"].items():
        for name, s in res["policies"].items():
            flagged = "-" if s["dup_flagged"] is None else f"{fmt(s['dup_flagged'])} / {s['dup_items']}"
            harmless_flagged = ("-" if s["harmless_flagged"] is None
                                else f"{fmt(s['harmless_flagged'])} / {s['harmless_items']}")
            lines.append(f"| {regime} | {name} | {flagged} | {fmt(s['dup_dropped_pct'])} | "
                         f"{fmt(s['unique_dropped_pct'], 2)} | {fmt(s['harmless_kept_pct'])} | {harmless_flagged} | "
                         f"{fmt(s['seconds'])} | {fmt(s['items_tracked'], 0)} | {fmt(s['state_bytes'], 0)} |")
    return "\n".join(lines)


def batch_spread(results: dict) -> dict:
    """Per policy and metric, over the batch-* regimes run: the range across batch sizes (per seed, then its mean
    and max over seeds) next to the sd across seeds at batch 32 (the noise)."""
    runs = {r: v for r, v in results["regimes"].items() if r.startswith("batch-")}
    if len(runs) < 2:
        return {}
    out = {}
    for name in next(iter(runs.values()))["policies"]:
        out[name] = {}
        for key in ("dup_flagged", "dup_dropped_pct", "unique_dropped_pct"):
            per_batch = [runs[r]["policies"][name][key]["values"] for r in runs]
            ranges = [max(v) - min(v) for v in zip(*per_batch)]
            ref = runs.get("batch-32", next(iter(runs.values())))["policies"][name][key]
            out[name][key] = {"range_mean": statistics.fmean(ranges), "range_max": max(ranges),
                              "seed_sd_at_batch_32": ref["sd"],
                              "per_batch_mean": {r: runs[r]["policies"][name][key]["mean"] for r in runs}}
    return out


def run(regimes: list[str], seeds: list[int], policies: list[str], scale: dict[str, float] | None = None,
        verbose: bool = True) -> dict:
    scale = scale or {}
    results = {"seeds": seeds, "scale": scale, "policies": {p: {"name": POLICIES[p][0], "settings": POLICIES[p][1]}
                                                            for p in policies},
               "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
               "torch": torch.__version__, "machine": platform.machine(), "regimes": {}}
    streams: dict = {}
    for regime in regimes:
        spec = REGIMES[regime]
        factor = scale.get(regime, 1.0) if spec.scalable else 1.0
        world = scaled(spec.world, factor)
        per_policy: dict[str, list] = {p: [] for p in policies}
        gen_seconds = []
        for seed in seeds:
            key = (spec.stream, seed)
            if key not in streams:
                streams.clear()                                    # one stream in memory at a time
                t0 = time.perf_counter()
                streams[key] = make_stream(world, seed)
                gen_seconds.append(time.perf_counter() - t0)
            stream = streams[key]
            for p in policies:
                name, kw = POLICIES[p]
                policy = build_policy(name, **kw)
                t0 = time.perf_counter()
                keep = replay(policy, stream, spec.batch)
                per_policy[p].append(measure(stream, keep, policy, time.perf_counter() - t0))
                if verbose:
                    r = per_policy[p][-1]
                    pct = lambda x: "-" if x is None else f"{x:.1f}%"  # noqa: E731
                    print(f"  {regime:12s} seed {seed} {p:16s} dup flagged {r['dup_flagged']} dup dropped "
                          f"{pct(r['dup_dropped_pct'])} unique dropped {pct(r['unique_dropped_pct'])} harmless kept "
                          f"{pct(r['harmless_kept_pct'])} {r['seconds']:.1f}s", flush=True)
        samples = per_policy[policies[0]][0]["samples"]
        results["regimes"][regime] = {
            "world": world.__dict__, "full_world": spec.world.__dict__, "batch": spec.batch,
            "scale": factor, "note": spec.note, "samples": samples,
            "generate_seconds": gen_seconds,
            "policies": {p: summarize(v) for p, v in per_policy.items()}}
        if factor != 1.0:
            print(f"{regime}: scaled by {factor}: {world.unique} unique + {world.dup} x {world.repeats} "
                  f"(full: {spec.world.unique} + {spec.world.dup} x {spec.world.repeats})", flush=True)
    results["batch_spread"] = batch_spread(results)
    return results


def parse_scale(text: str, ap=None) -> dict[str, float]:
    """--scale: "0.5" (every scalable regime) or "wen=0.25,web=1" -> {regime: factor}."""
    scalable = [r for r, spec in REGIMES.items() if spec.scalable]
    try:
        if "=" not in text:
            return {r: float(text) for r in scalable}
        out = {r: 1.0 for r in scalable}
        for part in text.split(","):
            r, v = part.split("=")
            if r not in scalable:
                raise ValueError(f"{r!r} is not a scalable regime ({', '.join(scalable)})")
            out[r] = float(v)
        return out
    except ValueError as e:
        if ap is None:
            raise
        ap.error(f"--scale {text!r}: {e}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--regimes", default=",".join(REGIMES), help=f"comma list of {', '.join(REGIMES)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--policies", default=",".join(POLICIES), help=f"comma list of {', '.join(POLICIES)}")
    ap.add_argument("--scale", default="1",
                    help="factor on the unique (and duplicated, >= 20) items of wen and web: one number for both, or "
                         "per regime, e.g. wen=0.25,web=1; printed and saved")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    regimes = [r for r in args.regimes.split(",") if r]
    policies = [p for p in args.policies.split(",") if p]
    for r in regimes:
        if r not in REGIMES:
            ap.error(f"unknown regime {r!r}: expected {', '.join(REGIMES)}")
    for p in policies:
        if p not in POLICIES:
            ap.error(f"unknown policy {p!r}: expected {', '.join(POLICIES)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    t0 = time.perf_counter()
    results = run(regimes, seeds, policies, parse_scale(args.scale, ap))
    results["total_seconds"] = time.perf_counter() - t0
    print()
    print(table(results))
    for name, spread in results["batch_spread"].items():
        print(f"batch spread {name}: " + "; ".join(
            f"{k} range {v['range_mean']:.2f} (max {v['range_max']:.2f}) vs seed sd {v['seed_sd_at_batch_32']:.2f}"
            for k, v in spread.items()))
    print(f"total {results['total_seconds']:.0f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
