"""save_state_dict / load_state_dict: safetensors for tensors, JSON for the rest, never pickle."""
from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file

from memfilter.filtering.policies import RunningQuantile, TimestepBucketed
from memfilter.train.checkpoint import load_state_dict, save_state_dict


def assert_same(a, b, path="state"):
    """Deep equality: tensors bit-exact with dtype and shape, nan == nan, tuples come back as lists."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.cpu(), b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                           and torch.equal(a.nan_to_num(), b.nan_to_num())), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert type(a) is type(b) and a == b, path


def _count_tensors(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, dict):
        return sum(_count_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_count_tensors(v) for v in obj)
    return 0


def test_nested_state_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {
        "step": 1234,
        "name": "run-a",
        "nothing": None,
        "flag": True,
        "lr": 1e-5,
        "inf": float("inf"),
        "neg_inf": float("-inf"),
        "nan": float("nan"),
        "weights": torch.randn(3, 4, generator=g),
        "half": torch.randn(5, generator=g).to(torch.bfloat16),
        "counts": torch.arange(6, dtype=torch.int64).view(2, 3),
        "mask": torch.tensor([True, False, True]),
        "special": torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0]),
        "windows": [torch.rand(4, generator=g), torch.rand(2, generator=g), torch.rand(7, generator=g)],
        "thresholds": [1.5, float("inf"), 2.5],
        "nested": {"ema": {"decay": 0.999, "shadow": [torch.ones(2, 2), {"deep": torch.zeros(1)}]},
                   "tuple": (1, "two", 3.0), "empty": {}, "empty_list": []},
        7: "an int key",
    }
    save_state_dict(state, tmp_path, "thing")
    assert (tmp_path / "thing.safetensors").exists() and (tmp_path / "thing.json").exists()
    json.loads((tmp_path / "thing.json").read_text())             # valid JSON (no bare NaN / Infinity)
    assert "NaN" not in (tmp_path / "thing.json").read_text()
    assert len(load_file(tmp_path / "thing.safetensors")) == _count_tensors(state)   # all in safetensors
    loaded = load_state_dict(tmp_path, "thing")
    assert_same(state, loaded)
    assert loaded["inf"] == math.inf and loaded["neg_inf"] == -math.inf and math.isnan(loaded["nan"])
    assert loaded[7] == "an int key"


def test_dotted_key_does_not_collide_with_nested_path(tmp_path):
    state = {"a.b": torch.zeros(2), "a": {"b": torch.ones(2)}}
    save_state_dict(state, tmp_path, "collide")
    assert_same(state, load_state_dict(tmp_path, "collide"))


def test_state_without_tensors_has_no_safetensors_file(tmp_path):
    state = {"a": 1, "b": [float("inf"), None, "x"]}
    save_state_dict(state, tmp_path, "plain")
    assert not (tmp_path / "plain.safetensors").exists()
    assert_same(state, load_state_dict(tmp_path, "plain"))


@pytest.mark.parametrize("make", [
    lambda: RunningQuantile(quantile=0.8, window=64, warmup=16),
    lambda: TimestepBucketed(num_buckets=5, window=32, warmup=6),
])
def test_policy_state_round_trip_decides_identically(tmp_path, make):
    g = torch.Generator().manual_seed(1)
    stream = [(torch.rand(12, generator=g) * 2 + (torch.rand(12, generator=g) < 0.2) * 5,
               torch.randint(0, 600, (12,), generator=g)) for _ in range(8)]   # buckets 3 and 4 stay empty
    original = make()
    for m, t in stream[:4]:
        original.decide(m, t)
    state = original.state_dict()
    if isinstance(state["values"], list):                         # empty bucket windows: zero-size tensors
        assert any(v.numel() == 0 for v in state["values"])
    save_state_dict(state, tmp_path, "filter")
    loaded = load_state_dict(tmp_path, "filter")
    assert_same(state, loaded)
    restored = make()
    restored.load_state_dict(loaded)
    assert restored.thresholds() == original.thresholds()
    dropped = 0
    for m, t in stream[4:]:
        a, b = original.decide(m, t), restored.decide(m, t)
        assert torch.equal(a, b)
        dropped += int((~a).sum())
    assert dropped > 0


def _scheduler(name: str):
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([param], lr=1e-3)
    return opt, get_scheduler(name, optimizer=opt, num_warmup_steps=5, num_training_steps=50)


@pytest.mark.parametrize("name", ["cosine", "constant_with_warmup", "linear"])
def test_lr_scheduler_state_round_trip(tmp_path, name):
    opt, sched = _scheduler(name)
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    for _ in range(8):
        opt.step()
        sched.step()
    state = sched.state_dict()
    save_state_dict(state, tmp_path, "lr_scheduler")
    loaded = load_state_dict(tmp_path, "lr_scheduler")
    assert_same(state, loaded)

    opt2, sched2 = _scheduler(name)
    sched2.load_state_dict(loaded)
    assert sched2.last_epoch == sched.last_epoch == 8
    assert sched2.get_last_lr() == sched.get_last_lr()
    for _ in range(10):                                           # and it continues on the same curve
        opt.step(), opt2.step()
        sched.step(), sched2.step()
        assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr(), rel=1e-12)
        assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
    # a fresh scheduler would be elsewhere on the curve: the state mattered
    _, fresh = _scheduler(name)
    assert fresh.get_last_lr() != sched.get_last_lr()
