"""Filter policies: magnitudes (and timesteps) of a global batch in, a keep mask out."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from memfilter.filtering.policies import (MAD_TO_STD, BatchQuantile, FixedThreshold, NoFilter, RunningQuantile,
                                TimestepBucketed, build_policy)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mad_threshold(values: np.ndarray, k: float) -> float:
    """median + k * 1.4826 * MAD, for an odd number of values (so the median is unambiguous)."""
    assert values.size % 2 == 1
    med = np.median(values)
    return float(med + k * MAD_TO_STD * np.median(np.abs(values - med)))


# --------------------------------------------------------------------------- stateless policies

def test_no_filter_keeps_everything():
    m = torch.cat([torch.rand(20, generator=_gen(0)), torch.tensor([1e9, float("inf"), 0.0])])
    keep = NoFilter().decide(m, torch.randint(0, 1000, (m.numel(),), generator=_gen(1)))
    assert keep.dtype == torch.bool and keep.shape == m.shape and keep.all()
    assert NoFilter().thresholds() == {}


def test_fixed_threshold_keeps_exactly_the_magnitudes_at_or_below_it():
    thr = 2.0
    m = torch.cat([torch.rand(50, generator=_gen(0)) * 4, torch.tensor([thr, thr + 1e-6, thr - 1e-6, 0.0])])
    policy = FixedThreshold(threshold=thr)
    keep = policy.decide(m)
    assert keep.dtype == torch.bool and keep.shape == m.shape
    assert torch.equal(keep, m <= thr)
    assert keep[-4] and not keep[-3] and keep[-2]                 # the threshold itself stays in
    assert 0 < int(keep.sum()) < m.numel()                        # the draw really straddles the threshold
    assert policy.thresholds() == {"threshold": thr}
    # stateless: the same batch again gives the same answer
    assert torch.equal(policy.decide(m), keep)


@pytest.mark.parametrize("drop_fraction", [0.1, 0.25, 0.3, 0.5])
def test_batch_quantile_drops_the_round_q_n_largest(drop_fraction):
    policy = BatchQuantile(drop_fraction=drop_fraction)
    for n in (1, 2, 3, 7, 8, 10, 33, 64):
        m = torch.rand(n, generator=_gen(n))
        keep = policy.decide(m)
        n_drop = round(drop_fraction * n)
        assert int((~keep).sum()) == n_drop, (n, drop_fraction)
        if 0 < n_drop < n:
            assert m[~keep].min() >= m[keep].max()               # the dropped ones are the largest


def test_batch_quantile_breaks_ties_by_position_deterministically():
    m = torch.tensor([1.0, 3.0, 2.0, 3.0, 0.5, 3.0, 3.0, 1.5])   # four tied maxima, drop three of them
    policy = BatchQuantile(drop_fraction=3 / 8)
    keep = policy.decide(m)
    tied = (m == m.max()).nonzero().flatten()
    dropped = (~keep).nonzero().flatten()
    assert dropped.numel() == 3 and bool((m[dropped] == m.max()).all())
    assert dropped.tolist() == tied[:3].tolist()                 # earlier positions go first
    for _ in range(3):
        assert torch.equal(policy.decide(m.clone()), keep)
    # all equal: still exactly round(q * N) dropped, the first ones
    flat = torch.full((10,), 0.7)
    keep = BatchQuantile(drop_fraction=0.2).decide(flat)
    assert (~keep).nonzero().flatten().tolist() == [0, 1]


# --------------------------------------------------------------------------- RunningQuantile

def test_running_quantile_warmup_then_quantile_of_the_past_window():
    q, window, warmup, bs = 0.8, 40, 20, 8
    policy = RunningQuantile(quantile=q, window=window, warmup=warmup)
    g = _gen(3)
    history: list[float] = []
    n_filtered_batches = 0
    for i in range(12):
        m = torch.rand(bs, generator=g)
        if i == 1:
            m[0] = 1e6                                            # an extreme value during warm-up
        keep = policy.decide(m)
        if len(history) < warmup:
            assert keep.all(), f"batch {i} is in warm-up"
            assert policy.thresholds() == {}
        else:
            thr = float(np.quantile(np.array(history[-window:]), q))
            assert policy.thresholds()["threshold"] == pytest.approx(thr, rel=1e-6)
            assert torch.equal(keep, m <= policy.thresholds()["threshold"])
            n_filtered_batches += 1
        history += m.tolist()
    assert n_filtered_batches == 12 - (warmup + bs - 1) // bs
    # the 1e6 of warm-up is long out of the window: the threshold is back among the uniform draws
    assert policy.thresholds()["threshold"] < 1.0


def test_running_quantile_judges_a_batch_against_statistics_before_it():
    policy = RunningQuantile(quantile=0.9, window=100, warmup=50)
    policy.decide(torch.linspace(0, 1, 100))                      # past: uniform on [0, 1]
    thr_before = float(torch.quantile(torch.linspace(0, 1, 100), 0.9))
    batch = torch.full((60,), 0.95)
    # with the batch itself in the statistics the 0.9 quantile would be 0.95 and everything would stay
    with_batch = torch.cat([torch.linspace(0, 1, 100), batch])[-100:]
    assert float(torch.quantile(with_batch, 0.9)) >= float(batch[0])
    keep = policy.decide(batch)
    assert not keep.any()
    assert policy.thresholds()["threshold"] == pytest.approx(thr_before)


def test_running_quantile_window_size_is_respected():
    policy = RunningQuantile(quantile=0.5, window=16, warmup=1)
    policy.decide(torch.full((16,), 100.0))                       # old, large values
    stream = [torch.rand(8, generator=_gen(10 + i)) for i in range(2)]
    for m in stream:
        policy.decide(m)
    values = policy.state_dict()["values"]
    assert values.numel() == 16
    assert torch.equal(values, torch.cat(stream))                 # exactly the last 16, in order
    # the large values have left the window, so a moderately large magnitude is now dropped
    assert not policy.decide(torch.tensor([2.0]))[0]
    assert policy.thresholds()["threshold"] == pytest.approx(float(torch.quantile(torch.cat(stream), 0.5)))


def test_a_quantile_threshold_cannot_be_fed_only_kept_samples():
    """update_with=kept with a quantile ratchets: each window of kept samples has a lower quantile than the last.
    Simulated here (the rule the policies refuse), then refused by both quantile policies."""
    g, window, threshold, kept = _gen(4), [], math.inf, []
    for step in range(300):
        m = torch.rand(64, generator=g)                        # the same distribution at every step
        threshold = float(torch.quantile(torch.tensor(window[-4096:]), 0.9)) if len(window) >= 256 else math.inf
        keep = m <= threshold
        window += m[keep].tolist()
        kept.append(float(keep.float().mean()))
    assert sum(kept[-20:]) / 20 < 0.5                          # the threshold fell far below the 0.9 quantile
    with pytest.raises(ValueError, match="update_with"):
        RunningQuantile(update_with="kept")
    with pytest.raises(ValueError, match="update_with=kept with a quantile"):
        TimestepBucketed(statistic="quantile", update_with="kept")
    p = RunningQuantile(quantile=0.9, window=4096, warmup=256)      # "all": it holds the 0.9 quantile
    g = _gen(4)
    late = [float(p.decide(torch.rand(64, generator=g)).float().mean()) for _ in range(300)][-20:]
    assert 0.85 < sum(late) / 20 < 0.95


# --------------------------------------------------------------------------- TimestepBucketed

def _two_bucket_stream(n_batches: int, per_bucket: int, seed: int):
    """Bucket 0 (t < 500): m ~ 1 +- 0.05; bucket 1 (t >= 500): m ~ 10 +- 0.5."""
    g = _gen(seed)
    out = []
    for _ in range(n_batches):
        t = torch.cat([torch.randint(0, 500, (per_bucket,), generator=g),
                       torch.randint(500, 1000, (per_bucket,), generator=g)])
        m = torch.cat([1 + 0.05 * torch.randn(per_bucket, generator=g),
                       10 + 0.5 * torch.randn(per_bucket, generator=g)])
        out.append((m, t))
    return out


def test_timestep_buckets_have_their_own_thresholds():
    k = 3.0
    policy = TimestepBucketed(num_buckets=2, num_train_timesteps=1000, k=k, window=1000, warmup=21)
    stream = _two_bucket_stream(3, 7, seed=5)                     # 21 magnitudes per bucket
    for m, t in stream:
        assert policy.decide(m, t).all()                          # warm-up: everything stays
    low = np.concatenate([m[:7].numpy() for m, _ in stream])
    high = np.concatenate([m[7:].numpy() for m, _ in stream])
    thr_low, thr_high = _mad_threshold(low, k), _mad_threshold(high, k)
    assert thr_low < 5 < thr_high

    #                      normal-low  high-in-low  normal-high  extreme-high  low-in-high
    m = torch.tensor([1.0, 10.0, 10.0, 20.0, 1.0])
    t = torch.tensor([100, 100, 900, 900, 900])
    keep = policy.decide(m, t)
    assert keep.tolist() == [True, False, True, False, True]
    th = policy.thresholds()
    assert th["threshold/bucket0"] == pytest.approx(thr_low, rel=1e-5)
    assert th["threshold/bucket1"] == pytest.approx(thr_high, rel=1e-5)
    # one global threshold could not take these decisions: 10 is dropped at t=100 and kept at t=900
    assert not keep[1] and keep[2] and m[1] == m[2]


def test_bucket_of_covers_the_timestep_range():
    policy = TimestepBucketed(num_buckets=10, num_train_timesteps=1000)
    t = torch.tensor([0, 99, 100, 499, 500, 999])
    assert policy.bucket_of(t).tolist() == [0, 0, 1, 4, 5, 9]
    with pytest.raises(ValueError, match="timesteps"):
        policy.decide(torch.rand(3))


def _outlier_stream(n_batches: int, n_normal: int, n_outlier: int, seed: int):
    g = _gen(seed)
    out = []
    for _ in range(n_batches):
        m = torch.cat([1 + 0.1 * torch.randn(n_normal, generator=g), 10 + torch.randn(n_outlier, generator=g)])
        is_out = torch.cat([torch.zeros(n_normal, dtype=torch.bool), torch.ones(n_outlier, dtype=torch.bool)])
        perm = torch.randperm(m.numel(), generator=g)
        out.append((m[perm], torch.randint(0, 1000, (m.numel(),), generator=g), is_out[perm]))
    return out


def test_median_mad_is_robust_to_40_percent_outliers_and_mean_std_is_not():
    """DESIGN.md "What a probe here showed": mean+k*std is dragged up by the memorized samples it judges."""
    stream = _outlier_stream(12, 30, 20, seed=6)                  # 40% huge magnitudes in every batch
    rates = {}
    for statistic in ("median_mad", "mean_std"):
        policy = TimestepBucketed(num_buckets=1, statistic=statistic, k=3.0, window=500, warmup=50)
        dropped_out = total_out = dropped_normal = total_normal = 0
        for i, (m, t, is_out) in enumerate(stream):
            keep = policy.decide(m, t)
            if i == 0:
                assert keep.all()                                 # warm-up
                continue
            dropped_out += int((~keep & is_out).sum())
            total_out += int(is_out.sum())
            dropped_normal += int((~keep & ~is_out).sum())
            total_normal += int((~is_out).sum())
        rates[statistic] = (dropped_out / total_out, dropped_normal / total_normal)
    out_mad, normal_mad = rates["median_mad"]
    out_std, _ = rates["mean_std"]
    assert out_mad >= 0.9, rates                                  # drops most appearances of the outliers
    assert normal_mad <= 0.05, rates                              # and hardly any normal sample
    assert out_std <= 0.5 * out_mad, rates                        # mean_std drops far fewer of them
    assert out_std <= 0.1, rates


def test_timestep_quantile_statistic():
    policy = TimestepBucketed(num_buckets=1, statistic="quantile", quantile=0.75, window=1000, warmup=1)
    past = torch.rand(101, generator=_gen(7))
    policy.decide(past, torch.zeros(101, dtype=torch.long))
    m = torch.rand(50, generator=_gen(8))
    keep = policy.decide(m, torch.full((50,), 300))
    thr = float(np.quantile(past.numpy(), 0.75))
    assert policy.thresholds()["threshold/bucket0"] == pytest.approx(thr, rel=1e-6)
    assert torch.equal(keep, m <= policy.thresholds()["threshold/bucket0"])
    with pytest.raises(ValueError, match="statistic"):
        TimestepBucketed(statistic="trimmed_mean")


# --------------------------------------------------------------------------- eligibility

@pytest.mark.parametrize("make", [
    lambda: RunningQuantile(quantile=0.8, window=200, warmup=16),
    lambda: TimestepBucketed(num_buckets=2, window=200, warmup=12),
    lambda: TimestepBucketed(num_buckets=2, window=200, warmup=12, update_with="kept"),
    lambda: BatchQuantile(drop_fraction=0.25),
])
def test_ineligible_samples_are_kept_and_stay_out_of_the_statistics(make):
    with_inelig, only_elig = make(), make()
    g = _gen(9)
    n_dropped = 0
    for i in range(8):
        m = torch.rand(16, generator=g) * 3
        m[i % 3::5] += 20                                         # a few eligible outliers to drop
        t = torch.randint(0, 1000, (16,), generator=g)
        eligible = torch.rand(16, generator=g) > 0.3
        # ineligible ones: 0 (caption dropped for CFG) or huge; either would move the statistics if counted
        m = torch.where(eligible, m, torch.where(torch.arange(16) % 2 == 0, 0.0, 1e4))
        keep = with_inelig.decide(m, t, eligible=eligible)
        ref = only_elig.decide(m[eligible], t[eligible])
        assert keep[~eligible].all()
        assert torch.equal(keep[eligible], ref), f"batch {i}"
        n_dropped += int((~keep).sum())
        assert repr(with_inelig.state_dict()) == repr(only_elig.state_dict())
    assert n_dropped > 0                                          # the policy was really filtering
    # no eligible sample at all: everything stays, nothing changes
    before = copy.deepcopy(with_inelig.state_dict())
    assert with_inelig.decide(torch.full((5,), 1e9), torch.zeros(5, dtype=torch.long),
                              eligible=torch.zeros(5, dtype=torch.bool)).all()
    after = with_inelig.state_dict()
    assert repr(before) == repr(after)


# --------------------------------------------------------------------------- state round trip

@pytest.mark.parametrize("make", [
    lambda: RunningQuantile(quantile=0.8, window=50, warmup=20),
    lambda: TimestepBucketed(num_buckets=4, window=30, warmup=8),
    lambda: TimestepBucketed(num_buckets=4, window=30, warmup=8, update_with="kept"),
    lambda: TimestepBucketed(num_buckets=4, window=30, warmup=8, update_with="warmup"),
])
def test_restored_policy_decides_as_the_uninterrupted_one(make):
    g = _gen(11)
    stream = []
    for _ in range(14):
        m = torch.rand(16, generator=g) * 2
        m[torch.rand(16, generator=g) < 0.15] += 5                # some large magnitudes to drop
        stream.append((m, torch.randint(0, 1000, (16,), generator=g)))
    uninterrupted, first_half = make(), make()
    for m, t in stream[:7]:
        uninterrupted.decide(m, t)
        first_half.decide(m, t)
    state = copy.deepcopy(first_half.state_dict())
    restored, fresh = make(), make()
    restored.load_state_dict(state)
    assert restored.thresholds() == uninterrupted.thresholds()
    differs_from_fresh = False
    n_dropped = 0
    for m, t in stream[7:]:
        a = uninterrupted.decide(m, t)
        b = restored.decide(m, t)
        assert torch.equal(a, b)
        assert restored.thresholds() == uninterrupted.thresholds()
        differs_from_fresh |= not torch.equal(fresh.decide(m, t), a)
        n_dropped += int((~a).sum())
    assert n_dropped > 0                                          # decisions were not trivially "keep"
    assert differs_from_fresh                                     # the state really mattered
    assert repr(restored.state_dict()) == repr(uninterrupted.state_dict())


def test_warmup_statistics_are_frozen_so_a_growing_population_cannot_drag_them():
    """update_with="warmup": the first `warmup` magnitudes of a bucket calibrate it, later ones never move it."""
    g = _gen(5)
    frozen = TimestepBucketed(num_buckets=1, window=1000, warmup=33, k=3.0, update_with="warmup")
    running = TimestepBucketed(num_buckets=1, window=1000, warmup=33, k=3.0)
    calib = 1.0 + 0.1 * torch.randn(33, generator=g)
    t = torch.zeros(33, dtype=torch.long)
    frozen.decide(calib[:20], t[:20])
    frozen.decide(calib[20:], t[20:])                              # 13 fill the warm-up, nothing more
    running.decide(calib, t)
    expected = _mad_threshold(calib.numpy(), 3.0)
    assert frozen.state_dict()["values"][0].numel() == 33
    drift_kept_frozen, drift_kept_running = 0, 0
    for step in range(30):                                         # 2/3 of the population creeps upwards
        m = torch.cat([1.0 + 0.1 * torch.randn(16, generator=g), torch.full((32,), 1.0 + 0.05 * step)])
        tt = torch.zeros(48, dtype=torch.long)
        kf, kr = frozen.decide(m, tt), running.decide(m, tt)
        assert frozen.thresholds()["threshold/bucket0"] == pytest.approx(expected, rel=1e-6)
        if step >= 20:                                             # m = 2.0 .. 2.45, far above the calibration
            drift_kept_frozen += int(kf[16:].sum())
            drift_kept_running += int(kr[16:].sum())
    assert frozen.state_dict()["values"][0].numel() == 33          # never updated after the warm-up
    assert drift_kept_frozen == 0
    assert drift_kept_running > 0                                  # the running median followed the creep


def test_load_state_dict_checks_the_number_of_buckets():
    p = TimestepBucketed(num_buckets=4, warmup=1)
    p.decide(torch.rand(8), torch.randint(0, 1000, (8,)))
    with pytest.raises(ValueError, match="num_buckets"):
        TimestepBucketed(num_buckets=5).load_state_dict(p.state_dict())


# --------------------------------------------------------------------------- factory

def test_build_policy_by_name():
    assert isinstance(build_policy("none"), NoFilter)
    fixed = build_policy("fixed", threshold=1.5)
    assert isinstance(fixed, FixedThreshold) and fixed.threshold == 1.5
    assert isinstance(build_policy("batch_quantile", drop_fraction=0.2), BatchQuantile)
    rq = build_policy("running_quantile", quantile=0.95, window=10, warmup=5)
    assert isinstance(rq, RunningQuantile) and rq.quantile == 0.95
    tb = build_policy("timestep", num_buckets=3)
    assert isinstance(tb, TimestepBucketed) and tb.num_buckets == 3
    with pytest.raises(ValueError, match="filter.name") as err:
        build_policy("threshold_by_vibes")
    assert "threshold_by_vibes" in str(err.value)


def test_a_nan_magnitude_is_dropped_and_kept_out_of_the_statistics():
    from memfilter.filtering.policies import RunningQuantile
    p = RunningQuantile(quantile=0.5, window=100, warmup=4)
    p.decide(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    keep = p.decide(torch.tensor([float("nan"), 1.0, 5.0]))
    assert keep.tolist() == [False, True, False]
    assert torch.isfinite(p.state_dict()["values"]).all() and p.state_dict()["values"].numel() == 6


# --------------------------------------------------------------------------- per-caption evidence

def _caption_stream(seed: int, steps: int = 30):
    """8 captions x 4 samples a step; caption 0's magnitudes climb from step 10 on (an item being memorized)."""
    g = _gen(seed)
    groups = torch.arange(8).repeat_interleave(4)
    for step in range(steps):
        t = torch.randint(0, 1000, (32,), generator=g)
        m = (1.0 + t.float() / 1000) * (1 + 0.15 * torch.randn(32, generator=g)).abs()
        m[groups == 0] *= 1.0 + 0.06 * max(0, step - 10)
        yield m, t, groups


