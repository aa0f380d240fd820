"""One evaluation: generate for prompt sets, find each generation's nearest training image, measure quality.

`evaluate` takes built objects (pipeline, training source, descriptor) and plain settings; the Hydra app
`launch/evaluate.py` builds them from config. Everything it measures goes to report.json with the
settings it was measured under; report.md and the PNGs are for a person.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from memfilter.evaluation.generate import generate, read_generations
from memfilter.evaluation.prompts import load_prompt_file, training_prompts
from memfilter.evaluation.quality import quality_metrics
from memfilter.evaluation.replication import (background_similarity, embed, match_grid, nearest_neighbours,
                                    replication_stats, similarity_histogram)
from memfilter.evaluation.report import write_markdown
from memfilter.evaluation.training_set import fetch_images, unique_training_samples


@dataclass
class EvalSettings:
    """What an evaluation does; every field is recorded in report.json.

    Args:
        num_images_per_prompt: generations per prompt. Default 4.
        num_inference_steps, guidance_scale: sampler. Defaults 50, 7.5.
        batch_size: images per pipeline call. Default 8.
        resolution: generation size; None = the pipeline's. Default None.
        seed: noise seed base (same seed, same x_T per prompt and index). Default 0.
        training_prompts: prompt with training captions (duplicated / unique). Default True.
        max_duplicated, max_unique: prompts per training split. Defaults 100, 100.
        prompt_files: extra prompt files. prompt_limit: first N of each. Defaults none.
        threshold: replication bar on similarity. Default 0.5.
        background_sample: training items for the background distribution. Default 2000.
        grid_rows: top matches in the grid. Default 12.
        inception_path, clip_path: quality weights; None = skipped with a note.
        max_reference: reference images for FID. Default 5000.
        generations: a folder of earlier generations in generate's layout (<set>/index.parquet and the PNGs, e.g.
            memfilter-mitigate's output) measured instead of sampling; the pipeline is then not needed. Default None.
    """

    num_images_per_prompt: int = 4
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    batch_size: int = 8
    resolution: int | None = None
    seed: int = 0
    training_prompts: bool = True
    max_duplicated: int | None = 100
    max_unique: int | None = 100
    prompt_files: list[str] = field(default_factory=list)
    prompt_limit: int | None = None
    threshold: float = 0.5
    background_sample: int = 2000
    grid_rows: int = 12
    inception_path: str | None = None
    clip_path: str | None = None
    max_reference: int = 5000
    generations: str | None = None


def evaluate(pipe, training_source, descriptor, out_dir: str | Path, settings: EvalSettings = EvalSettings(),
             cache_dir: str | Path | None = None, reference_images: list | None = None,
             run_info: dict | None = None) -> dict:
    """Generate, measure replication and quality, write report.json / report.md / PNGs into out_dir.

    Args:
        pipe: the pipeline to sample from (None with settings.generations).
        training_source: the run's training data source (Samples with key, image, caption, meta).
        descriptor: evaluation.descriptors.Descriptor (SSCD or the named fallback).
        out_dir: where the report and generations go.
        settings: EvalSettings.
        cache_dir: training descriptor cache. Default <out_dir>/cache.
        reference_images: reference set for FID; default a sample of the training images.
        run_info: what was evaluated (run dir, pipeline, policy), copied into the report.
    """
    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = settings

    meta, reference, train_keys, train_desc = _embed_training_set(
        training_source, descriptor, cache_dir or out / "cache", reference_images, s.max_reference)
    if s.generations:                                      # measure earlier generations (e.g. mitigated ones)
        sets = read_generations(s.generations)
        rows = [r for set_rows in sets.values() for r in set_rows]
    else:
        sets = _prompt_sets(meta, s)
        rows = _generate(pipe, sets, out, s)
    images = [Image.open(r["path"]).convert("RGB") for r in rows]
    _match(rows, images, descriptor, train_keys, train_desc, meta, s.threshold)
    pq.write_table(pa.Table.from_pylist(rows), out / "generations.parquet")

    per_set = _replication_by_set(rows, sets, s.threshold)
    background = background_similarity(train_desc, sample=s.background_sample, seed=s.seed)
    background_stats = replication_stats(background, s.threshold) if len(background) else None
    _pictures(rows, images, sets, background, descriptor, training_source, out, s)
    # FID against the given reference set, else against the training images drawn while embedding
    device = str(pipe.device) if pipe is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    quality = _quality(rows, images, reference_images if reference_images is not None else reference, device, s)

    report = {
        "evaluated": run_info or {},
        "settings": asdict(s),
        "descriptor": descriptor.describe(),
        "training_images": len(train_keys),
        "replication": per_set,
        "background": background_stats,
        "quality": quality,
        "files": {"generations": "generations.parquet", "histogram": "similarity_hist.png",
                  "grid": "top_matches.png", "images": "generations/"},
        "wall_seconds": round(time.time() - t0, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    write_markdown(report, out / "report.md")
    return report


def _embed_training_set(training_source, descriptor, cache_dir: str | Path, reference_images: list | None,
                        max_reference: int) -> tuple[list[dict], list[Image.Image], list[str], torch.Tensor]:
    """Descriptors of the unique training images (cached), with their metadata for the prompt sets and,
    without given reference images, the first `max_reference` of them as the FID reference.

    The metadata and reference fill as `embed` draws the images: one pass over the training source.
    """
    meta: list[dict] = []
    reference: list[Image.Image] = []

    def train_images():
        for sample in unique_training_samples(training_source):
            meta.append({"key": sample["key"], "caption": sample["caption"], "meta": sample["meta"]})
            if reference_images is None and len(reference) < max_reference:
                reference.append(sample["image"])
            yield sample["key"], sample["image"]

    train_keys, train_desc = embed(descriptor, train_images(), cache_dir=cache_dir)
    return meta, reference, train_keys, train_desc


def _prompt_sets(meta: list[dict], s: EvalSettings) -> dict[str, list[dict]]:
    """Prompt set name -> prompts: the training captions (duplicated / unique), then each prompt file;
    empty sets are dropped."""
    sets: dict[str, list[dict]] = {}
    if s.training_prompts:
        sets.update(training_prompts(meta, s.max_duplicated, s.max_unique, seed=s.seed))
    for f in s.prompt_files:
        sets[Path(f).stem] = load_prompt_file(f, limit=s.prompt_limit)
    return {k: v for k, v in sets.items() if v}


def _generate(pipe, sets: dict[str, list[dict]], out: Path, s: EvalSettings) -> list[dict]:
    """One row per generated image (PNGs under <out>/generations), set by set."""
    rows = []
    for name, prompts in sets.items():
        rows += generate(pipe, prompts, out / "generations", set_name=name,
                         num_images_per_prompt=s.num_images_per_prompt, seed=s.seed, batch_size=s.batch_size,
                         num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                         resolution=s.resolution)
    return rows


def _match(rows: list[dict], images: list[Image.Image], descriptor, train_keys: list[str],
           train_desc: torch.Tensor, meta: list[dict], threshold: float) -> None:
    """Adds each generation's nearest training image, its similarity and whether that counts as replication."""
    train_dup = {m["key"]: int(m["meta"].get("dup_group", -1)) for m in meta}
    gen_desc = torch.cat([descriptor(images[i:i + 64]) for i in range(0, len(images), 64)]) if images else \
        torch.zeros(0, descriptor.dim)
    sims, idx = nearest_neighbours(gen_desc, train_desc, k=1)
    for r, sim, i in zip(rows, sims[:, 0].tolist(), idx[:, 0].tolist()):
        r["nn_key"] = train_keys[i]
        r["similarity"] = float(sim)
        r["nn_is_own_item"] = r["nn_key"] in set(r["train_keys"])
        r["nn_dup_group"] = train_dup.get(r["nn_key"], -1)
        r["replicated"] = r["similarity"] > threshold


