"""The toy-world demo's report: the runs side by side, in numbers (report.json, report.md) and pictures.

report.md holds, per run: step-1 detection of duplicated vs unique captions, replication of duplicated
items (unintended memorization) next to prompt fidelity (intended), the filter's decisions against the
duplication ground truth, and the targets of the demo with whether each was reached. Pictures:
grid.png (prompt, the item's training image, and for every run a generation with its nearest training
image), magnitudes.png (the training-time magnitudes of duplicated and unique samples, dropped ones
marked) and detection.png (score distributions).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from memfilter.evaluation.report import _fmt as _f  # one number format for every report
from memfilter.toyworld.evaluate import to_json
from memfilter.toyworld.world import ToyWorld


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def targets(results: dict, unfiltered: str, filtered: str) -> list[dict]:
    """The filter's targets (issue 9) checked on the numbers of one world: replication of duplicated prompts at
    most 2x the base model's or 20x below unfiltered, at most 5% of unique samples dropped, prompt fidelity
    within 5 points of unfiltered; and the world's own sanity checks (the unfiltered run memorizes, detection
    sees it)."""
    u, f = results[unfiltered], results[filtered]
    ru = u["replication"]["duplicated"]["replicated_fraction"]
    rf = f["replication"]["duplicated"]["replicated_fraction"]
    base = results.get("base", {}).get("replication", {}).get("duplicated", {}).get("replicated_fraction")
    fu, ff = u["fidelity"]["duplicated"]["all"], f["fidelity"]["duplicated"]["all"]
    ratio = ru / rf if rf > 0 else float("inf")
    unique_dropped = (f.get("filter") or {}).get("overall", {}).get("unique_dropped_fraction")
    rep_ok = ratio >= 20 or (base is not None and rf <= 2 * base)
    return [
        {"target": f"{unfiltered} replicates most generations of duplicated items", "value": _pct(ru),
         "met": ru > 0.5},
        {"target": f"step-1 detection AUC >= 0.95 ({unfiltered}, duplicated vs unique captions)",
         "value": _f(u["detection"]["auc"]), "met": u["detection"]["auc"] >= 0.95},
        {"target": f"{filtered} replicates duplicated prompts at most 2x the base model or 20x less than {unfiltered}",
         "value": f"base {_pct(base)}; {_pct(ru)} -> {_pct(rf)} ({'none left' if rf == 0 else f'{ratio:.1f}x'})",
         "met": rep_ok},
        {"target": f"{filtered} drops at most 5% of unique samples", "value": _pct(unique_dropped),
         "met": unique_dropped is not None and unique_dropped <= 0.05},
        {"target": f"prompt fidelity of {filtered} within 5 points of {unfiltered} (duplicated prompts)",
         "value": f"{filtered} {_pct(ff)}, {unfiltered} {_pct(fu)}", "met": ff >= fu - 0.05},
    ]


def _cell(im: Image.Image | None, size: int) -> Image.Image:
    if im is None:
        return Image.new("RGB", (size, size), (230, 230, 230))
    return im.convert("RGB").resize((size, size), Image.NEAREST)


def grid(results: dict, path: str | Path, cell: int = 80, per_run: int = 2) -> Path:
    """One row per duplicated item: its prompt and training image, then per run `per_run` generations,
    each above its nearest training image (by the detail descriptor) with the similarity; a red frame
    marks a replication (similarity above the bar)."""
    font = ImageFont.load_default()
    names = list(results)
    first = results[names[0]]
    items = sorted({r["item"] for r in first["rows"] if r["set"] == "duplicated"})
    pad, label_h, head = 6, 14, 30
    run_w = per_run * (cell + pad)
    width = pad + 2 * cell + 2 * pad + len(names) * (run_w + pad)
    row_h = 2 * cell + 2 * label_h + pad
    canvas = Image.new("RGB", (width, head + len(items) * row_h), "white")
    d = ImageDraw.Draw(canvas)
    d.text((pad, 2), "training item", fill="black", font=font)
    d.text((pad, 14), "(top: generation, below: its nearest training image)", fill=(90, 90, 90), font=font)
    x0 = pad + 2 * cell + 2 * pad
    for k, name in enumerate(names):
        d.text((x0 + k * (run_w + pad), 2), name, fill="black", font=font)
    for ri, item in enumerate(items):
        y = head + ri * row_h
        rows = {n: [r for r in results[n]["rows"] if r["set"] == "duplicated" and r["item"] == item][:per_run]
                for n in names}
        r0 = rows[names[0]][0]
        prompt = r0["prompt"]
        d.text((pad, y), prompt, fill=(40, 40, 40), font=font)
        canvas.paste(_cell(r0.get("item_image"), 2 * cell), (pad, y + label_h))
        for k, name in enumerate(names):
            for j, r in enumerate(rows[name]):
                x = x0 + k * (run_w + pad) + j * (cell + pad)
                canvas.paste(_cell(r["image"], cell), (x, y + label_h))
                canvas.paste(_cell(r["nearest_image"], cell), (x, y + label_h + cell))
                if r["replicated"]:
                    d.rectangle((x - 2, y + label_h - 2, x + cell + 1, y + label_h + 2 * cell + 1), outline="red",
                                width=2)
                d.text((x, y + label_h + 2 * cell + 1), f"sim {r['similarity']:.2f}", fill="black", font=font)
    path = Path(path)
    canvas.save(path)
    return path


def magnitude_plot(records: dict, path: str | Path, num_duplicated: int) -> Path | None:
    """Training-time magnitude against timestep, duplicated vs unique samples, in the first and the last
    quarter of each run; red rings were dropped from the loss."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memfilter.filtering.records import eligible_mask, read_records

    runs = {n: p for n, p in records.items() if p is not None and Path(p).exists()}
    if not runs:
        return None
    fig, axes = plt.subplots(len(runs), 2, figsize=(10, 3.2 * len(runs)), squeeze=False, sharey=True)
    for row, (name, rec_dir) in zip(axes, runs.items()):
        t = read_records(rec_dir).to_pandas()
        t = t[eligible_mask(t) & (t.magnitude > 0).to_numpy()]          # judged, and m measured
        last = t.step.max()
        for ax, (label, sel) in zip(row, (("first quarter", t.step <= max(1, last // 4)),
                                          ("last quarter", t.step > last - max(1, last // 4)))):
            s = t[sel]
            dup = ToyWorld.item_of_keys(s.key) < num_duplicated
            ax.scatter(s.timestep[~dup], s.magnitude[~dup], s=3, c="tab:blue", alpha=0.35, label="unique",
                       linewidths=0)
            ax.scatter(s.timestep[dup], s.magnitude[dup], s=3, c="tab:orange", alpha=0.5, label="duplicated",
                       linewidths=0)
            drop = s[~s.kept]
            ax.scatter(drop.timestep, drop.magnitude, s=7, facecolors="none", edgecolors="red", linewidths=0.5,
                       label="dropped")
            ax.set_title(f"{name}: {label} of the steps")
            ax.set_xlabel("training timestep t")
            ax.legend(loc="upper right", fontsize=7, markerscale=3)
        row[0].set_ylabel("magnitude m")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def detection_plot(results: dict, path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.2), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        s = res["detection"]
        ax.hist(s["scores_unique"], bins=20, alpha=0.6, label="unique captions")
        ax.hist(s["scores_duplicated"], bins=20, alpha=0.6, label="duplicated captions")
        ax.set_title(f"{name}: AUC {s['auc']:.3f}")
        ax.set_xlabel(f"step-1 magnitude (n={s['num_generations']})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_report(results: dict, out_dir: str | Path, *, world: dict, runs: dict, unfiltered: str, filtered: str,
                 records: dict | None = None, timings: dict | None = None) -> Path:
    """report.json, report.md and the pictures in `out_dir`; returns the path of report.md.

    Args:
        results: run name -> toyworld.evaluate.evaluate_world result (the base model may be one).
        world: the world's parameters (toyworld.world.world_to_dict).
        runs: run name -> {"overrides": [...], "summary": train summary} for the fine-tunes.
        unfiltered, filtered: the two runs the targets compare.
        records: run name -> records folder, for the magnitude plot. Default None.
        timings: stage -> seconds. Default None.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checks = targets(results, unfiltered, filtered)
    (out / "report.json").write_text(json.dumps(
        {"world": world, "runs": runs, "targets": checks, "timings": timings,
         "results": {n: to_json(r) for n, r in results.items()}}, indent=1, default=float))
    grid(results, out / "grid.png")
    detection_plot(results, out / "detection.png")
    mag = magnitude_plot(records or {}, out / "magnitudes.png", world["num_duplicated"])
    lines = (_world_lines(world) + _target_lines(checks) + _run_lines(runs) + _detection_lines(results)
             + _replication_lines(results) + _decision_lines(results) + _picture_lines(mag)
             + _time_lines(timings))
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"


def _world_lines(world: dict) -> list[str]:
    n_dup_draws = world["num_duplicated"] * world["repeats"]
    return ["# memfilter toy-world demo", "",
            f"World: {world['num_duplicated']} duplicated items x {world['repeats']} appearances and "
            f"{world['num_unique']} unique items ({n_dup_draws / (n_dup_draws + world['num_unique']):.0%} of the "
            f"draws are duplicates), {world['spec']['resolution']} px, seed {world['seed']}. Captions name "
            f"{' and '.join(world['spec'].get('named', ['shape', 'colour']))} (what a prompt intends); "
            + ("the background colour and " if "background" not in world["spec"].get("named", []) else "")
            + "a 4x4 pattern of background tints, each item's own, are named by no caption. "
            + _variant_text(world), ""]


def _variant_text(world: dict) -> str:
    """The world's variant and augment setting, in words."""
    text = f"Variant {world.get('variant', 'exact')}; augment "
    if not world.get("augment", False):
        return text + "off (every appearance drawn and trained as it is, centred)."
    pad = max(1, int(world.get("spec", {}).get("resolution", 16)) // 16)
    return (text + f"on: appearances drawn {pad} px wider on each side, trained with random crops and flips "
            "(center_crop=false random_flip=true), so each appearance is seen shifted and mirrored differently; "
            "a generation counts as a copy when it or its mirror is nearer a training item than the bar.")


def _target_lines(checks: list[dict]) -> list[str]:
    return (["## Targets", "", "| target | value | met |", "| --- | --- | --- |"]
            + [f"| {c['target']} | {c['value']} | {'yes' if c['met'] else 'NO'} |" for c in checks])


def _run_lines(runs: dict) -> list[str]:
    lines = ["", "## Runs", "", "| run | filter / overrides | steps | kept (duplicated) | kept (unique) | wall s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, info in runs.items():
        s = info.get("summary") or {}
        lines.append(f"| {name} | `{' '.join(info.get('overrides', [])) or '-'}` | {s.get('steps', '-')} | "
                     f"{_pct(s.get('dup_kept_fraction'))} | {_pct(s.get('nondup_kept_fraction'))} | "
                     f"{s.get('wall_seconds', '-')} |")
    return lines


def _detection_lines(results: dict) -> list[str]:
    first = next(iter(results.values()))
    d0 = first["detection"]
    lines = ["", f"## Detection (Wen et al., step 1, n={d0['num_generations']} generations, guidance "
                 f"{first['settings']['guidance_scale']})", "",
             f"{d0['duplicated_prompts']} duplicated vs {d0['unique_prompts']} unique training items' captions "
             f"({d0.get('unique_prompts_distinct', d0['unique_prompts'])} distinct: a world caption names only "
             "shape and colour, so unique items share captions; a duplicated item's caption is its own).", "",
             "| run | AUC | TPR@1%FPR | mean score duplicated | mean score unique |", "| --- | --- | --- | --- | --- |"]
    for n, r in results.items():
        d = r["detection"]
        lines.append(f"| {n} | {_f(d['auc'])} | {_f(d['tpr_at_fpr']['0.01'])} | {_f(d['score_duplicated_mean'])} | "
                     f"{_f(d['score_unique_mean'])} |")
    return lines


def _replication_lines(results: dict) -> list[str]:
    first = next(iter(results.values()))
    bar = first["replication"]["bar"]
    named = [a for a in ("shape", "colour", "position", "background") if a in first["fidelity"]["duplicated"]]
    lines = ["", "## Replication (unintended) and prompt fidelity (intended)", "",
             f"Descriptor: {first['descriptor']}. Replication bar {bar['bar']:.3f}: the "
             f"{bar['quantile']:.0%} quantile of the nearest-training similarity of {bar['fresh_items']} fresh items "
             f"never trained on (their mean {bar['fresh_mean']:.3f}, max {bar['fresh_max']:.3f}). A generation "
             "replicates when its nearest training item is above the bar; *own* counts only the prompt's own item.",
             "", "| run | prompts | generations | replicated | replicated own item | items replicated | "
                 f"mean similarity | fidelity (all {len(named)} named) | " + " | ".join(named) + " |",
             "| --- " * (7 + len(named)) + "|"]
    for n, res in results.items():
        for s in ("duplicated", "unique", "concept"):
            r, f = res["replication"].get(s), res["fidelity"].get(s)
            if r:
                lines.append(f"| {n} | {s} | {r['generations']} | {_pct(r['replicated_fraction'])} | "
                             f"{_pct(r['replicated_own_fraction'])} | {r['items_replicated']} | "
                             f"{_f(r['similarity_mean'])} | {_pct(f['all'])} | "
                             + " | ".join(_pct(f[a]) for a in named) + " |")
    return lines


def _decision_lines(results: dict) -> list[str]:
    lines = ["", "## Filter decisions against the duplication ground truth", "",
             "Eligible samples only (a caption dropped for guidance is never judged). Precision: share of dropped "
             "samples that were duplicates; recall: share of duplicated appearances dropped.", "",
             "| run | steps | dropped | precision | recall (duplicated dropped) | unique dropped |",
             "| --- | --- | --- | --- | --- | --- |"]
    for n, res in results.items():
        fd = res.get("filter")
        if not fd:
            continue
        phases = [(f"{a}-{b}", p) for p in fd["phases"] for a, b in [p["steps"]]] if fd["overall"]["dropped"] else []
        for label, p in [("all", fd["overall"])] + phases:
            lines.append(f"| {n} | {label} | {p['dropped']} | {_pct(p['precision'])} | {_pct(p['recall'])} | "
                         f"{_pct(p['unique_dropped_fraction'])} |")
    return lines


def _picture_lines(magnitudes: bool) -> list[str]:
    lines = ["", "## Pictures", "", "![grid](grid.png)", "",
             "grid.png: per duplicated item, its prompt and training image, then for each run generations above "
             "their nearest training images (red frame: replicated).", "", "![detection](detection.png)", ""]
    if magnitudes:
        lines += ["![magnitudes](magnitudes.png)", "", "magnitudes.png: the magnitude of every judged training "
                  "sample against its timestep, duplicated vs unique, early and late in each run; red rings were "
                  "dropped from the loss.", ""]
    return lines


def _time_lines(timings: dict | None) -> list[str]:
    if not timings:
        return []
    return ["## Time", "", "| stage | seconds |", "| --- | --- |"] + [f"| {k} | {v:.0f} |" for k, v in timings.items()]


# --- several seeds --------------------------------------------------------------------------------

SEED_METRICS = (      # (label, getter on (result, run summary)): what the seeds report aggregates
    ("dup. prompts replicated", lambda r, s: r["replication"]["duplicated"]["replicated_fraction"]),
    ("dup. items replicated", lambda r, s: r["replication"]["duplicated"]["items_replicated"]),
    ("dup. fidelity", lambda r, s: r["fidelity"]["duplicated"]["all"]),
    ("unique fidelity", lambda r, s: r["fidelity"]["unique"]["all"]),
    ("step-1 AUC", lambda r, s: r["detection"]["auc"]),
    ("dup. samples dropped", lambda r, s: None if s.get("dup_kept_fraction") is None else 1 - s["dup_kept_fraction"]),
    ("unique samples dropped", lambda r, s: (r.get("filter") or {}).get("overall", {}).get("unique_dropped_fraction")),
    ("concepts reproduced", lambda r, s: (r["replication"].get("concept") or {}).get("replicated_own_fraction")),
    ("concept samples dropped", lambda r, s: (r.get("filter") or {}).get("concept_dropped_fraction")),
)


def seed_table(per_seed: dict) -> dict:
    """run -> metric -> {"values": per seed, "mean", "std", "min", "max"} (None where a run lacks a metric)."""
    out: dict = {}
    for seed, res in per_seed.items():
        for run, r in res["results"].items():
            s = res["runs"].get(run, {}).get("summary") or {}
            for label, get in SEED_METRICS:
                out.setdefault(run, {}).setdefault(label, {"values": {}})["values"][seed] = get(r, s)
    for metrics in out.values():
        for m in metrics.values():
            v = np.array([x for x in m["values"].values() if x is not None], dtype=float)
            m.update(mean=float(v.mean()) if v.size else None, std=float(v.std()) if v.size else None,
                     min=float(v.min()) if v.size else None, max=float(v.max()) if v.size else None)
    return out


def _spread(m: dict, label: str) -> str:
    if m["mean"] is None:
        return "-"
    if label.startswith("dup. items") or label.startswith("step-1"):
        return f"{m['mean']:.2f} ± {m['std']:.2f} ({m['min']:.2f}-{m['max']:.2f})"
    return f"{100 * m['mean']:.1f}% ± {100 * m['std']:.1f} ({100 * m['min']:.1f}-{100 * m['max']:.1f})"


def write_seeds_report(per_seed: dict, out_dir: str | Path, *, unfiltered: str, filtered: str) -> Path:
    """report.md and report.json across seeds: per run, mean ± std (min-max) of every SEED_METRICS entry, and
    the targets of every seed; each seed's own report stays in seed-<S>/report.md."""
    out = Path(out_dir)
    table = seed_table(per_seed)
    checks = {s: targets(r["results"], unfiltered, filtered) for s, r in per_seed.items()}
    seeds = list(per_seed)
    world = next(iter(per_seed.values()))["world"]
    (out / "report.json").write_text(json.dumps({"seeds": seeds, "world": world, "table": table,
                                                 "targets": {str(k): v for k, v in checks.items()}},
                                                indent=1, default=float))
    labels = [lab for lab, _ in SEED_METRICS if any(table[r][lab]["mean"] is not None for r in table)]
    lines = [f"# memfilter toy-world demo over {len(seeds)} seeds", "",
             f"Seeds {', '.join(map(str, seeds))} (each: world seed = training seed = evaluation seed). World: "
             f"{world['num_duplicated']} duplicated items x {world['repeats']}, {world['num_unique']} unique, "
             f"{world.get('num_concepts', 0)} named concepts, variant {world.get('variant', 'exact')}, augment "
             f"{'on' if world.get('augment', False) else 'off'}. "
             "Cells: mean ± std (min-max) across seeds.", "",
             "| run | " + " | ".join(labels) + " |", "| --- " * (len(labels) + 1) + "|"]
    for run, metrics in table.items():
        lines.append(f"| {run} | " + " | ".join(_spread(metrics[lab], lab) for lab in labels) + " |")
    names = [c["target"] for c in next(iter(checks.values()))]
    lines += ["", "## Targets on every seed", "", "| target | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "| --- " * (len(seeds) + 1) + "|"]
    for i, name in enumerate(names):
        lines.append(f"| {name} | " + " | ".join(
            f"{'yes' if checks[s][i]['met'] else 'NO'}: {checks[s][i]['value']}" for s in seeds) + " |")
    lines += ["", "## Per seed", ""] + [f"- [seed {s}](seed-{s}/report.md)" for s in seeds]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"
