"""Reports a person reads: report.md for one evaluation, compare.md + the trade-off plot for several."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def write_markdown(report: dict, path: str | Path) -> None:
    """One screen: what was evaluated, replication per prompt set, background, quality."""
    d, s = report["descriptor"], report["settings"]
    lines = [f"# memfilter evaluation: {report['evaluated'].get('name', '')}", ""]
    for k, v in report["evaluated"].items():
        lines.append(f"- {k}: `{v}`")
    lines += [f"- descriptor: **{d['name']}**, preprocessing `{d['preprocessing']}`, {d['dim']}-d",
              f"- generations: {s['num_images_per_prompt']} per prompt, {s['num_inference_steps']} steps, "
              f"guidance {s['guidance_scale']}, seed {s['seed']}; training images searched: "
              f"{report['training_images']}", "",
              f"## Replication (similarity of each generation to its nearest training image; bar {s['threshold']})",
              "", "| prompt set | prompts | generations | mean | p95 | max | frac > bar | prompts with a replica |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in report["replication"].items():
        lines.append(f"| {name} | {r['prompts']} | {r['n']} | {_fmt(r['mean'])} | {_fmt(r['p95'])} | "
                     f"{_fmt(r['max'])} | {_fmt(r['frac_above'])} | {_fmt(r['prompt_frac_above'])} |")
        for lab, lr in r.get("by_label", {}).items():
            lines.append(f"| {name} / {lab} | | {lr['n']} | {_fmt(lr['mean'])} | {_fmt(lr['p95'])} | "
                         f"{_fmt(lr['max'])} | {_fmt(lr['frac_above'])} | |")
    b = report.get("background")
    if b:
        lines.append(f"| training vs training (background) | | {b['n']} | {_fmt(b['mean'])} | {_fmt(b['p95'])} | "
                     f"{_fmt(b['max'])} | {_fmt(b['frac_above'])} | |")
    lines += ["", "## Quality", ""]
    for name, q in report["quality"].items():
        if isinstance(q, dict) and "skipped" in q:
            lines.append(f"- {name}: skipped ({q['skipped']})")
        else:
            lines.append(f"- {name}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in q.items()
                                                  if not isinstance(v, (dict, list))))
    lines += ["", "![similarity histogram](similarity_hist.png)", "", "![top matches](top_matches.png)", ""]
    Path(path).write_text("\n".join(lines))


def _quality_value(report: dict) -> tuple[str, float | None]:
    q = report.get("quality", {})
    for key, field in (("clip_score", "mean"), ("fid", "fid")):
        v = q.get(key)
        if isinstance(v, dict) and field in v:
            return ("CLIP score" if key == "clip_score" else "FID (lower is better)"), v[field]
    return "quality (not measured)", None


def compare(reports: dict[str, dict], out_dir: str | Path, replication_set: str = "duplicated") -> Path:
    """compare.md (one row per run) and tradeoff.png (replication vs quality), as the literature plots them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# memfilter comparison", "", "| run | descriptor | set | mean sim | p95 sim | frac > bar | quality |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    points = []
    for name, rep in reports.items():
        rset = replication_set if replication_set in rep["replication"] else next(iter(rep["replication"]), None)
        r = rep["replication"].get(rset, {}) if rset else {}
        qname, qval = _quality_value(rep)
        lines.append(f"| {name} | {rep['descriptor']['name']} | {rset} | {_fmt(r.get('mean'))} | {_fmt(r.get('p95'))} "
                     f"| {_fmt(r.get('frac_above'))} | {qname}: {_fmt(qval)} |")
        points.append((name, r.get("p95"), qval, qname))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, x, y, _ in points:
        if x is None:
            continue
        ax.scatter([x], [y if y is not None else 0.0], s=40)
        ax.annotate(name, (x, y if y is not None else 0.0), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"replication: p95 similarity ({replication_set} prompts)")
    ax.set_ylabel(points[0][3] if points else "quality")
    ax.set_title("replication vs quality")
    fig.tight_layout()
    fig.savefig(out / "tradeoff.png", dpi=120)
    plt.close(fig)
    lines += ["", "![trade-off](tradeoff.png)", ""]
    (out / "compare.md").write_text("\n".join(lines))
    (out / "compare.json").write_text(json.dumps(reports, indent=1, default=str))
    return out
