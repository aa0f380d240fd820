"""The curation pass's report: counts, the score histogram (split by the source's ground truth where it has one),
precision and recall of the drop decision against it, a grid of the highest-scored samples with their captions, and
the duplicate clusters found."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def ground_truth_metrics(scored: pd.DataFrame, item_score: np.ndarray, drop: np.ndarray) -> dict | None:
    """Against dup_group >= 0 (a duplicated sample): AUC of the item score, precision and recall of the drops."""
    truth = scored.dup_group.fillna(-1).to_numpy() >= 0
    if truth.all() or not truth.any():
        return None
    from memfilter.evaluation.detection import auc

    tp = int((drop & truth).sum())
    return {"auc": float(auc(item_score, truth.astype(int))), "duplicated": int(truth.sum()),
            "not_duplicated": int((~truth).sum()), "dropped_duplicated": tp,
            "dropped_not_duplicated": int((drop & ~truth).sum()),
            "precision": tp / max(int(drop.sum()), 1), "recall": tp / int(truth.sum())}


def clusters_found(scored: pd.DataFrame, by: list[str], size: np.ndarray, item_score: np.ndarray,
                   top: int = 20) -> list[dict]:
    """The largest items of more than one sample: how they were grouped, their size, score and example keys."""
    frame = pd.DataFrame({"by": by, "size": size, "item_score": item_score, "key": scored.key.to_numpy(),
                          "caption": scored.caption.to_numpy()})
    multi = frame[frame["size"] > 1].sort_values(["item_score", "key"], ascending=[False, True])
    rows, seen = [], set()
    for r in multi.itertuples(index=False):
        ident = (r.by, round(float(r.item_score), 9), int(r.size))
        if ident in seen:
            continue
        seen.add(ident)
        rows.append({"grouped_by": r.by, "samples": int(r.size), "item_score": float(r.item_score),
                     "example_key": r.key, "example_caption": r.caption})
        if len(rows) == top:
            break
    return rows


def histogram(path: Path, scored: pd.DataFrame, item_score: np.ndarray, thresholds: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth = scored.dup_group.fillna(-1).to_numpy() >= 0
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.histogram_bin_edges(item_score, bins=40)
    if truth.any() and not truth.all():
        ax.hist(item_score[~truth], bins=bins, alpha=0.6, label="not duplicated")
        ax.hist(item_score[truth], bins=bins, alpha=0.6, label="duplicated")
        ax.legend()
    else:
        ax.hist(item_score, bins=bins)
    if "threshold" in thresholds and np.isfinite(thresholds["threshold"]):
        ax.axvline(thresholds["threshold"], color="k", ls="--", lw=1)
    ax.set_xlabel("item score (mean magnitude of the item)")
    ax.set_ylabel("samples")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def top_grid(path: Path, source, plan: dict, scored: pd.DataFrame, item_score: np.ndarray, n: int) -> None:
    """The n highest-scored samples with their captions (and their images, read back from a map-style source)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-item_score, kind="stable")[:n]
    cols = min(4, max(len(order), 1))
    rows = max(1, int(np.ceil(len(order) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), order):
        if plan["kind"] == "map":
            sample = source[int(scored["index"].iloc[i])]
            if "image" in sample:
                ax.imshow(np.asarray(sample["image"].convert("RGB")))
        ax.set_title(f"{item_score[i]:.3g}\n{str(scored.caption.iloc[i])[:60]}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out: Path, summary: dict) -> None:
    """report.md: the numbers of report.json in a page."""
    lines = [f"# Curation pass: {summary['decision']['name']}", "",
             f"Scored by: {summary['scored_by']['model']}"
             + (f", UNet {summary['scored_by']['unet']}" if summary['scored_by']['unet'] else ""),
             f"({summary['scored_by']['question']}).", ""]
    comp = summary["completeness"]
    lines += [f"- samples: {comp['samples']} (scored {comp['scored']}, skipped {sum(comp['skipped'].values())}: "
              f"{comp['skipped']}); complete: {comp['complete']}",
              f"- decision: {summary['decision']['policy']} {summary['decision']['info']}",
              f"- dropped {summary['dropped']} of {comp['scored']} scored samples ({summary['dropped_fraction']:.2%})"]
    gt = summary.get("ground_truth")
    if gt:
        lines += [f"- against the source's duplication labels: AUC {gt['auc']:.3f}, precision {gt['precision']:.3f}, "
                  f"recall {gt['recall']:.3f} ({gt['dropped_duplicated']} of {gt['duplicated']} duplicated samples "
                  f"dropped, {gt['dropped_not_duplicated']} of {gt['not_duplicated']} others)"]
    lines += ["", "![scores](scores_hist.png)", "", "![highest scored](top.png)", "", "## Items of several samples", "",
              "| grouped by | samples | item score | example |", "| --- | --- | --- | --- |"]
    lines += [f"| {c['grouped_by']} | {c['samples']} | {c['item_score']:.4g} | `{c['example_key']}` "
              f"{c['example_caption']} |" for c in summary["clusters"]]
    (out / "report.md").write_text("\n".join(lines) + "\n")