def test_caption_policy_drops_a_caption_once_its_magnitudes_rise_and_keeps_the_rest():
    from memfilter.filtering.policies import CaptionHistory

    p = CaptionHistory(threshold=1.25, baseline=8, decay=0.2, num_buckets=4, window=256, warmup=8)
    kept = {step: p.decide(m, t, groups=gr) for step, (m, t, gr) in enumerate(_caption_stream(0))}
    groups = torch.arange(8).repeat_interleave(4)
    first_drop = min(s for s, k in kept.items() if not k[groups == 0].all())
    assert 12 <= first_drop <= 22                                   # after the rise began, not before
    assert all(not k[groups == 0].any() for s, k in kept.items() if s >= 24)   # then every appearance
    others = torch.stack([k[groups != 0] for k in kept.values()])
    assert others.float().mean() > 0.97                             # stable captions stay
    with pytest.raises(ValueError, match="group"):
        p.decide(torch.ones(4), torch.zeros(4, dtype=torch.long))


def test_caption_policy_never_drops_captions_seen_fewer_than_baseline_times():
    from memfilter.filtering.policies import CaptionHistory

    p = CaptionHistory(threshold=1.01, baseline=5, num_buckets=1, warmup=4)
    p.decide(torch.ones(8), torch.zeros(8, dtype=torch.long), groups=torch.arange(100, 108))   # warm-up
    for i in range(5):                                              # huge magnitudes, each caption once
        keep = p.decide(torch.full((8,), 50.0), torch.zeros(8, dtype=torch.long),
                        groups=torch.arange(1000 + 8 * i, 1008 + 8 * i))
        assert keep.all()


