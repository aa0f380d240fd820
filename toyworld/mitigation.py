"""Inference-time mitigation in the toy world: replication and fidelity of every method on the same x_T.

For one fine-tuned pipeline and its world, each method of evaluation.mitigate (Wen et al.'s embedding optimisation,
the four baselines, and `none`, the prompt as it is) generates from the duplicated captions and a sample of unique
ones, with image j of prompt i starting from detection's x_T (seed, i, j) in every method. Each image is measured
as toyworld.evaluate measures generations: replicated when its nearest training item (world detail descriptor) is
above the replication bar, and its fidelity to what the ORIGINAL prompt names (a baseline that changes the words
is judged on the words the user wrote).

The embedding method's target is calibrated, not tuned: the step-1 magnitude that `target_fpr` of the unique
(not duplicated) prompts' generations exceed (filtering.calibration.fpr_threshold on the `none` run's m), i.e.
"bring a prompt down to where unmemorized prompts are".
"""
from __future__ import annotations

import numpy as np

from memfilter.evaluation.mitigate import METHODS, mitigate
from memfilter.filtering.calibration import fpr_threshold
from memfilter.toyworld.evaluate import descriptor_views, nearest_training, replication_bar, training_descriptors
from memfilter.toyworld.world import ToyWorld, fidelity, parse_caption

ORDER = ("none", "embedding", "random_tokens", "random_numbers", "repeat_words", "embedding_noise")


def study_prompts(world: ToyWorld, num_unique: int, seed: int) -> tuple[list[int], list[str], int]:
    """(items, prompts, number of duplicated ones): every duplicated item's caption, then a seeded sample of unique
    items' captions."""
    rng = np.random.default_rng(seed)
    uniq = sorted(rng.choice(np.arange(world.num_duplicated, world.num_duplicated + world.num_unique),
                             min(num_unique, world.num_unique), replace=False).tolist())
    items = list(range(world.num_duplicated)) + uniq
    return items, [world.item(i)["caption"] for i in items], world.num_duplicated


def _measure(rows: list[dict], items: list[int], prompts: list[str], world: ToyWorld, train, bar: float) -> None:
    """Adds item, set, similarity, nearest item, replicated and fidelity to each row (in place)."""
    train_idx, train_desc, _ = train
    sims, nn = nearest_training(np.stack([descriptor_views(r["image"], world) for r in rows]), train_desc)
    for r, s, j in zip(rows, sims.tolist(), nn.tolist()):
        item = items[r["prompt_index"]]
        attrs = parse_caption(prompts[r["prompt_index"]]) or world.item(item)["attrs"]
        r.update(item=item, set="duplicated" if item < world.num_duplicated else "unique", similarity=s,
                 nearest_item=train_idx[j], replicated=s > bar, fidelity=fidelity(r["image"], attrs, world.spec)["all"])


def _summary(rows: list[dict]) -> dict:
    if not rows:
        return {}
    reached = [r["reached"] for r in rows if r["reached"] is not None]
    return {"generations": len(rows), "replicated_fraction": float(np.mean([r["replicated"] for r in rows])),
            "replicated_own_fraction": float(np.mean([r["replicated"] and r["nearest_item"] == r["item"]
                                                      for r in rows])),
            "fidelity": float(np.mean([r["fidelity"] for r in rows])),
            "m_before": float(np.mean([r["m_before"] for r in rows])),
            "m_after": float(np.mean([r["m_after"] for r in rows])),
            "reached_fraction": float(np.mean(reached)) if reached else None}


def mitigation_study(pipe, world: ToyWorld, *, methods: tuple[str, ...] = ORDER, num_images: int = 8,
                     num_unique: int = 32, target: float | None = None, target_fpr: float = 0.05, seed: int = 0,
                     num_inference_steps: int = 50, max_iterations: int = 10, lr: float = 0.05,
                     fresh_items: int = 1000) -> dict:
    """Every method on the same prompts and x_T: {"target", "bar", "methods": {method: {set: summary}}, "rows"}.

    Args:
        pipe: the fine-tuned pipeline. world: the world it was fine-tuned on.
        methods: evaluation.mitigate methods, `none` first (it calibrates the target). Default ORDER.
        num_images: generations per prompt. Default 8.
        num_unique: unique captions sampled. Default 32.
        target: the embedding method's per-generation target; default calibrated (see the module docstring).
        target_fpr: the share of unique prompts' generations above the calibrated target. Default 0.05.
        seed: x_T and baseline seed. Default 0.
        num_inference_steps, max_iterations, lr: the sampler's steps, the optimisation's. Defaults 50, 10, 0.05.
        fresh_items: never-trained items that calibrate the replication bar. Default 1000.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or (target is None and "embedding" in methods and methods[0] != "none"):
        raise ValueError(f"methods={list(methods)}: known {list(METHODS)}; `none` must come first to calibrate "
                         "the target unless a target is given")
    items, prompts, n_dup = study_prompts(world, num_unique, seed)
    train = training_descriptors(world)
    bar = replication_bar(world, train[1], fresh_items)
    kw = dict(num_generations=num_images, num_inference_steps=num_inference_steps, seed=seed,
              resolution=world.spec.resolution, progress=False)
    out: dict = {"bar": bar, "methods": {}, "rows": {}, "prompts": len(prompts), "duplicated_prompts": n_dup}
    for method in methods:
        extra = dict(target=target, max_iterations=max_iterations, lr=lr) if method == "embedding" else {}
        rows = mitigate(pipe, prompts, method, **kw, **extra)
        _measure(rows, items, prompts, world, train, bar["bar"])
        if method == "none" and target is None:
            target = fpr_threshold([r["m_before"] for r in rows if r["set"] == "unique"], target_fpr)
        out["methods"][method] = {s: _summary([r for r in rows if r["set"] == s]) for s in ("duplicated", "unique")}
        out["rows"][method] = rows
    out["target"] = target
    return out


def markdown(result: dict) -> str:
    """The study as one table: per method, duplicated and unique prompts."""
    lines = [f"Replication bar {result['bar']['bar']:.4f}; embedding target m = {result['target']:.4f} "
             f"({result['prompts']} prompts, {result['duplicated_prompts']} duplicated).\n",
             "| method | dup. replicated | dup. own item | dup. fidelity | unique replicated | unique fidelity | "
             "dup. m before -> after | reached |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method, by in result["methods"].items():
        d, u = by["duplicated"], by["unique"]
        reached = "-" if d.get("reached_fraction") is None else f"{d['reached_fraction']:.0%}"
        lines.append(f"| {method} | {d['replicated_fraction']:.1%} | {d['replicated_own_fraction']:.1%} | "
                     f"{d['fidelity']:.1%} | {u['replicated_fraction']:.1%} | {u['fidelity']:.1%} | "
                     f"{d['m_before']:.3f} -> {d['m_after']:.3f} | {reached} |")
    return "\n".join(lines) + "\n"
