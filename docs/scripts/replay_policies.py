"""Replay an unfiltered toy-world run's records through filter policies, offline (the measurements behind
docs/filter-policies.md). Not a substitute for a filtered run: once a policy drops an item, the model stops
learning it, which a replay cannot show; it shows when each policy would first act and what it would spare.

    python docs/scripts/replay_policies.py <run_dir>/records <world seed> '{"name": "item"}' ['{"name": ...}' ...]

Item ids: the world item of each key stands in for the perceptual image id (exact copies share it), or the
caption hash with "by": "caption".
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from memfilter.filtering.policies import build_policy, caption_group  # noqa: E402
from memfilter.filtering.records import eligible_mask, read_records  # noqa: E402


def replay(records: str, seed: int, spec: dict, world_kw: dict | None = None) -> dict:
    from memfilter.toyworld.world import ToyWorld

    spec = dict(spec)
    by = spec.pop("by", "image")
    df = read_records(records).to_pandas().sort_values("step", kind="stable")
    world = ToyWorld(**{"num_unique": 1200, "num_duplicated": 8, "repeats": 75, **(world_kw or {})}, seed=seed)
    items = ToyWorld.item_of_keys(df.key.values)
    dup = items < world.num_duplicated
    if by == "caption":
        caps = {i: world.item(int(i))["caption"] for i in np.unique(items)}
        groups = np.array([caption_group(caps[i]) for i in items], dtype=np.int64)
    else:
        groups = items + 1
    policy = build_policy(spec.pop("name", "item"), **spec)
    keep = np.ones(len(df), bool)
    steps = df.step.to_numpy()
    judged = eligible_mask(df)                # captions dropped for guidance are never judged
    for s in np.unique(steps):
        sel = np.nonzero(steps == s)[0]
        kw = {"groups": torch.tensor(groups[sel])} if policy.uses_groups else {}
        kw["eligible"] = torch.tensor(judged[sel])
        if getattr(policy, "uses_losses", False):
            kw["losses"] = torch.tensor(df.loss.to_numpy()[sel])
        if policy.uses_base:     # records of runs with filter.null=base carry the base's loss and magnitude
            if "base_loss" not in df or df.base_loss.isna().all():
                raise SystemExit(f"{records} holds no base_loss/base_magnitude: replay with null=population")
            kw["base_losses"] = torch.tensor(df.base_loss.to_numpy()[sel])
            kw["base_magnitudes"] = torch.tensor(df.base_magnitude.to_numpy()[sel])
        keep[sel] = policy.decide(torch.tensor(df.magnitude.to_numpy()[sel]), torch.tensor(df.timestep.to_numpy()[sel]),
                                  **kw).numpy()
    first = {int(i): int(steps[(items == i) & ~keep].min()) for i in range(world.num_duplicated)
             if ((items == i) & ~keep).any()}
    return {"dup_dropped": float(1 - keep[dup].mean()), "unique_dropped": float(1 - keep[~dup].mean()),
            "dup_dropped_first_100_steps": float(1 - keep[dup & (steps <= 100)].mean()),
            "first_drop_step": first, "items_never_dropped": world.num_duplicated - len(first)}


if __name__ == "__main__":
    rec, seed = sys.argv[1], int(sys.argv[2])
    for arg in sys.argv[3:]:
        print(arg, json.dumps(replay(rec, seed, json.loads(arg))))