def test_caption_policy_restored_mid_stream_decides_as_the_uninterrupted_one():
    from memfilter.filtering.policies import CaptionHistory

    make = lambda: CaptionHistory(threshold=1.2, baseline=4, decay=0.3, num_buckets=4, window=64, warmup=8)  # noqa: E731
    stream = list(_caption_stream(3))
    a, b = make(), make()
    for m, t, gr in stream[:15]:
        a.decide(m, t, groups=gr)
        b.decide(m, t, groups=gr)
    restored = make()
    restored.load_state_dict(copy.deepcopy(b.state_dict()))
    dropped = 0
    for m, t, gr in stream[15:]:
        ka, kr = a.decide(m, t, groups=gr), restored.decide(m, t, groups=gr)
        assert torch.equal(ka, kr)
        dropped += int((~ka).sum())
    assert dropped > 0
    assert repr(restored.state_dict()) == repr(a.state_dict())


def test_caption_policy_judges_a_sample_before_adding_it_to_its_caption():
    """The module's rule: a sample is judged on its caption's past appearances; its own m only counts for the
    next ones. A jump is kept once, and the caption's next appearance, however ordinary, is dropped."""
    from memfilter.filtering.policies import CaptionHistory

    p = CaptionHistory(threshold=1.2, baseline=4, decay=0.5, num_buckets=1, window=64, warmup=4, min_timestep=0)
    t = torch.full((1,), 900)
    for _ in range(8):                                              # warm-up and a baseline at m = 1
        assert p.decide(torch.ones(1), t, groups=torch.tensor([7])).all()
    assert p.decide(torch.tensor([5.0]), t, groups=torch.tensor([7])).all()       # judged on a score of 1
    assert not p.decide(torch.tensor([1.0]), t, groups=torch.tensor([7])).any()   # score 3 > 1.2: dropped


