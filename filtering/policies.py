"""Filter policies: magnitudes (and timesteps) of a global batch in, a keep mask out.

Every policy sees the *global* batch (the training loop gathers magnitudes from all ranks first), so
all ranks take the same decisions from the same numbers. Stateful policies judge a batch against
statistics of the batches *before* it, then add the batch to those statistics; their state is a few
tensors that go into every checkpoint, so that a resumed run decides exactly as an uninterrupted one.

Why robust statistics: memorized samples have large magnitudes and, when heavily duplicated, make up
a large share of the draws. A mean + k*std threshold is dragged up by the very samples it should
catch (DESIGN.md, "What a probe here showed"); median + k*MAD or a low quantile is not, as long as
the memorized samples stay under half of the population.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from memfilter.filtering.items import id48
from memfilter.filtering.sketch import ID_BITS, DistinctCount, mix48
from memfilter.filtering.settings import check_settings, int_at_least, is_num, num_in, setting

MAD_TO_STD = 1.4826  # MAD * 1.4826 estimates the std of a normal distribution


class FilterPolicy:
    """Base class. Subclasses implement `_decide`; `decide` handles eligibility and bookkeeping."""

    name = "base"

    uses_groups = False   # True: _decide also takes the item ids of every sample (see item_groups)
    group_by: tuple = ("caption",)   # which item ids the loop computes for it
    uses_losses = False              # True: _decide also takes the per-sample losses
    uses_base = False                # True: _decide also takes the base model's losses and magnitudes

    def base_rows(self, groups: torch.Tensor) -> torch.Tensor | None:
        """[B] bool: the samples whose base signals the policy reads (None: all of them, when it reads any)."""
        return None
    needs_magnitude = True           # False: the loop runs no extra forward for it

    def decide(self, magnitudes: torch.Tensor, timesteps: torch.Tensor | None = None,
               eligible: torch.Tensor | None = None, groups: torch.Tensor | None = None,
               losses: torch.Tensor | None = None, base_losses: torch.Tensor | None = None,
               base_magnitudes: torch.Tensor | None = None) -> torch.Tensor:
        """Keep mask for one global batch.

        Args:
            magnitudes: [N] float32 magnitudes of the global batch.
            timesteps: [N] integer timesteps (used by timestep-aware policies).
            eligible: [N] bool, samples the policy judges; the others (e.g. samples whose caption was
                dropped for classifier-free guidance, whose magnitude is 0 by construction) are kept
                and do not enter the statistics. Default: all eligible. A non-finite magnitude is dropped
                and never enters the statistics.
            groups: [N] or [N, G] int64 item ids (see item_groups), for policies that gather evidence per
                item (`uses_groups`); ignored by the others.
            losses: [N] per-sample training losses, for policies that read them (`uses_losses`).
            base_losses, base_magnitudes: [N] the frozen base model's loss and magnitude at each sample's x_t and
                t, for policies whose null is the base model (`uses_base`).
        Returns:
            [N] bool, True = the sample stays in the loss.
        """
        m = magnitudes.detach().float().cpu()
        t = None if timesteps is None else timesteps.detach().long().cpu()
        elig = torch.ones_like(m, dtype=torch.bool) if eligible is None else eligible.detach().bool().cpu()
        keep = torch.ones_like(m, dtype=torch.bool)
        # a NaN/inf in what the policy measures (m; the loss for one that reads no m) is dropped and kept out of the
        # statistics
        measured = (m if self.needs_magnitude else losses.detach().float().cpu() if self.uses_losses and
                    losses is not None else torch.zeros_like(m))
        broken = elig & ~torch.isfinite(measured)
        keep[broken] = False
        elig = elig & ~broken
        if elig.any():
            tt = None if t is None else t[elig]
            if self.uses_groups:
                if groups is None:
                    raise ValueError(f"the {self.name} policy needs the group (item) ids of every sample")
                keep[elig] = self._decide(m[elig], tt, groups.detach().long().cpu()[elig],
                                          **self._inputs(elig, losses, base_losses, base_magnitudes))
            else:
                keep[elig] = self._decide(m[elig], tt, **self._inputs(elig, losses, base_losses, base_magnitudes))
        return keep.to(magnitudes.device)

    def _inputs(self, elig, losses, base_losses, base_magnitudes) -> dict:
        """The per-sample inputs beyond m and t that this policy reads, on the CPU, for the judged samples."""
        wanted = {"losses": (self.uses_losses, losses), "base_losses": (self.uses_base, base_losses),
                  "base_magnitudes": (self.uses_base, base_magnitudes)}
        out = {}
        for name, (used, x) in wanted.items():
            if used:
                if x is None:
                    raise ValueError(f"the {self.name} policy needs {name} of every sample")
                out[name] = x.detach().float().cpu()[elig]
        return out

    def _decide(self, m: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def thresholds(self) -> dict[str, float]:
        """Current thresholds, for logging (empty when the policy has none)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class NoFilter(FilterPolicy):
    """Keeps everything: the baseline."""

    name = "none"
    needs_magnitude = False

    def decide(self, magnitudes, timesteps=None, eligible=None, groups=None, losses=None, **base):
        # everything, even a NaN magnitude (m is NaN when a plain fine-tune does not measure it)
        return torch.ones_like(magnitudes, dtype=torch.bool)

    def _decide(self, m, t):
        return torch.ones_like(m, dtype=torch.bool)


def _check_window(policy) -> None:
    """A windowed policy starts once `warmup` values are in a window of `window`."""
    if policy.warmup > policy.window:
        raise ValueError(f"filter.warmup={policy.warmup} > filter.window={policy.window}: the filter would never "
                         "start; lower filter.warmup or raise filter.window")


