"""The detection report: per detector and grid cell, AUC and TPR at low FPR in both conventions, seconds per prompt,
a table in the papers' layout, the ROC and the score histograms; the per-prompt and per-step tables for programs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memfilter.evaluation.detection import detection_metrics
from memfilter.filtering.detection import detection_scores, grid_scores


def per_step_table(rows: list[dict], run) -> pa.Table:
    """One row per (prompt, generation, step): prompt index, label, timestep and one column per detector."""
    first = next(iter(run.per_step.values()))
    p, n, k = first.shape
    idx = np.arange(p).repeat(n * k)
    cols = {"prompt_index": idx, "label": np.array([rows[i]["label"] for i in idx]),
            "generation": np.tile(np.arange(n).repeat(k), p), "step": np.tile(np.arange(k), p * n),
            "timestep": np.tile(np.asarray(run.timesteps), p * n)}
    cols.update({d: v.reshape(-1).numpy() for d, v in run.per_step.items()})
    return pa.table(cols)


def grid_metrics(run, labels: np.ndarray, steps: list[int], generations: list[int], fprs: list[float]) -> list[dict]:
    """One record per (detector, k, n): the metrics on the labelled prompts (none without both labels)."""
    has_both = {0, 1} <= set(labels.tolist())
    out = []
    for d, per_step in run.per_step.items():
        cells = grid_scores(per_step, steps, generations)
        for (k, n), scores in cells.items():
            rec = {"detector": d, "steps": k, "generations": n,
                   "seconds_per_prompt_pass": run.seconds.get(d, float("nan")) / max(1, per_step.shape[0])}
            if has_both:
                sel = labels >= 0
                m = detection_metrics(scores.numpy()[sel], labels[sel], fprs=tuple(fprs))
                rec.update({key: m[key] for key in ("auc", "tpr_at_fpr_strict", "tpr_at_fpr_closest", "n_pos",
                                                    "n_neg")})
            out.append(rec)
    return out


def markdown_table(records: list[dict], fprs: list[float], settings: dict) -> str:
    """The papers' layout: one row per detector and (steps, n)."""
    f = f"{fprs[0]:g}"
    lines = [f"# Detection report\n",
             f"pipeline `{settings['pipeline']}`; DDIM {settings['num_inference_steps']} steps, guidance "
             f"{settings['guidance_scale']}, seed {settings['seed']}. TPR@{f}FPR in two conventions: **Wen** (the last "
             f"ROC point with FPR < {f}, Wen et al.'s code) and **closest** (the point whose FPR is closest to {f}, "
             "Jeon et al. and Asthana et al.). s/prompt: the detector's pass at the largest cell, every prompt.\n",
             f"| detector | steps | n | AUC | TPR@{f}FPR (Wen) | TPR@{f}FPR (closest) | s/prompt |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        if "auc" in r:
            lines.append(f"| {r['detector']} | {r['steps']} | {r['generations']} | {r['auc']:.3f} | "
                         f"{r['tpr_at_fpr_strict'][f]:.3f} | {r['tpr_at_fpr_closest'][f]:.3f} | "
                         f"{r['seconds_per_prompt_pass']:.3f} |")
        else:
            lines.append(f"| {r['detector']} | {r['steps']} | {r['generations']} | - | - | - | "
                         f"{r['seconds_per_prompt_pass']:.3f} |")
    return "\n".join(lines) + "\n"


def plots(run, labels: np.ndarray, out: Path) -> list[str]:
    """roc.png (each detector at the largest cell) and scores_hist.png (split by label); [] without both labels."""
    if not {0, 1} <= set(labels.tolist()):
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memfilter.evaluation.detection import roc_curve

    sel = labels >= 0
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    fig2, axes = plt.subplots(1, len(run.per_step), figsize=(4 * len(run.per_step), 3), squeeze=False)
    for (d, per_step), hax in zip(run.per_step.items(), axes[0]):
        s = detection_scores(per_step).numpy()[sel]
        f, t, _ = roc_curve(s, labels[sel])
        ax.plot(f, t, label=d)
        for lab, name in ((1, "memorized"), (0, "not memorized")):
            hax.hist(s[labels[sel] == lab], bins=30, alpha=0.6, label=name)
        hax.set_title(d)
        hax.legend(fontsize=7)
    ax.set(xscale="log", xlim=(1e-3, 1), xlabel="false-positive rate", ylabel="true-positive rate", title="ROC")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=120)
    fig2.tight_layout()
    fig2.savefig(out / "scores_hist.png", dpi=120)
    plt.close(fig), plt.close(fig2)
    return ["roc.png", "scores_hist.png"]


def write_report(out: Path, rows: list[dict], run, *, steps: list[int], generations: list[int], fprs: list[float],
                 settings: dict) -> dict:
    """Every output file of a detection run; returns what metrics.json holds."""
    labels = np.array([r["label"] for r in rows])
    per_prompt = {"prompt": [r["prompt"] for r in rows], "label": labels, "file": [r["file"] for r in rows],
                  "type": [str(r["meta"].get("type", "")) for r in rows]}
    per_prompt.update({d: detection_scores(v).numpy() for d, v in run.per_step.items()})
    per_prompt["score"] = per_prompt[next(iter(run.per_step))]
    pq.write_table(pa.table(per_prompt), out / "scores.parquet")
    pq.write_table(per_step_table(rows, run), out / "per_step.parquet")
    records = grid_metrics(run, labels, steps, generations, fprs)
    (out / "report.md").write_text(markdown_table(records, fprs, settings))
    result = {"settings": settings, "n_prompts": len(rows), "timesteps": run.timesteps, "grid": records,
              "seconds": run.seconds, "plots": plots(run, labels, out)}
    (out / "metrics.json").write_text(json.dumps(result, indent=1, default=str))
    return result