def test_caption_group_ids_are_stable_48_bit_and_survive_the_float_gather():
    from memfilter.filtering.policies import caption_group

    ids = [caption_group(c) for c in ("a red circle", " A Red Circle ", "a blue square")]
    assert ids[0] == ids[1] != ids[2] and all(0 <= i < 2 ** 48 for i in ids)
    g = torch.tensor(ids)
    halves = torch.stack([(g >> 24).float(), (g & 0xFFFFFF).float()], 1)   # as train.step gathers them
    assert torch.equal((halves[:, 0].long() << 24) | halves[:, 1].long(), g)


def test_caption_policy_counts_only_high_noise_evidence_but_drops_at_every_timestep():
    from memfilter.filtering.policies import CaptionHistory

    p = CaptionHistory(threshold=1.2, baseline=4, decay=0.5, num_buckets=2, window=64, warmup=4, min_timestep=500)
    low, high = torch.full((4,), 100), torch.full((4,), 900)
    gr = torch.tensor([7, 7, 8, 8])
    for _ in range(4):                                              # warm-up and baselines at m = 1
        p.decide(torch.ones(8), torch.cat([low, high]), groups=torch.cat([gr, gr]))
    keep = p.decide(torch.tensor([9.0, 9.0, 1.0, 1.0]), low, groups=gr)  # a jump at low noise: no evidence
    assert keep.all()
    keep = p.decide(torch.tensor([3.0, 3.0, 1.0, 1.0]), high, groups=gr)  # at high noise: caption 7 flagged
    assert keep.tolist() == [True, False, True, True]     # each sample judged on its caption's past, then added
    keep = p.decide(torch.ones(4), low, groups=gr)                   # ... and dropped at low noise too
    assert keep.tolist() == [False, False, True, True]