def _replication_by_set(rows: list[dict], sets: dict, threshold: float) -> dict[str, dict]:
    """Per prompt set: statistics over its generations, over its prompts (max over each prompt's
    generations) and, where rows carry labels, per label."""
    per_set = {}
    for name in sets:
        sel = [r for r in rows if r["set"] == name]
        sim = np.array([r["similarity"] for r in sel])
        per_prompt = {}
        for r in sel:
            per_prompt[r["prompt_id"]] = max(per_prompt.get(r["prompt_id"], -1.0), r["similarity"])
        pp = np.array(list(per_prompt.values()))
        per_set[name] = {**replication_stats(sim, threshold),
                         "prompts": len(per_prompt),
                         "prompt_max_mean": float(pp.mean()) if pp.size else None,
                         "prompt_frac_above": float((pp > threshold).mean()) if pp.size else None}
        labels = sorted({r["label"] for r in sel if r["label"]})
        if labels:                                         # e.g. VM / TM rows of the memorized prompt files
            per_set[name]["by_label"] = {lab: replication_stats(np.array([r["similarity"] for r in sel
                                                                          if r["label"] == lab]), threshold)
                                         for lab in labels}
    return per_set


def _pictures(rows: list[dict], images: list[Image.Image], sets: dict, background, descriptor, training_source,
              out: Path, s: EvalSettings) -> None:
    """similarity_hist.png (each set against the train-vs-train background) and top_matches.png."""
    groups = {name: np.array([r["similarity"] for r in rows if r["set"] == name]) for name in sets}
    if len(background):
        groups["train vs train (background)"] = np.asarray(background)
    similarity_histogram(groups, out / "similarity_hist.png", threshold=s.threshold,
                         title=f"nearest training image ({descriptor.describe()['name']})")
    top = sorted(range(len(rows)), key=lambda i: -rows[i]["similarity"])[:s.grid_rows]
    matches = fetch_images(training_source, {rows[i]["nn_key"] for i in top})
    match_grid([{"generated": images[i], "match": matches.get(rows[i]["nn_key"]),
                 "similarity": rows[i]["similarity"], "prompt": rows[i]["prompt"]} for i in top],
               out / "top_matches.png")


def _quality(rows: list[dict], images: list[Image.Image], reference: list, device: str, s: EvalSettings) -> dict:
    """Each quality metric measured or skipped with its reason."""
    # quality on the prompts that should not replicate (all of them if there are only duplicated ones)
    q_idx = [i for i, r in enumerate(rows) if r["set"] != "duplicated"] or list(range(len(rows)))
    return quality_metrics([images[i] for i in q_idx], reference, [rows[i]["prompt"] for i in q_idx],
                           inception_path=s.inception_path, clip_path=s.clip_path, device=device)
