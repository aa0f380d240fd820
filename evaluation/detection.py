"""Detection metrics (AUC, TPR at a fixed FPR, the ROC) from any file of labelled scores.

Why here and in numpy: the paper's numbers (Wen et al.: AUC and TPR@1%FPR, 500 memorized vs 500 normal
prompts) are what a detector is judged by, and the score files come from anywhere (filtering.detection,
training records, another method's output). A few exact lines of numpy keep the conventions visible:
- a sample is called positive (memorized) when score >= threshold; label 1 / True = positive;
- tied scores move together, so the ROC has one point per distinct score and the AUC equals the
  Mann-Whitney statistic P(s_pos > s_neg) + P(s_pos = s_neg) / 2;
- TPR@FPR is the largest TPR reachable with FPR <= target, i.e. the TPR at the lowest threshold whose
  FPR <= target, with no interpolation. Wen et al.'s code takes FPR < target (`strict=True`); the two
  differ only when target * n_neg is a whole number of false positives. Jeon et al. and Asthana et al. report
  the TPR at the ROC point whose FPR is closest to the target (`tpr_at_fpr_closest`), which may lie above it.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if np.isnan(s).any():
        raise ValueError(f"{int(np.isnan(s).sum())} scores are NaN")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"labels must be 0/1 or boolean; got values {np.unique(y)[:5]}")
        y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError(f"need positive and negative labels; got {int(y.sum())} positive of {y.size}")
    return s, y


def roc_curve(scores: Sequence[float] | np.ndarray,
              labels: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC with one point per distinct score, from (0, 0) at threshold +inf to (1, 1).

    Args:
        scores: higher = more likely memorized.
        labels: 1 / True = memorized (positive), 0 / False = not.

    Returns: fpr, tpr, thresholds (decreasing; point i predicts positive where score >= thresholds[i]).
    """
    s, y = _check(scores, labels)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]   # index of the last sample of each score
    tp = np.cumsum(y)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    fpr = np.r_[0.0, fp / (~y).sum()]
    tpr = np.r_[0.0, tp / y.sum()]
    return fpr, tpr, np.r_[np.inf, s[last_of_tie]]


def auc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Area under the ROC (trapezoids), equal to the Mann-Whitney statistic with ties counted 1/2.

    Args:
        scores: higher = more likely memorized. labels: 1 / True = positive.
    """
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def tpr_at_fpr(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, fpr: float = 0.01,
               strict: bool = False) -> float:
    """The largest TPR with FPR <= `fpr` (the TPR at the lowest such threshold); no interpolation.

    Args:
        scores: higher = more likely memorized. labels: 1 / True = positive.
        fpr: the target false-positive rate. Default 0.01.
        strict: require FPR < target instead, as Wen et al.'s code does. Default False.
    """
    f, t, _ = roc_curve(scores, labels)
    ok = f < fpr if strict else f <= fpr + 1e-12                  # 1e-12: float rounding of the target
    return float(t[ok].max()) if ok.any() else 0.0                 # (0, 0) qualifies unless strict at 0


def tpr_at_fpr_closest(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
                       fpr: float = 0.01) -> float:
    """The TPR at the ROC point whose FPR is closest to `fpr` (ties: the higher TPR), as Jeon et al. (ICML 2025)
    and Asthana et al. report it; that FPR may exceed the target.

    Args:
        scores: higher = more likely memorized. labels: 1 / True = positive.
        fpr: the target false-positive rate. Default 0.01.
    """
    f, t, _ = roc_curve(scores, labels)
    gap = np.abs(f - fpr)
    return float(t[gap <= gap.min() + 1e-12].max())


def detection_metrics(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
                      fprs: Sequence[float] = (0.01,)) -> dict:
    """AUC, TPR at each target FPR (FPR <= target; Wen et al.'s strict FPR < target; the closest FPR), class counts
    and the ROC, ready for JSON.

    Args:
        scores: higher = more likely memorized. labels: 1 / True = positive.
        fprs: target false-positive rates. Default (0.01,).
    """
    s, y = _check(scores, labels)
    f, t, _ = roc_curve(s, y)
    return {"auc": auc(s, y), "tpr_at_fpr": {f"{x:g}": tpr_at_fpr(s, y, x) for x in fprs},
            "tpr_at_fpr_strict": {f"{x:g}": tpr_at_fpr(s, y, x, strict=True) for x in fprs},
            "tpr_at_fpr_closest": {f"{x:g}": tpr_at_fpr_closest(s, y, x) for x in fprs},
            "n_pos": int(y.sum()), "n_neg": int((~y).sum()), "roc": {"fpr": f.tolist(), "tpr": t.tolist()}}


def _read_table(path: Path):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    suffix = path.suffix.lower()
    if path.is_dir() or suffix in (".parquet", ".pq"):
        return pq.read_table(path)                                 # a directory: per-rank Parquet files
    if suffix in (".csv", ".tsv"):
        return pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ","))
    if suffix in (".jsonl", ".ndjson", ".json"):
        text = path.read_text().lstrip()
        if text.startswith("["):                                   # a .json array of records
            return pa.Table.from_pylist(json.loads(text))
        return pajson.read_json(path)
    raise ValueError(f"{path}: unknown score file type {suffix!r}; use .csv, .tsv, .parquet or .jsonl")


def load_scores(path: str | Path, score_column: str = "score",
                label_column: str = "label") -> tuple[np.ndarray, np.ndarray]:
    """(scores float64, labels bool) from a CSV/TSV, Parquet (file or folder) or JSON-lines file.

    Args:
        path: the score file.
        score_column: column of scores (e.g. "magnitude" for training records). Default "score".
        label_column: column of 0/1 or boolean labels, 1 = memorized. Default "label".
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such score file")
    table = _read_table(path)
    missing = [c for c in (score_column, label_column) if c not in table.column_names]
    if missing:
        raise KeyError(f"{path}: no column {missing}; columns are {table.column_names}")
    scores = table.column(score_column).to_numpy(zero_copy_only=False)
    labels = table.column(label_column).to_numpy(zero_copy_only=False)
    if table.column(score_column).null_count or table.column(label_column).null_count:
        raise ValueError(f"{path}: empty values in {score_column!r} or {label_column!r}")
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"{path}: column {label_column!r} must hold 0/1 or booleans; got {np.unique(y)[:5]}")
        y = y.astype(bool)
    return s, y