# --------------------------------------------------------------------------- item evidence (the default)

def _item_stream(seed: int, steps: int = 80, rise_from: int = 20):
    """64 samples a step: images 1..3 repeat and start to stand out at `rise_from` (m x1.5 and loss x0.6, both
    ~1.6 spreads), images 4..6 repeat and stay ordinary, the rest are unique; the whole population drifts
    (m up, loss down) as a fine-tune moves the model. Yields (m, t, image ids [64, 1], losses)."""
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        image = 10_000 + step * 64 + torch.arange(64)                 # unique images ...
        image[:12] = torch.randint(1, 7, (12,), generator=g)           # ... and 12 appearances of repeated ones
        t = torch.randint(0, 1000, (64,), generator=g)
        drift = 1.0 + 0.01 * step
        m = drift * (1.0 + t.float() / 1000) * torch.exp(0.25 * torch.randn(64, generator=g))
        loss = (0.2 - 0.15 * t.float() / 1000) / drift * torch.exp(0.3 * torch.randn(64, generator=g))
        hot = (image <= 3) & (step >= rise_from)
        m, loss = torch.where(hot, 1.5 * m, m), torch.where(hot, 0.6 * loss, loss)
        yield m, t, image[:, None], loss


def _item_policy(**kw):
    from memfilter.filtering.policies import ItemEvidence
    return ItemEvidence(**{"num_buckets": 4, "window": 64, "warmup": 16, "null": "population", **kw})


@pytest.mark.parametrize("evidence", [("magnitude",), ("loss",), ("magnitude", "loss")])
def test_item_policy_drops_items_that_stand_out_from_fresh_ones_and_spares_the_drifting_rest(evidence):
    p = _item_policy(evidence=evidence)
    kept = [(gr[:, 0], p.decide(m, t, groups=gr, losses=loss)) for m, t, gr, loss in _item_stream(0)]
    first = min(s for s, (img, k) in enumerate(kept) if not k[img <= 3].all())
    assert 20 < first <= 50                                          # after the rise began, not before
    late = torch.cat([k[img <= 3] for img, k in kept[60:]])
    assert late.float().mean() < 0.1                                 # then (nearly) every appearance
    others = torch.cat([k[img > 3] for img, k in kept])
    assert others.float().mean() > 0.99                              # repeated but ordinary, and unique: kept
    assert p.thresholds()["items_flagged"] >= 3
    with pytest.raises(ValueError, match="group"):
        p.decide(torch.ones(4), torch.zeros(4, dtype=torch.long))
    if "loss" in evidence:
        with pytest.raises(ValueError, match="losses"):
            p.decide(torch.ones(4), torch.zeros(4, dtype=torch.long), groups=torch.ones(4, dtype=torch.long))