@dataclass
class FixedThreshold(FilterPolicy):
    """Drops samples with m > threshold (Wen et al. used 2.0 for SD v1.4 at 512 px).

    Args:
        threshold: magnitude above which a sample is dropped. No default: it depends on the model,
            the resolution and the timestep distribution, so it must be chosen for the setup.
        calibration: a calibration file (memfilter-calibrate, filtering.calibration) whose overall threshold replaces
            `threshold` (`filter=fixed filter.calibration=<file>`). Default None.
    """

    threshold: float | None = setting(must="a number > 0 (inf keeps everything), e.g. filter.threshold=2.0, or null "
                                           "with filter.calibration=<file>",
                                      check=lambda v: v is None or (isinstance(v, (int, float))
                                                                    and not isinstance(v, bool) and v > 0))
    calibration: str | None = setting(None, "null or a calibration file (memfilter-calibrate)",
                                      lambda v: v is None or isinstance(v, str))
    name = "fixed"

    def __post_init__(self):
        check_settings(self, "filter.")
        if self.threshold is None and self.calibration is None:
            raise ValueError("filter=fixed needs filter.threshold=<number> or filter.calibration=<file>")
        if self.calibration is not None:
            from memfilter.filtering.calibration import load_calibration
            self.threshold = load_calibration(self.calibration).threshold

    def _decide(self, m, t):
        return m <= self.threshold

    def thresholds(self):
        return {"threshold": float(self.threshold)}


@dataclass
class BatchQuantile(FilterPolicy):
    """Drops the `drop_fraction` largest magnitudes of every global batch.

    Args:
        drop_fraction: share of each batch to drop, in [0, 1). round(drop_fraction * N) samples
            go; ties are broken by position, so the decision is deterministic. Default 0.1.
    """

    drop_fraction: float = setting(0.1, "a number in [0, 1), e.g. filter.drop_fraction=0.1", num_in(0, 1, hi_open=True))
    name = "batch_quantile"

    def __post_init__(self):
        check_settings(self, "filter.")

    def _decide(self, m, t):
        n_drop = int(round(self.drop_fraction * m.numel()))
        keep = torch.ones_like(m, dtype=torch.bool)
        if n_drop > 0:
            order = torch.sort(m, descending=True, stable=True).indices
            keep[order[:n_drop]] = False
        return keep


class _Window:
    """The last `size` values seen, as a plain tensor (easy to save, exact to restore)."""

    def __init__(self, size: int):
        self.size = size
        self.values = torch.empty(0)

    def add(self, x: torch.Tensor) -> None:
        self.values = torch.cat([self.values, x.float()])[-self.size:]

    def __len__(self) -> int:
        return self.values.numel()


def _restore_windows(wins: list, values: list) -> None:
    """Per-bucket windows back from a checkpoint, which must have as many buckets as the config."""
    if len(values) != len(wins):
        raise ValueError(f"checkpoint has {len(values)} timestep buckets, config filter.num_buckets={len(wins)}")
    for w, v in zip(wins, values):
        w.values = v.clone().float()


def _check_update_with(update_with: str, statistic: str, allowed: tuple) -> None:
    """update_with=kept with a quantile threshold ratchets: the window then holds only values below the last
    threshold, whose q-quantile is lower again (q = 0.9 keeps 90% a step, the next threshold is the 0.81
    quantile of the first, and so on: simulated, the kept fraction fell 0.73 -> 0.09 in 3000 steps)."""
    if update_with not in allowed:
        raise ValueError(f"filter.update_with={update_with!r}: expected one of {', '.join(allowed)}")
    if update_with == "kept" and statistic == "quantile":
        raise ValueError("filter.update_with=kept with a quantile threshold would lower the threshold at every "
                         "update (a quantile of the kept samples alone is below the last one); use "
                         "filter.update_with=all, or filter.statistic=median_mad with kept")


def _robust_threshold(values: torch.Tensor, statistic: str, k: float, quantile: float) -> float:
    if statistic == "median_mad":
        med = values.median()
        mad = (values - med).abs().median()
        return float(med + k * MAD_TO_STD * mad)
    if statistic == "quantile":
        return float(torch.quantile(values, quantile))
    if statistic == "mean_std":  # not robust; kept to show why (see module docstring)
        return float(values.mean() + k * values.std(unbiased=False))
    raise ValueError(f"statistic={statistic!r}: expected median_mad, quantile or mean_std")


@dataclass
class RunningQuantile(FilterPolicy):
    """Threshold = a quantile of the magnitudes of the last `window` judged samples.

    Args:
        quantile: the quantile used as threshold (0.9 drops about the top 10%). Default 0.9.
        window: how many past magnitudes the estimate uses. Default 4096.
        warmup: keep everything until this many magnitudes have been seen. Default 256.
        update_with: "all" (every judged sample enters the window; the only choice: a quantile of the kept
            samples alone sits below the quantile of all of them, so each update would lower it again and
            the threshold would fall without end, see `_check_update_with`). Default "all".
    """

    quantile: float = setting(0.9, "a number in (0, 1), e.g. filter.quantile=0.9", num_in(0, 1, lo_open=True, hi_open=True))
    window: int = setting(4096, "an integer >= 1", int_at_least(1))
    warmup: int = setting(256, "an integer >= 1", int_at_least(1))
    update_with: str = setting("all", "all (a quantile of the kept samples alone would fall without end)",
                               lambda v: v == "all")
    name = "running_quantile"

    def __post_init__(self):
        check_settings(self, "filter.")
        _check_window(self)
        _check_update_with(self.update_with, "quantile", ("all",))
        self._win = _Window(self.window)
        self._threshold = math.inf

    def _decide(self, m, t):
        active = len(self._win) >= self.warmup
        self._threshold = float(torch.quantile(self._win.values, self.quantile)) if active else math.inf
        self._win.add(m)
        return m <= self._threshold

    def thresholds(self):
        return {"threshold": self._threshold} if math.isfinite(self._threshold) else {}

    def state_dict(self):
        return {"values": self._win.values.clone(), "threshold": self._threshold}

    def load_state_dict(self, state):
        self._win.values = state["values"].clone().float()
        self._threshold = float(state["threshold"])


