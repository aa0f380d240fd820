"""Detection metrics: exact against brute force and hand-worked examples, and score files of every kind."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memfilter.evaluation.detection import auc, detection_metrics, load_scores, roc_curve, tpr_at_fpr


def _mann_whitney(scores, labels) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_mann_whitney_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 200))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = rng.integers(0, 8, n) + 1.5 * labels          # few distinct values: many ties, some signal
    assert auc(scores, labels) == pytest.approx(_mann_whitney(scores, labels), abs=1e-12)


def test_roc_curve_hand_worked_with_ties():
    fpr, tpr, thr = roc_curve([3, 2, 2, 1], [1, 1, 0, 0])
    assert thr.tolist() == [np.inf, 3, 2, 1]
    assert tpr.tolist() == [0, 0.5, 1, 1] and fpr.tolist() == [0, 0, 0.5, 1]
    assert auc([3, 2, 2, 1], [1, 1, 0, 0]) == pytest.approx(0.875)     # 1 + 1 + 1/2 + 1 of 4 pairs


def test_perfect_and_reversed():
    scores = np.r_[np.linspace(5, 6, 50), np.linspace(0, 1, 200)]
    labels = np.r_[np.ones(50), np.zeros(200)].astype(int)
    assert auc(scores, labels) == 1.0 and tpr_at_fpr(scores, labels, 0.01) == 1.0
    assert auc(-scores, labels) == 0.0 and tpr_at_fpr(-scores, labels, 0.01) == 0.0


def test_tpr_at_fpr_hand_worked():
    # descending: .99 P | .95 N | .93 P | .90 N | .85 P | ... ; 10 negatives, 5 positives
    neg = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.35, 0.2, 0.1]
    pos = [0.99, 0.93, 0.85, 0.3, 0.05]
    s, y = np.r_[pos, neg], np.r_[np.ones(5), np.zeros(10)]
    assert tpr_at_fpr(s, y, 0.0) == pytest.approx(1 / 5)           # only .99 before the first negative
    assert tpr_at_fpr(s, y, 0.1) == pytest.approx(2 / 5)           # one negative allowed: down to .93
    assert tpr_at_fpr(s, y, 0.1, strict=True) == pytest.approx(1 / 5)   # Wen et al.'s FPR < target
    assert tpr_at_fpr(s, y, 0.15) == pytest.approx(2 / 5)          # still one negative (1.5 is not 2)
    assert tpr_at_fpr(s, y, 0.2) == pytest.approx(3 / 5)           # two negatives: down to .85
    # a positive tied with a negative enters only together with it
    s2 = np.r_[[0.99, 0.95], [0.95, 0.5]]
    assert tpr_at_fpr(s2, [1, 1, 0, 0], 0.0) == pytest.approx(0.5)


def test_detection_metrics_dict_is_json_ready():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(30), np.zeros(70)].astype(bool)
    s = rng.normal(size=100) + 2 * y
    m = detection_metrics(s, y, fprs=(0.01, 0.1))
    assert set(m) == {"auc", "tpr_at_fpr", "tpr_at_fpr_strict", "tpr_at_fpr_closest", "n_pos", "n_neg", "roc"}
    assert (m["n_pos"], m["n_neg"]) == (30, 70) and set(m["tpr_at_fpr"]) == {"0.01", "0.1"}
    assert m["auc"] == pytest.approx(_mann_whitney(s, y.astype(int)))
    assert m["tpr_at_fpr"]["0.01"] <= m["tpr_at_fpr"]["0.1"]
    assert m["roc"]["fpr"][0] == 0 and m["roc"]["tpr"][-1] == 1
    json.dumps(m)


def test_bad_inputs():
    with pytest.raises(ValueError, match="positive and negative"):
        auc([1, 2, 3], [1, 1, 1])
    with pytest.raises(ValueError, match="NaN"):
        auc([1, np.nan], [1, 0])
    with pytest.raises(ValueError, match="0/1"):
        auc([1, 2], [2, 0])


def test_load_scores_csv_parquet_jsonl(tmp_path):
    rows = [{"prompt": f"p{i}", "score": float(i) / 3, "label": i % 2} for i in range(9)]
    (tmp_path / "s.csv").write_text("prompt,score,label\n" + "".join(f"{r['prompt']},{r['score']},{r['label']}\n"
                                                                    for r in rows))
    pq.write_table(pa.Table.from_pylist([{"key": r["prompt"], "magnitude": r["score"], "memorized": bool(r["label"])}
                                         for r in rows]), tmp_path / "s.parquet")
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected_s, expected_y = np.array([r["score"] for r in rows]), np.array([r["label"] for r in rows], bool)
    for path, cols in ((tmp_path / "s.csv", {}), (tmp_path / "s.jsonl", {}),
                       (tmp_path / "s.parquet", {"score_column": "magnitude", "label_column": "memorized"})):
        s, y = load_scores(path, **cols)
        assert y.dtype == bool and (y == expected_y).all(), path
        assert np.allclose(s, expected_s), path
    assert auc(*load_scores(tmp_path / "s.csv")) == pytest.approx(_mann_whitney(expected_s, expected_y.astype(int)))
    with pytest.raises(KeyError, match="columns are"):
        load_scores(tmp_path / "s.parquet")
    with pytest.raises(FileNotFoundError):
        load_scores(tmp_path / "missing.csv")


@pytest.mark.parametrize("seed", range(4))
def test_auc_and_both_tpr_conventions_equal_scikit_learn_on_planted_scores(seed):
    from sklearn.metrics import roc_auc_score
    from sklearn.metrics import roc_curve as sk_roc

    from memfilter.evaluation.detection import tpr_at_fpr_closest

    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(150), np.zeros(300)].astype(int)
    scores = np.round(rng.normal(1.5 * labels, 1.0), 1)                  # planted signal, rounded: ties
    assert auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    f, t, _ = sk_roc(labels, scores, drop_intermediate=False)
    assert tpr_at_fpr(scores, labels, 0.01, strict=True) == pytest.approx(t[f < 0.01].max())
    gap = np.abs(f - 0.01)
    # equally close points on both sides of the target (2/300 and 4/300 around 3/300): the higher TPR
    assert tpr_at_fpr_closest(scores, labels, 0.01) == pytest.approx(t[gap <= gap.min() + 1e-12].max())
    m = detection_metrics(scores, labels)
    assert m["tpr_at_fpr_strict"]["0.01"] == tpr_at_fpr(scores, labels, 0.01, strict=True)
    assert m["tpr_at_fpr_closest"]["0.01"] == tpr_at_fpr_closest(scores, labels, 0.01)


def test_the_closest_convention_by_hand():
    from memfilter.evaluation.detection import tpr_at_fpr_closest

    # 3 negatives: FPR steps 0, 1/3, 2/3, 1. Target 0.3: the closest point is FPR 1/3, above the target
    s, y = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [1, 0, 1, 1, 0, 0]
    assert tpr_at_fpr_closest(s, y, 0.3) == pytest.approx(1.0)           # FPR 1/3 reached at 0.6: all 3 positives
    assert tpr_at_fpr(s, y, 0.3) == pytest.approx(1 / 3)                  # <= 0.3 stops before the first negative
    assert tpr_at_fpr(s, y, 0.3, strict=True) == pytest.approx(1 / 3)