def test_item_policy_never_flags_an_item_seen_once_however_large_its_magnitude():
    p = _item_policy(min_count=2, evidence=("magnitude",))
    p.decide(torch.ones(64), torch.full((64,), 900), groups=torch.arange(1, 65))     # warm-up
    for i in range(20):
        ids = 1000 + 8 * i + torch.arange(8)
        assert p.decide(torch.full((8,), 1e4), torch.full((8,), 900), groups=ids).all()


def test_item_policy_flags_an_image_shown_under_many_captions():
    """Image-only duplication: every appearance has a caption of its own, the image id is shared."""
    p = _item_policy(evidence=("magnitude",), group_by=("image", "caption"))
    g = torch.Generator().manual_seed(1)
    dropped = []
    for step in range(60):
        t = torch.randint(0, 1000, (32,), generator=g)
        m = (1.0 + t.float() / 1000) * torch.exp(0.25 * torch.randn(32, generator=g))
        image = torch.randint(1, 1000, (32,), generator=g) + 100 * step   # mostly new images
        image[:4] = 7                                                     # one image, 4 times per step
        m[:4] *= 1.6
        captions = 10 ** 6 + step * 32 + torch.arange(32)                 # every caption new
        keep = p.decide(m, t, groups=torch.stack([captions, image], 1))
        dropped.append(~keep[:4])
    assert torch.stack(dropped[40:]).all()


def test_item_policy_restored_mid_stream_decides_as_the_uninterrupted_one():
    stream = list(_item_stream(3))
    a, b = _item_policy(capacity=500), _item_policy(capacity=500)    # small: eviction happens mid-stream
    for m, t, gr, loss in stream[:30]:
        a.decide(m, t, groups=gr, losses=loss)
        b.decide(m, t, groups=gr, losses=loss)
    restored = _item_policy(capacity=500)
    restored.load_state_dict(copy.deepcopy(b.state_dict()))
    dropped = 0
    for m, t, gr, loss in stream[30:]:
        ka, kr = a.decide(m, t, groups=gr, losses=loss), restored.decide(m, t, groups=gr, losses=loss)
        assert torch.equal(ka, kr)
        dropped += int((~ka).sum())
    assert dropped > 0
    assert repr(restored.state_dict()) == repr(a.state_dict())


def test_item_policy_state_stays_bounded_on_a_million_distinct_captions():
    capacity = 50_000
    p = _item_policy(capacity=capacity, evidence=("magnitude",))
    g = torch.Generator().manual_seed(0)
    n, batch = 1_000_000, 8192
    for start in range(0, n, batch):
        size = min(batch, n - start)
        ids = torch.arange(start, start + size) * 2 + 1                      # a million distinct captions
        p.decide(torch.exp(0.25 * torch.randn(size, generator=g)), torch.randint(0, 1000, (size,), generator=g),
                 groups=ids)
    state = p.state_dict()
    assert len(p._items) == capacity == state["item_ids"].numel()
    item_bytes = state["item_ids"].numel() * 8 + state["item_state"].numel() * state["item_state"].element_size()
    assert item_bytes == capacity * 56   # 8 (id) + 8 x (count, clock, flag, trained, measured, one sum per signal)
    assert int(state["item_ids"][-1]) == 2 * (n - 1) + 1                      # the newest stay, the oldest left


def test_item_groups_caption_and_image_ids_survive_the_float_gather():
    from memfilter.filtering.policies import image_groups, item_groups

    g = torch.Generator().manual_seed(0)
    blocks = lambda: torch.rand(1, 3, 4, 4, generator=g).repeat_interleave(4, 2).repeat_interleave(4, 3)  # noqa: E731
    a = blocks() * 2 - 1
    near = a * 0.9 + torch.tensor([0.03, -0.02, 0.05]).view(1, 3, 1, 1)    # a little less contrast, shifted colour
    other = blocks() * 2 - 1
    ids = image_groups(torch.cat([a, a, near, other]))
    assert ids[0] == ids[1] == ids[2] != ids[3] and bool((ids > 0).all() & (ids < 2 ** 48).all())
    groups = item_groups(("caption", "image"), ["a red circle", "A red circle", "x", "y"], torch.cat([a, a, near, other]))
    assert groups.shape == (4, 2) and groups[0, 0] == groups[1, 0] != groups[2, 0]
    halves = torch.cat([(groups >> 24).float(), (groups & 0xFFFFFF).float()], 1)   # as train.step gathers them
    assert torch.equal((halves[:, :2].long() << 24) | halves[:, 2:].long(), groups)
    with pytest.raises(ValueError, match="group_by"):
        item_groups(("text",), ["a"], a)


def test_item_policy_holds_a_flagged_item_by_default_or_until_its_evidence_falls_to_release():
    """A flagged item stays flagged (release null); with `release` set, it is let back once its evidence fell."""
    def run(release):
        p = _item_policy(evidence=("magnitude",), release=release, margin=0.5, num_buckets=1,
                         half_life_epochs=0.15,
                         min_count=4)
        g = torch.Generator().manual_seed(0)
        held = []
        for step in range(60):
            image = torch.cat([torch.ones(4, dtype=torch.long), 100 + step * 60 + torch.arange(60)])
            m = torch.exp(0.1 * torch.randn(64, generator=g))
            m[:4] *= 2.0 if step < 20 else 1.03           # stands out, then only slightly above (z ~0.3)
            held.append(not p.decide(m, torch.full((64,), 900), groups=image[:, None])[:4].any())
        return held
    never, at_zero, at_margin = run(None), run(0.0), run(0.5)
    assert any(never[:20]) and all(never[never.index(True):])  # once flagged, held to the end
    assert any(at_zero[:20]) and all(at_zero[45:])         # still held at z ~0.3 > release 0
    assert any(at_margin[:20]) and not any(at_margin[45:])  # released once it fell to the margin
    with pytest.raises(ValueError, match="release"):
        _item_policy(release=1.0, margin=0.5)