@dataclass
class TimestepBucketed(FilterPolicy):
    """Compares each magnitude with the running statistics of its timestep bucket.

    m grows and shrinks with t by an order of magnitude, so one number cannot serve every timestep.
    Timesteps [0, num_train_timesteps) are cut into `num_buckets` equal buckets, each with its own
    window of past magnitudes and its own threshold.

    Args:
        num_buckets: number of equal timestep buckets. Default 10.
        num_train_timesteps: the noise scheduler's num_train_timesteps. Default 1000.
        statistic: "median_mad" (threshold = median + k * 1.4826 * MAD, robust; default),
            "quantile" (threshold = the `quantile` of the window) or "mean_std" (mean + k * std,
            not robust to a large memorized share; there for comparison).
        k: multiplier for median_mad / mean_std. Default 3.0.
        quantile: quantile for statistic="quantile". Default 0.9.
        window: past magnitudes kept per bucket. Default 1024.
        warmup: magnitudes a bucket must have seen before it filters. Default 32.
        update_with: "all", "kept" (only kept samples enter the windows: with median_mad or mean_std only;
            a quantile of kept samples alone would fall without end, see `_check_update_with`), or
            "warmup": only the first `warmup`
            magnitudes of each bucket form its statistics, which are then frozen: a threshold calibrated
            at the start of fine-tuning, on the pretrained model's magnitudes, before anything is
            memorized, that memorized samples can never drag along. Default "all".
        calibration: a calibration file (memfilter-calibrate) whose per-bucket thresholds are used, frozen, instead
            of the running statistics (its bucket count must equal num_buckets; a bucket without a threshold keeps
            its samples). Default None.
    """

    num_buckets: int = setting(10, "an integer in [1, 1000]", lambda v: int_at_least(1)(v) and v <= 1000)
    num_train_timesteps: int = 1000
    statistic: str = setting("median_mad", "median_mad, quantile or mean_std",
                             lambda v: v in ("median_mad", "quantile", "mean_std"))
    k: float = setting(3.0, "a number > 0, e.g. filter.k=3", lambda v: is_num(v) and v > 0)
    quantile: float = setting(0.9, "a number in (0, 1)", num_in(0, 1, lo_open=True, hi_open=True))
    window: int = setting(1024, "an integer >= 1", int_at_least(1))
    warmup: int = setting(32, "an integer >= 1", int_at_least(1))
    update_with: str = setting("all", "all, kept or warmup", lambda v: v in ("all", "kept", "warmup"))
    calibration: str | None = setting(None, "null or a calibration file (memfilter-calibrate)",
                                      lambda v: v is None or isinstance(v, str))
    name = "timestep"

    def __post_init__(self):
        check_settings(self, "filter.")
        _check_window(self)
        _robust_threshold(torch.ones(2), self.statistic, self.k, self.quantile)  # validate statistic
        _check_update_with(self.update_with, self.statistic, ("all", "kept", "warmup"))
        self._wins = [_Window(self.window) for _ in range(self.num_buckets)]
        self._thresholds = [math.inf] * self.num_buckets
        self._frozen = self.calibration is not None
        if self._frozen:
            self._thresholds = _calibrated_buckets(self.calibration, self.num_buckets, self.num_train_timesteps)
            self._frozen_table = torch.tensor(self._thresholds)     # [num_buckets], made once, not per batch

    def bucket_of(self, t: torch.Tensor) -> torch.Tensor:
        return (t.long() * self.num_buckets // self.num_train_timesteps).clamp(0, self.num_buckets - 1)

    def _decide(self, m, t):
        if t is None:
            raise ValueError("the timestep policy needs the timesteps of the batch")
        buckets = self.bucket_of(t)
        if self._frozen:                              # calibrated: fixed per-bucket thresholds, no statistics
            return m <= self._frozen_table.to(m.device, m.dtype)[buckets]
        keep = torch.ones_like(m, dtype=torch.bool)
        for b in buckets.unique().tolist():          # thresholds from past batches only
            win = self._wins[b]
            self._thresholds[b] = (_robust_threshold(win.values, self.statistic, self.k, self.quantile)
                                   if len(win) >= self.warmup else math.inf)
            sel = buckets == b
            keep[sel] = m[sel] <= self._thresholds[b]
        for b in buckets.unique().tolist():
            sel = buckets == b if self.update_with != "kept" else (buckets == b) & keep
            if self.update_with == "warmup":
                free = max(0, self.warmup - len(self._wins[b]))
                sel = sel & (torch.cumsum(sel.long(), 0) <= free)
            self._wins[b].add(m[sel])
        return keep

    def thresholds(self):
        return {f"threshold/bucket{b}": v for b, v in enumerate(self._thresholds) if math.isfinite(v)}

    def state_dict(self):
        return {"values": [w.values.clone() for w in self._wins], "thresholds": list(self._thresholds)}

    def load_state_dict(self, state):
        _restore_windows(self._wins, state["values"])
        self._thresholds = [float(x) for x in state["thresholds"]]


def _calibrated_buckets(path: str, num_buckets: int, num_train_timesteps: int) -> list[float]:
    """filter.calibration's per-bucket thresholds (+inf where a bucket has none), checked against the policy's."""
    from memfilter.filtering.calibration import load_calibration

    cal = load_calibration(path)
    if not cal.bucket_thresholds:
        raise ValueError(f"filter.calibration={path}: the file has no per-timestep thresholds (it was calibrated "
                         "without timesteps); use filter=fixed with it, or calibrate with a timestep column")
    if (cal.num_buckets, cal.num_train_timesteps) != (num_buckets, num_train_timesteps):
        raise ValueError(f"filter.calibration={path} has {cal.num_buckets} buckets over {cal.num_train_timesteps} "
                         f"timesteps, the policy {num_buckets} over {num_train_timesteps}: set "
                         f"filter.num_buckets={cal.num_buckets}")
    return [math.inf if x is None else float(x) for x in cal.bucket_thresholds]


@dataclass
class CaptionHistory(FilterPolicy):
    """Drops every sample of a caption once that caption's magnitudes have risen above their own start.

    A single sample's m is noisy (it depends on its noise and timestep), and memorization builds up over
    many appearances of the same item; Wen et al.'s detection averages m over generations and steps of
    one prompt for the same reason. This policy does that during training, per caption:

    1. each magnitude is normalised by the running median of its timestep bucket: r = m / median_b(t);
    2. per caption (a group id: a hash of the caption text), the mean r of its first `baseline`
       appearances is its baseline, and an exponential average of r (weight `decay` per appearance) its
       current score;
    3. a sample is dropped when its caption has a baseline and score / baseline > `threshold`.

    Every judged sample, kept or dropped, updates its caption's score, so a caption whose m stays high
    keeps being dropped, and its item stops being learned from its first signs of memorization on. A
    caption seen fewer than `baseline` times (every unique item of a web-scale set) is never dropped.
    The state grows with the number of distinct captions judged (four numbers each).

    Args:
        threshold: score / baseline above which a caption's samples are dropped. Default 1.1.
        baseline: appearances that form a caption's baseline. Default 16.
        decay: weight of the newest appearance in the score. Default 0.06.
        num_buckets: equal timestep buckets for the normalisation. Default 10.
        num_train_timesteps: the noise scheduler's num_train_timesteps. Default 1000.
        window: past magnitudes per bucket for its running median. Default 1024.
        warmup: magnitudes a bucket must have seen before its samples count. Default 32.
        min_timestep: only samples at t >= min_timestep update a caption's score (the memorized detail
            shows in the noise prediction at high noise; at low noise x_t already holds it); the decision
            applies to the caption's samples at every t. Default 500.
    """

    threshold: float = setting(1.1, "a number > 1, e.g. filter.threshold=1.15", lambda v: is_num(v) and v > 1)
    baseline: int = setting(16, "an integer >= 1", int_at_least(1))
    decay: float = setting(0.06, "a number in (0, 1]", num_in(0, 1, lo_open=True))
    min_timestep: int = setting(500, "an integer >= 0, e.g. filter.min_timestep=500", int_at_least(0))
    num_buckets: int = setting(10, "an integer in [1, 1000]", lambda v: int_at_least(1)(v) and v <= 1000)
    num_train_timesteps: int = 1000
    window: int = setting(1024, "an integer >= 1", int_at_least(1))
    warmup: int = setting(32, "an integer >= 1", int_at_least(1))
    name = "caption"
    uses_groups = True

    def __post_init__(self):
        check_settings(self, "filter.")
        _check_window(self)
        self._wins = [_Window(self.window) for _ in range(self.num_buckets)]
        self._groups: dict[int, list[float]] = {}          # id -> [count, baseline sum, score, last ratio]

    def _decide(self, m, t, g):
        if t is None:
            raise ValueError("the caption policy needs the timesteps of the batch")
        buckets = (t.long() * self.num_buckets // self.num_train_timesteps).clamp(0, self.num_buckets - 1)
        med = torch.tensor([float(self._wins[b].values.median()) if len(self._wins[b]) >= self.warmup
                            else float("nan") for b in range(self.num_buckets)])
        keep = torch.ones_like(m, dtype=torch.bool)
        for i in range(m.numel()):                  # in batch order: the same on every rank
            st = self._groups.get(int(g[i]))
            if st is not None and st[0] >= self.baseline:          # judged on its caption's past, then added
                keep[i] = not st[2] > self.threshold * st[1] / self.baseline
            ref = med[buckets[i]]
            if int(t[i]) >= self.min_timestep and torch.isfinite(ref) and ref > 0:
                r = float(m[i] / ref)
                st = self._groups.setdefault(int(g[i]), [0.0, 0.0, 0.0, 0.0])
                if st[0] < self.baseline:
                    st[1] += r
                    st[2] = st[1] / (st[0] + 1)
                else:
                    st[2] = (1 - self.decay) * st[2] + self.decay * r
                st[0] += 1
                st[3] = r
        for b in buckets.unique().tolist():
            self._wins[b].add(m[buckets == b])
        return keep

    def thresholds(self):
        judged = [v for v in self._groups.values() if v[0] > self.baseline]
        if not judged:
            return {}
        rel = torch.tensor([v[2] / (v[1] / self.baseline) for v in judged])
        return {"captions_tracked": float(len(self._groups)), "captions_dropping": float((rel > self.threshold).sum()),
                "score_ratio_max": float(rel.max())}

    def state_dict(self):
        ids = sorted(self._groups)
        return {"values": [w.values.clone() for w in self._wins], "group_ids": torch.tensor(ids, dtype=torch.long),
                "group_state": torch.tensor([self._groups[i] for i in ids], dtype=torch.float64).reshape(-1, 4)}

    def load_state_dict(self, state):
        _restore_windows(self._wins, state["values"])
        self._groups = {int(i): [float(x) for x in row]
                        for i, row in zip(state["group_ids"].tolist(), state["group_state"].tolist())}


@dataclass
class ItemEvidence(FilterPolicy):
    """Drops every sample of an item (an image; a caption on request) that the model, fine-tuned, treats
    differently from the items it has rarely seen, *relative to what the base model does on the same input*.
    The default policy.

    Memorization is a property of an item seen many times, not of one draw: one sample's signals are noisy (its
    noise and timestep), and memorization builds up over an item's appearances. So evidence is gathered per item,
    in units that do not depend on how the data reaches the model:

    1. time is counted in samples seen, in *epochs of distinct items*: an item's counts halve every
       `half_life_epochs` x D samples, D the number of distinct items seen so far (a 4 KiB HyperLogLog sketch,
       filtering.sketch). A typical item, seen once per pass over the data, keeps a decayed count near 1; one
       repeated r times per pass keeps ~r x half_life_epochs / ln 2. So the same exposures give the same
       counts at batch 1 or 2048, on 1 or 64 GPUs, with any accumulation, and on 2k or 200M items;
    2. the null (`null`): with "base" (the default) a sample's signals are taken relative to the frozen base
       model *on the same noisy input and timestep* (the loop's anchor copy; LoRA: adapters off): loss
       log(L_base / L) (the fine-tuned model denoising this very input better than the base did) and magnitude
       log(m / m_base) (Wen et al.'s text-conditional magnitude, grown since the base). An image that is hard
       or easy for the base, or that the base had memorized before fine-tuning, is then not evidence by itself.
       "population": the raw signals -log L and log m (no extra forward; per-image difficulty is then evidence);
    3. reference: per timestep bucket, the last `window` values of each signal over samples of items *rarely
       seen lately* (decayed count < `rare_count`: every item of a single pass, and every item at its first
       appearance). Repeated items never enter it, so a large duplicated share cannot drag it along;
    4. per sample and signal, z = the normal quantile of the sample's rank within its bucket's reference
       (N(0, 1) for an ordinary sample whatever the signal's shape; bounded, so one outlier cannot carry an
       item), minus the mean z of the last `window` rarely-seen samples (the population *now*: the window lags
       while the model moves, e.g. in a learning-rate warm-up);
    5. per item id (see `group_by`): the decayed count of its appearances (the gate above) and, per signal, the
       decayed sum of z and count of samples that measured it;
    6. an item is flagged when, for any signal, its mean z is above `margin` with confidence: mean -
       z_crit / sqrt(n) > margin with n >= `min_count` measured appearances (one-sided; about 0.13% per look and
       signal at z_crit 3 for an item whose true mean is at the margin). A flagged item stays flagged (by
       default) or, with `release` set, until its evidence falls to `release` for every signal;
    7. a sample is dropped when any of its items is flagged, unless `readmit` > 0 and every flagged item of it
       has been trained on less than `readmit` times lately (decayed count). Dropped samples keep adding evidence.

    Only an item repeated at least ~min_count x ln 2 / half_life_epochs (5.5 at the defaults) times as often as a
    typical item can gather `min_count` appearances within a half-life; only those can be flagged, and only when
    the fine-tuned model treats them differently from fresh ones. The state is bounded: at most `capacity` items,
    least recently seen evicted first (an evicted item starts again from nothing); each tracked item costs
    8 * (6 + #signals) bytes in a checkpoint (id, count, clock, flag, trained count, measured count and one sum
    per signal: 64 bytes with two signals) and about 390 bytes of Python objects in memory (measured with
    tracemalloc over 100k items: ~6 MB and ~39 MB), plus 4 KiB of sketch.

    Args:
        margin: mean z (in units of the per-sample spread) above which an item stands out. Default 0.0:
            any confident excess over fresh items.
        z_crit: confidence multiplier of the test. Default 3.0.
        min_count: measured appearances (decayed) an item needs before it can be flagged. Default 8.
        half_life_epochs: after this many passes over the distinct items seen, old evidence weighs half.
            Default 1.0.
        null: "base" (signals relative to the frozen base model on the same input: needs its forward with the
            prompt and with the empty prompt) or "population" (raw signals, no extra forward). Default "base".
        base_fraction: with null "base", the share of rarely-seen samples the base is run on (they form the
            reference); every sample of an item seen lately (one that can gather evidence) is always measured.
            1 measures everything; 0.25 costs the base's two forwards on ~25% of fresh samples plus the repeated
            ones (see `base_rows`). Default 1.0.
        min_timestep: only samples at t >= min_timestep add evidence; the decision applies at every t.
            Default 0.
        num_buckets: equal timestep buckets of the reference. Default 10.
        num_train_timesteps: the noise scheduler's num_train_timesteps. Default 1000.
        window: reference samples per bucket; short, so that the reference is the model *now*. Default 64.
        warmup: reference samples a bucket needs before its samples add evidence. Default 16.
        capacity: items tracked at most. Default 100000.
        rare_count: an item whose decayed count is below this is "rarely seen" and enters the reference.
            Default 1.0.
        release: None (a flagged item stays flagged) or the mean z (<= `margin`) at which it is released.
            Default None.
        readmit: a flagged item's appearance is trained on when the item's decayed count of trained
            appearances is below this; 0 never. Default 0.
        group_by: the item ids of a sample: "image" (an id of the source image before any random crop or flip,
            or the prep manifest's, see filtering.items) and/or "caption" (its caption's hash: only where a
            caption names one item). The first kind also decides rarity. Default ("image",).
        evidence: the signals, "loss" and/or "magnitude". Default ("loss", "magnitude").
    """

    margin: float = setting(0.0, "a number >= 0, e.g. filter.margin=0", lambda v: is_num(v) and v >= 0)
    z_crit: float = setting(3.0, "a number >= 0, e.g. filter.z_crit=3", lambda v: is_num(v) and v >= 0)
    min_count: float = setting(8.0, "a number >= 1, e.g. filter.min_count=8", lambda v: is_num(v) and v >= 1)
    half_life_epochs: float = setting(1.0, "a number > 0 (passes over the distinct items), e.g. "
                                      "filter.half_life_epochs=1", lambda v: is_num(v) and v > 0)
    null: str = setting("base", "base or population", lambda v: v in ("base", "population"))
    base_fraction: float = setting(1.0, "a number in (0, 1], e.g. filter.base_fraction=0.25",
                                   num_in(0, 1, lo_open=True))
    min_timestep: int = setting(0, "an integer >= 0, e.g. filter.min_timestep=500", int_at_least(0))
    num_buckets: int = setting(10, "an integer in [1, 1000]", lambda v: int_at_least(1)(v) and v <= 1000)
    num_train_timesteps: int = 1000
    window: int = setting(64, "an integer >= 1", int_at_least(1))
    warmup: int = setting(16, "an integer >= 1", int_at_least(1))
    capacity: int = setting(100_000, "an integer >= 1, e.g. filter.capacity=100000", int_at_least(1))
    rare_count: float = setting(1.0, "a number > 0, e.g. filter.rare_count=1", lambda v: is_num(v) and v > 0)
    release: float | None = setting(None, "null (hold a flagged item) or a number <= filter.margin",
                                    lambda v: v is None or is_num(v))
    readmit: float = setting(0.0, "a number in [0, 1], e.g. filter.readmit=0.5 (0: never)", num_in(0, 1))
    group_by: tuple = setting(("image",), "a non-empty list of caption and/or image, e.g. "
                              "filter.group_by=[caption,image]", lambda v: len(v) >= 1 and set(v) <= {"caption", "image"})
    evidence: tuple = setting(("loss", "magnitude"), "a non-empty list of magnitude and/or loss, e.g. "
                              "filter.evidence=[magnitude,loss]", lambda v: len(v) >= 1 and set(v) <= {"magnitude", "loss"})
    name = "item"
    uses_groups = True
    _FIXED = 6          # per-item row: count, clock, flag, trained, measured, (one sum per signal), id in front

    def __post_init__(self):
        check_settings(self, "filter.")
        _check_window(self)
        self.group_by, self.evidence = tuple(self.group_by), tuple(self.evidence)
        if self.release is not None and self.release > self.margin:
            raise ValueError(f"filter.release={self.release} > filter.margin={self.margin}: an item would be "
                             "released as soon as it is flagged; set release <= margin, or null to hold it")
        self._wins = [[_Window(self.window) for _ in range(self.num_buckets)] for _ in self.evidence]
        self._now = [_Window(self.window) for _ in self.evidence]     # recent rarely-seen z: the population now
        self._items: OrderedDict[int, list] = OrderedDict()  # id -> [count, clock, flag, trained, measured, sums..]
        self._distinct = DistinctCount()
        self._clock = 0.0               # accumulated ln-decay: an item's counts decay by exp(-(clock - its clock))
        self._samples = 0

    @property
    def uses_losses(self) -> bool:
        return "loss" in self.evidence or self.null == "base"

    @property
    def uses_base(self) -> bool:
        """The loop must hand the base model's loss and magnitude at each sample's x_t and t."""
        return self.null == "base"

    def base_rows(self, groups: torch.Tensor) -> torch.Tensor | None:
        """[B] bool: the samples of a (local) batch whose base signals this policy reads, from the state before the
        batch (the same on every rank): every sample of an item seen lately, and a `base_fraction` share of the
        others, chosen by a hash of (item, samples seen). None: every sample (or no base at all)."""
        if not self.uses_base or self.base_fraction >= 1.0:
            return None
        pick = self.base_fraction * 2 ** ID_BITS
        rows = []
        for gid in groups.reshape(groups.shape[0], -1)[:, 0].tolist():
            rows.append(bool(gid) and (self._seen(gid) >= self.rare_count
                                       or mix48(gid ^ (self._samples * 0x9E3779B1 + 1)) < pick))
        return torch.tensor(rows, dtype=torch.bool)

    def _signals(self, m, losses, base_losses, base_magnitudes) -> list[torch.Tensor]:
        """[N] per signal, larger = more like memorization (see the class docstring, 2)."""
        log = lambda x: x.float().clamp_min(1e-12).log()  # noqa: E731
        out = []
        for e in self.evidence:
            if self.null == "base":
                out.append(log(base_losses) - log(losses) if e == "loss" else log(m) - log(base_magnitudes))
            else:
                out.append(-log(losses) if e == "loss" else log(m))
        return out

    def _zscores(self, x: torch.Tensor, buckets: torch.Tensor, wins: list) -> torch.Tensor:
        """[N] the normal quantile of each value's mid-rank within its bucket's reference (NaN while the bucket
        warms up, or where the value is not finite)."""
        z = torch.full((x.shape[0],), float("nan"))
        for b in buckets.unique().tolist():
            ref = wins[b].values
            if ref.numel() < self.warmup:
                continue
            sel = (buckets == b) & torch.isfinite(x)
            xs = x[sel].float()[:, None]
            u = ((xs > ref).sum(1) + 0.5 * (xs == ref).sum(1) + 0.5) / (ref.numel() + 1)
            z[sel] = math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)
        return z

    def _expose(self, ids: list) -> torch.Tensor:
        """Count every sample's appearance, in batch order, each at its own time: the clock moves by one sample
        in half-lives of half_life_epochs x distinct items seen, so a batch of 2048 counts as 2048 batches of 1.
        Returns [N] whether each sample's first item was rarely seen before it."""
        rare = []
        for row in ids:
            distinct = self._distinct.add_one(row[0])
            self._clock += math.log(2.0) / (self.half_life_epochs * max(distinct, 1.0))
            before = self._row(row[0])[0] if row[0] else math.inf     # no id: no item to tell apart
            rare.append(before < self.rare_count)
            for gid in (x for x in row if x):
                self._row(gid)[0] += 1.0
        self._samples += len(ids)
        return torch.tensor(rare, dtype=torch.bool)

    def _row(self, gid: int) -> list:
        """Item `gid`'s row, decayed to now and most recently seen (a new one, evicting the least recently seen
        item beyond `capacity`)."""
        row = self._items.get(gid)
        if row is None:
            row = self._items[gid] = [0.0, self._clock, 0.0, 0.0, 0.0] + [0.0] * len(self.evidence)
            if len(self._items) > self.capacity:
                self._items.popitem(last=False)
            return row
        self._items.move_to_end(gid)
        f = math.exp(row[1] - self._clock)
        row[0], row[1], row[3], row[4] = row[0] * f, self._clock, row[3] * f, row[4] * f
        row[5:] = [x * f for x in row[5:]]
        return row

    def _judge(self, gid: int, z: list | None) -> bool:
        """Add one appearance's evidence z (or none) to item `gid` (counted by _expose); returns whether the
        item is flagged."""
        row = self._items.get(gid)
        if row is None:                                  # evicted within this batch (capacity < its items)
            return False
        if z is not None:
            row[4] += 1.0
            row[5:] = [s + zk for s, zk in zip(row[5:], z)]
        if row[4] > 0:
            means = [s / row[4] for s in row[5:]]
            if row[2]:
                row[2] = float(self.release is None or max(means) > self.release)
            elif row[4] >= self.min_count:
                row[2] = float(max(means) - self.z_crit / math.sqrt(row[4]) > self.margin)
                row[3] = 0.0 if row[2] else row[3]         # from the flag on, `readmit` counts afresh
        return bool(row[2])

    def _seen(self, gid: int) -> float:
        """Decayed count of item `gid`'s appearances so far (0 for an item not tracked)."""
        row = self._items.get(gid)
        return 0.0 if row is None else row[0] * math.exp(row[1] - self._clock)

    def _evidence(self, m, t, rare, losses, base_losses, base_magnitudes) -> torch.Tensor:
        """[N, S] z per sample and signal (NaN where it gives none). The reference and the population window
        take this batch's rarely-seen samples first, so a large batch is judged against its own population."""
        buckets = (t.long() * self.num_buckets // self.num_train_timesteps).clamp(0, self.num_buckets - 1)
        signals = self._signals(m, losses, base_losses, base_magnitudes)
        for x, wins in zip(signals, self._wins):     # the reference: items the model has rarely seen lately
            for b in buckets.unique().tolist():
                wins[b].add(x[(buckets == b) & rare & torch.isfinite(x)])
        z = torch.stack([self._zscores(x, buckets, wins) for x, wins in zip(signals, self._wins)], 1)  # [N, S]
        for k, now in enumerate(self._now):
            now.add(z[rare & torch.isfinite(z[:, k]), k])
            if len(now):
                z[:, k] -= now.values.mean()
        return z

    def _decide(self, m, t, g, losses=None, base_losses=None, base_magnitudes=None):
        if t is None:
            raise ValueError("the item policy needs the timesteps of the batch")
        if self.null == "base" and (base_losses is None or base_magnitudes is None):
            raise ValueError("filter.null=base needs the base model's loss and magnitude of every sample (the "
                             "training loop computes them); use filter.null=population without a base model")
        ids = g.reshape(m.numel(), -1).tolist()                          # [N, G] item ids, 0 = none
        rare = self._expose(ids)
        z = self._evidence(m, t, rare, losses, base_losses, base_magnitudes)
        usable = (t >= self.min_timestep) & torch.isfinite(z).all(1)
        keep = torch.ones_like(m, dtype=torch.bool)
        for i, (zi, ok) in enumerate(zip(z.tolist(), usable.tolist())):   # in batch order: the same on every rank
            mine = [gid for gid in ids[i] if gid]
            flagged = [gid for gid in mine if self._judge(gid, zi if ok else None)]
            keep[i] = all(self._items[gid][3] < self.readmit for gid in flagged if gid in self._items)
            if keep[i]:
                for gid in mine:
                    if gid in self._items:
                        self._items[gid][3] += 1.0                 # trained on (decayed count)
        return keep

    def thresholds(self):
        if not self._items:
            return {}
        flags = [row[2] for row in self._items.values()]
        return {"items_tracked": float(len(flags)), "items_flagged": float(sum(flags)),
                "distinct_items": self._distinct.estimate()}

    def state_dict(self):
        ids = list(self._items)                         # LRU order: eviction resumes exactly
        width = self._FIXED - 1 + len(self.evidence)
        rows = torch.tensor([self._items[i] for i in ids], dtype=torch.float64).reshape(-1, width)
        return {"values": [w.values.clone() for wins in self._wins for w in wins],
                "now": [w.values.clone() for w in self._now], "item_ids": torch.tensor(ids, dtype=torch.long),
                "item_state": rows, "clock": self._clock, "samples": self._samples,
                "distinct": self._distinct.state_dict()}

    def load_state_dict(self, state):
        width = self._FIXED - 1 + len(self.evidence)
        if "clock" not in state or state["item_state"].shape[-1] != width:
            raise ValueError("the checkpoint's item filter state is not this version's or has another number of "
                             f"signals (config filter.evidence={list(self.evidence)}): resume with the memfilter "
                             "and filter.evidence that wrote it")
        _restore_windows([w for wins in self._wins for w in wins], state["values"])
        _restore_windows(self._now, state["now"])
        self._items = OrderedDict((int(i), [float(x) for x in row])
                                  for i, row in zip(state["item_ids"].tolist(), state["item_state"].tolist()))
        self._clock, self._samples = float(state["clock"]), int(state["samples"])
        self._distinct.load_state_dict(state["distinct"])


@dataclass
class CountAppearances(FilterPolicy):
    """A baseline: drops every appearance of an item after its first `max_count` (deduplication in the stream, by
    the same item ids as the item policy), whatever the model does with it. No magnitude is measured.

    It removes repeated items, memorized or not, and on data seen for many epochs it removes everything after
    epoch `max_count`: the comparison the item policy must beat. State: an LRU table of at most `capacity` items
    (16 bytes each in a checkpoint).

    Args:
        max_count: appearances of an item that are trained on. Default 16.
        capacity: items tracked at most (least recently seen evicted first). Default 100000.
        group_by: the item ids ("image" and/or "caption"; see ItemEvidence). Default ("image",).
    """

    max_count: int = setting(16, "an integer >= 1, e.g. filter.max_count=16", int_at_least(1))
    capacity: int = setting(100_000, "an integer >= 1", int_at_least(1))
    group_by: tuple = setting(("image",), "a non-empty list of caption and/or image, e.g. filter.group_by=[image]",
                              lambda v: len(v) >= 1 and set(v) <= {"caption", "image"})
    name = "count"
    uses_groups = True
    needs_magnitude = False

    def __post_init__(self):
        check_settings(self, "filter.")
        self.group_by = tuple(self.group_by)
        self._counts: OrderedDict[int, int] = OrderedDict()

    def _decide(self, m, t, g):
        keep = torch.ones(m.numel(), dtype=torch.bool)
        for i, row in enumerate(g.reshape(m.numel(), -1).tolist()):     # in batch order: the same on every rank
            for gid in (x for x in row if x):
                n = self._counts.pop(gid, 0) + 1
                self._counts[gid] = n                                       # most recently seen last
                keep[i] &= n <= self.max_count
            while len(self._counts) > self.capacity:
                self._counts.popitem(last=False)
        return keep

    def thresholds(self):
        return {"items_tracked": float(len(self._counts)),
                "items_over": float(sum(n > self.max_count for n in self._counts.values()))}

    def state_dict(self):
        return {"item_ids": torch.tensor(list(self._counts), dtype=torch.long),
                "counts": torch.tensor(list(self._counts.values()), dtype=torch.long)}

    def load_state_dict(self, state):
        self._counts = OrderedDict(zip(state["item_ids"].tolist(), state["counts"].tolist()))


@dataclass
class AntiGradientControl(TimestepBucketed):
    """A baseline after Liu et al. 2025 (IET-AGC's anti-gradient control): skips the samples the model already
    denoises best, i.e. whose training loss is among the lowest `1 - quantile` of recent losses at the same
    timestep (a memorized image's loss falls below its peers'). Per timestep bucket, so that a low-noise sample is
    not skipped for its timestep alone; against a running window, so that the rule is the same at any batch size.
    No magnitude is measured.

    Args: those of `timestep` on the signal -log(loss), with statistic "quantile" and quantile 0.9 (the lowest
    10% of losses are skipped) by default.
    """

    statistic: str = setting("quantile", "quantile or median_mad",
                             lambda v: v in ("median_mad", "quantile"))
    quantile: float = setting(0.9, "a number in (0, 1): the share of losses kept, e.g. filter.quantile=0.9",
                              num_in(0, 1, lo_open=True, hi_open=True))
    name = "agc"
    uses_losses = True
    needs_magnitude = False

    def __post_init__(self):
        if self.calibration is not None:
            raise ValueError("filter.calibration is a magnitude calibration; filter=agc reads losses: leave it null")
        super().__post_init__()

    def _decide(self, m, t, losses=None):
        return super()._decide(-losses.float().clamp_min(1e-12).log(), t)


@dataclass
class Precomputed(FilterPolicy):
    """Keeps out of the loss the samples a curation pass dropped (launch/curate.py), with no magnitude measured in
    the loop (no extra forward). Samples are matched by key; the decision is the same on every rank and at every
    step, and needs no state. Memory: 8 bytes per dropped key.

    Args:
        decisions: a curation pass's decisions folder (decisions/<name>, holding drop.txt), or a drop list (one
            key per line, or Parquet with a `key` column).
    """

    decisions: str = setting(must="a curation pass's decisions folder or its drop.txt, e.g. "
                                   "filter.decisions=outputs/curate/run1/decisions/calibrated",
                             check=lambda v: isinstance(v, str) and v not in ("", "???"))

    name = "precomputed"
    uses_groups = True
    group_by = ("key",)
    needs_magnitude = False

    def __post_init__(self):
        import os

        from memfilter.filtering.protect import read_key_list
        check_settings(self, "filter.")
        path = os.path.join(self.decisions, "drop.txt") if os.path.isdir(self.decisions) else self.decisions
        try:
            keys = read_key_list(path, "filter.decisions")
        except FileNotFoundError as e:
            raise ValueError(str(e)) from None
        self._dropped = torch.tensor(sorted({key_group(k) for k in keys}), dtype=torch.long)

    def decide(self, magnitudes, timesteps=None, eligible=None, groups=None, losses=None, **base):
        if groups is None:
            raise ValueError("the precomputed policy needs the key ids of every sample (item_groups with 'key')")
        keep = ~torch.isin(groups.detach().long().cpu().reshape(len(magnitudes), -1)[:, 0], self._dropped)
        if eligible is not None:                    # protected (intended) samples are kept, as by every policy
            keep |= ~eligible.detach().bool().cpu()
        return keep.to(magnitudes.device)

    def _decide(self, m, t):
        raise NotImplementedError("Precomputed decides by key in decide()")


def key_group(key: str) -> int:
    """The id of a sample key."""
    return id48(str(key).encode())


def caption_group(caption: str) -> int:
    """The group id of a caption (case and surrounding space ignored)."""
    return id48(caption.strip().lower().encode())


def image_groups(pixel_values: torch.Tensor, size: int = 8) -> torch.Tensor:
    """[B] int64 perceptual ids of images [B, 3, H, W]: the average hash (grey, `size` x `size` area means,
    each bit = above the image's median), folded to 48 bits. An image shown again, also re-encoded or with
    small shifts of colour and tint, gets the same id; a random crop or flip makes another, and flat pictures all
    share one: the fallback for batches without source ids (item_groups).
    """
    grey = pixel_values.detach().float().mean(1, keepdim=True)                         # [B, 1, H, W]
    small = torch.nn.functional.adaptive_avg_pool2d(grey, size).flatten(1)             # [B, size*size]
    bits = (small > small.median(dim=1, keepdim=True).values).to(torch.uint8).cpu().numpy()
    return torch.tensor([id48(row.tobytes()) for row in bits], dtype=torch.long)


def item_groups(group_by: tuple, captions: list[str], pixel_values: torch.Tensor | None = None,
                keys: list[str] | None = None, item_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, len(group_by)] int64 item ids of a batch: "caption" (caption_group), "image" and/or "key" (key_group: the
    sample itself). "image" is the batch's `item_ids` (the data pipeline's id of each source picture before any
    random crop or flip, filtering.items.source_item_id, or the prep manifest's) when it carries them; otherwise
    the perceptual hash of the (possibly augmented) pixels, image_groups."""
    cols = []
    for kind in group_by:
        if kind == "caption":
            cols.append(torch.tensor([caption_group(c) for c in captions], dtype=torch.long))
        elif kind == "image":
            cols.append(item_ids.long().cpu().reshape(-1) if item_ids is not None else image_groups(pixel_values))
        elif kind == "key" and keys is not None:
            cols.append(torch.tensor([key_group(k) for k in keys], dtype=torch.long))
        else:
            raise ValueError(f"filter.group_by: {kind!r} is not an item kind; use caption and/or image")
    return torch.stack(cols, dim=1)


POLICIES = {cls.name: cls for cls in (NoFilter, FixedThreshold, BatchQuantile, RunningQuantile, TimestepBucketed,
                                      CaptionHistory, ItemEvidence, CountAppearances, AntiGradientControl, Precomputed)}


def build_policy(name: str, **kwargs) -> FilterPolicy:
    """Policy by name ("none", "fixed", "batch_quantile", "running_quantile", "timestep", "caption")."""
    if name not in POLICIES:
        raise ValueError(f"filter.name={name!r}: expected one of {sorted(POLICIES)}")
    return POLICIES[name](**kwargs)
