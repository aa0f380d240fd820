"""The policy simulator (benchmarks/sim_policies.py) on a tiny world: its stream and replay drive the real policies."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from memfilter.filtering.policies import build_policy

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "sim_policies.py"
_spec = importlib.util.spec_from_file_location("sim_policies", _PATH)
sim = sys.modules.setdefault("sim_policies", importlib.util.module_from_spec(_spec))   # dataclasses need it
_spec.loader.exec_module(sim)


def test_simulated_item_policy_flags_memorizing_items_keeps_harmless_ones_and_count_drops_clean_epochs():
    world = sim.World(unique=150, dup=3, harmless=3, repeats=30, epochs=3)
    stream = sim.make_stream(world, seed=0)
    assert stream["t"].numel() == 3 * (150 + 6 * 30)
    assert torch.equal(stream["count"], torch.tensor([90] * 6 + [3] * 150))
    assert int(stream["k"].max()) == 89 and int(stream["ids"].min()) == 1

    policy = build_policy("item")
    res = sim.measure(stream, sim.replay(policy, stream, 16), policy, 0.0)
    assert res["dup_flagged"] == 3 and res["dup_dropped_pct"] > 50
    assert res["harmless_kept_pct"] >= 90 and res["unique_dropped_pct"] == 0.0

    # clean data seen for 5 epochs: count (max_count 3) drops the last 2 of every item's 5 appearances
    clean = sim.make_stream(sim.World(unique=50, epochs=5), seed=1)
    count = build_policy("count", max_count=3)
    assert sim.measure(clean, sim.replay(count, clean, 8), count, 0.0)["unique_dropped_pct"] == 40.0
    item = build_policy("item")
    assert sim.replay(item, clean, 8).all()