def test_item_policy_compares_with_the_population_now_not_with_its_lagging_window():
    """While the model moves fast (every loss falling 7% a step), the reference window lags behind the
    population: against the window alone, every repeated item would look memorized. The batch's fresh samples
    put the reference back to now: ordinary repeated items are kept, the one that stands out is not."""
    p = _item_policy(evidence=("loss",), z_crit=4.0)
    g = torch.Generator().manual_seed(2)
    dropped, lag = torch.zeros(7), []
    for step in range(80):
        image = 10_000 + step * 64 + torch.arange(64)
        image[:12] = torch.randint(1, 7, (12,), generator=g)          # images 1..6 repeat, 2 a step each
        t = torch.randint(0, 1000, (64,), generator=g)
        loss = 0.93 ** step * (0.2 - 0.15 * t.float() / 1000) * torch.exp(0.3 * torch.randn(64, generator=g))
        loss = torch.where(image == 1, 0.7 * loss, loss)              # image 1: denoised better than the rest
        buckets = t * 4 // 1000
        if step > 20:                                                 # fresh samples against the window alone
            lag.append(p._zscores(-loss.log(), buckets, p._wins[0])[12:].nanmean())
        keep = p.decide(torch.ones(64), t, groups=image[:, None], losses=loss)
        dropped.index_add_(0, image[:12].clamp(max=6), (~keep[:12]).float())
    assert torch.stack(lag).mean() > 0.4     # the window lags: enough to flag any item seen 100 times (4/sqrt(100))
    assert dropped[1] > 0 and dropped[2:].sum() == 0


def test_item_policy_readmits_a_flagged_item_at_the_rate_of_a_rarely_seen_one():
    """readmit: a flagged item is trained on again whenever its decayed trained count fell below `readmit`
    (about once a half-life at 0.5), never more; without it, never."""
    def run(readmit):
        p = _item_policy(evidence=("magnitude",), readmit=readmit, num_buckets=1, half_life_epochs=0.2,
                         min_count=4)
        g = torch.Generator().manual_seed(0)
        kept = []
        for step in range(100):
            image = torch.cat([torch.ones(4, dtype=torch.long), 100 + step * 60 + torch.arange(60)])
            m = torch.exp(0.1 * torch.randn(64, generator=g))
            m[:4] *= 2.0                                   # item 1, four times a step, always stands out
            keep = p.decide(m, torch.full((64,), 900), groups=image[:, None])
            assert keep[4:].all()
            kept.append(int(keep[:4].sum()))
            clocks.append(p._clock)
        return kept
    clocks = []
    never = run(0.0)
    clocks.clear()
    half = run(0.5)
    flag = next(s for s, k in enumerate(never) if k < 4)
    assert sum(never[flag + 1:]) == 0
    late = half[flag + 1:]
    half_lives = (clocks[-1] - clocks[flag]) / math.log(2)           # the policy's own clock, in half-lives
    assert max(late) == 1                                  # one appearance at a time ...
    assert half_lives >= 5 and 0.5 * half_lives <= sum(late) <= 1.5 * half_lives + 1   # ... about once a half-life


def _recorded_stream(seed: int, epochs: int = 3, unique: int = 600, dup: int = 6, repeats: int = 40,
                     hot_after: int = 10, harmless: int = 0):
    """A recorded training stream, sample by sample: (item id, t, loss, base loss, m, base m). Every item has a
    difficulty of its own, shared by the base and the fine-tuned model (ICC ~0.3 on the log signals); duplicated
    items 1..dup start to stand out (loss 0.6x, m 1.5x the base's) after `hot_after` appearances; `harmless` more
    items repeat as often and never do."""
    g = torch.Generator().manual_seed(seed)
    items = [i for i in range(1, dup + harmless + 1) for _ in range(repeats)] + list(range(1000, 1000 + unique))
    rows, seen = [], {}
    difficulty = {}
    for _ in range(epochs):
        for i in torch.randperm(len(items), generator=g).tolist():
            item = items[i]
            d = difficulty.setdefault(item, 0.4 * float(torch.randn(1, generator=g)))
            t = int(torch.randint(0, 1000, (1,), generator=g))
            base_loss = (0.2 - 0.15 * t / 1000) * math.exp(d + 0.6 * float(torch.randn(1, generator=g)))
            base_m = (1.0 + t / 1000) * math.exp(-d + 0.4 * float(torch.randn(1, generator=g)))
            noise_l, noise_m = math.exp(0.15 * float(torch.randn(1, generator=g))), \
                math.exp(0.1 * float(torch.randn(1, generator=g)))
            hot = item <= dup and seen.get(item, 0) >= hot_after
            seen[item] = seen.get(item, 0) + 1
            rows.append((item, t, base_loss * noise_l * (0.6 if hot else 0.97), base_loss,
                         base_m * noise_m * (1.5 if hot else 1.0), base_m))
    return torch.tensor(rows, dtype=torch.float64)


def _replay(policy, rows, batch: int):
    """Drives `policy` with `rows` in global batches of `batch`; returns the keep decision of every row."""
    keep = []
    for s in range(0, rows.shape[0], batch):
        r = rows[s:s + batch]
        keep.append(policy.decide(r[:, 4].float(), r[:, 1].long(), groups=r[:, 0].long(), losses=r[:, 2].float(),
                                  base_losses=r[:, 3].float(), base_magnitudes=r[:, 5].float()))
    return torch.cat(keep)


def test_item_policy_decides_the_same_for_the_same_exposures_at_batch_1_4_32_and_2048():
    """The gate is in samples and epochs of distinct items, not in decisions: one recorded stream replayed at four
    batch sizes flags the same items and drops the same share of each, within noise."""
    rows = _recorded_stream(0)
    dup = rows[:, 0] <= 6
    results = {}
    for batch in (1, 4, 32, 2048):
        p = _item_policy(null="base", num_buckets=4)
        keep = _replay(p, rows, batch)
        flagged = {i for i in range(1, 7) if p._items.get(i, [0, 0, 0])[2]}
        results[batch] = (flagged, float((~keep[dup]).float().mean()), float((~keep[~dup]).float().mean()))
    for batch, (flagged, dup_dropped, unique_dropped) in results.items():
        assert flagged == set(range(1, 7)), (batch, flagged)
        assert unique_dropped == 0.0, batch
        assert abs(dup_dropped - results[32][1]) < 0.08, (batch, dup_dropped, results[32][1])
    assert results[32][1] > 0.7


def test_item_policy_with_the_base_null_keeps_repeated_items_that_are_only_hard_or_easy():
    """Repeated items that do not stand out (each hard or easy for the base alike, never memorized) are kept by
    the base null; the population null takes an easy image for a memorized one."""
    rows = _recorded_stream(1, dup=0, harmless=24)
    repeated = rows[:, 0] < 1000
    base = _replay(_item_policy(null="base"), rows, 32)
    assert base[repeated].float().mean() >= 0.95
    population = _replay(_item_policy(null="population"), rows, 32)
    assert population[repeated].float().mean() < base[repeated].float().mean()


def test_item_policy_never_flags_clean_data_seen_for_many_epochs():
    """Every item seen 30 times (a small multi-epoch fine-tune): no item is repeated more than a typical one, so
    none gathers the evidence count of a duplicated item and nothing is dropped."""
    rows = _recorded_stream(2, epochs=30, unique=200, dup=0)
    keep = _replay(_item_policy(null="base"), rows, 16)
    assert keep.float().mean() >= 0.99


def test_count_and_agc_baselines_drop_what_they_say():
    from memfilter.filtering.policies import AntiGradientControl, CountAppearances, build_policy

    p = CountAppearances(max_count=3)
    ids = torch.tensor([5, 5, 6, 5, 5, 7, 6])
    assert p.decide(torch.full((7,), float("nan")), groups=ids).tolist() == [True, True, True, True, False, True, True]
    restored = CountAppearances(max_count=3)
    restored.load_state_dict(copy.deepcopy(p.state_dict()))
    assert restored.decide(torch.ones(2), groups=torch.tensor([6, 6])).tolist() == [True, False]
    assert isinstance(build_policy("count"), CountAppearances) and not CountAppearances.needs_magnitude

    agc = AntiGradientControl(num_buckets=2, window=200, warmup=50)
    g = torch.Generator().manual_seed(0)
    dropped = []
    for _ in range(20):
        t = torch.randint(0, 1000, (32,), generator=g)
        loss = (0.2 - 0.15 * t / 1000) * torch.exp(0.3 * torch.randn(32, generator=g))
        keep = agc.decide(torch.full((32,), float("nan")), t, losses=loss)      # no magnitude: NaN is fine
        dropped.append(1 - keep.float().mean())
    assert 0.05 < float(torch.stack(dropped[5:]).mean()) < 0.15                    # the lowest ~10% of losses
    keep = agc.decide(torch.ones(4), torch.full((4,), 900), losses=torch.tensor([1e-6, 0.2, 0.2, float("nan")]))
    assert keep.tolist() == [False, True, True, False]                # the lowest loss, and a NaN loss, skipped


def test_item_policy_with_a_base_fraction_measures_the_repeated_items_and_a_share_of_the_rest():
    """base_fraction=0.25: the base runs on every sample of an item seen lately and on ~25% of the others (the
    reference); the policy flags the same items as with the base everywhere, at about half the base's cost here."""
    rows = _recorded_stream(0)
    dup = rows[:, 0] <= 6
    full = _item_policy(null="base")
    keep_full = _replay(full, rows, 32)
    p = _item_policy(null="base", base_fraction=0.25)
    keep, measured = [], []
    for s in range(0, rows.shape[0], 32):
        r = rows[s:s + 32].clone()
        ids = r[:, 0].long()
        sel = p.base_rows(ids)
        assert _item_policy(null="population", base_fraction=0.25).base_rows(ids) is None
        r[~sel, 3] = r[~sel, 5] = float("nan")            # the base was not run there
        measured.append(sel)
        keep.append(p.decide(r[:, 4].float(), r[:, 1].long(), groups=ids, losses=r[:, 2].float(),
                             base_losses=r[:, 3].float(), base_magnitudes=r[:, 5].float()))
    keep, measured = torch.cat(keep), torch.cat(measured)
    flagged = lambda q: {i for i in range(1, 7) if q._items.get(i, [0, 0, 0])[2]}  # noqa: E731
    assert flagged(p) == flagged(full) == set(range(1, 7))
    assert keep[~dup].all() and abs(float((~keep[dup]).float().mean()) - float((~keep_full[dup]).float().mean())) < 0.1
    assert measured[dup].float().mean() > 0.9                     # repeated items: measured once seen
    assert 0.15 < measured[~dup].float().mean() < 0.35            # the rest: about base_fraction
