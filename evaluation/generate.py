"""Sample images from a pipeline for prompt sets, on noise fixed per (seed, prompt, index).

Two runs evaluated with the same seed start every image of a prompt from the same x_T, so their
difference is the model's, not the noise's. Images are saved as PNG with an index (Parquet) that the
replication and quality steps read.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm


def image_seed(seed: int, prompt: str, index: int) -> int:
    """Seed of image `index` of `prompt`: independent of prompt order and batch size."""
    return int(hashlib.sha256(f"{seed}/{prompt}/{index}".encode()).hexdigest()[:15], 16)


def load_pipeline(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """The pipeline of a diffusers directory (a run's `pipeline/`) or hub id, of the family its model_index.json
    names (train.families: SD 1.x/2.x or SDXL), without safety checker."""
    from diffusers import DiffusionPipeline

    from memfilter.train.families import family_class, read_model_index

    family = family_class(read_model_index(str(path)).get("_class_name", ""), f"pipeline {path}")
    kw = {"torch_dtype": dtype} if dtype is not None else {}
    if family.name == "sd":
        kw.update(safety_checker=None, requires_safety_checker=False)
    pipe = DiffusionPipeline.from_pretrained(str(path), **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def generate(pipe, prompts: list[dict], out_dir: str | Path, *, set_name: str, num_images_per_prompt: int = 4,
             seed: int = 0, batch_size: int = 8, num_inference_steps: int = 50, guidance_scale: float = 7.5,
             resolution: int | None = None) -> list[dict]:
    """Generate `num_images_per_prompt` images per prompt; returns (and writes) the index rows.

    Args:
        pipe: a text-to-image pipeline of a known family (load_pipeline).
        prompts: [{prompt, meta}] (evaluation.prompts).
        out_dir: images go to <out_dir>/<set_name>/<prompt id>-<index>.png, the index to
            <out_dir>/<set_name>/index.parquet.
        set_name: name of the prompt set (e.g. "duplicated", "unique", a file stem).
        num_images_per_prompt: n generations per prompt. Default 4.
        seed: base seed; image j of prompt p uses image_seed(seed, p, j). Default 0.
        batch_size: images per pipeline call. Default 8.
        num_inference_steps, guidance_scale: sampler settings. Defaults 50 and 7.5 (the paper's).
        resolution: image size; default the pipeline's.
    """
    folder = Path(out_dir) / set_name
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(pid, p, j) for pid, p in enumerate(prompts) for j in range(num_images_per_prompt)]
    rows = []
    device = pipe.device
    gen_device = "cpu" if device.type == "mps" else device
    for start in tqdm(range(0, len(jobs), batch_size), desc=f"generate {set_name}", unit="batch"):
        chunk = jobs[start:start + batch_size]
        gens = [torch.Generator(device=gen_device).manual_seed(image_seed(seed, p["prompt"], j)) for _, p, j in chunk]
        images = pipe([p["prompt"] for _, p, _ in chunk], generator=gens, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, height=resolution, width=resolution).images
        for (pid, p, j), image in zip(chunk, images):
            path = folder / f"{pid:05d}-{j:02d}.png"
            image.save(path)
            rows.append({"set": set_name, "prompt_id": pid, "prompt": p["prompt"], "image_index": j,
                         "seed": image_seed(seed, p["prompt"], j), "path": str(path),
                         "dup_group": int(p["meta"].get("dup_group", -1)),
                         "train_keys": list(map(str, p["meta"].get("keys", []))),
                         "label": str(p["meta"].get("type", p["meta"].get("label", "")))})
    pq.write_table(pa.Table.from_pylist(rows), folder / "index.parquet")
    return rows


def read_generations(folder: str | Path) -> dict[str, list[dict]]:
    """Earlier generations in `generate`'s layout (<folder>/<set>/index.parquet and its PNGs, as generate and
    memfilter-mitigate write them): {set name: its index rows}, each row's `path` resolved to an existing file."""
    folder = Path(folder)
    indexes = sorted(folder.glob("*/index.parquet"))
    if not indexes:
        raise FileNotFoundError(f"evaluation.generations={folder}: no <set>/index.parquet there (the layout "
                                "memfilter-evaluate and memfilter-mitigate write)")
    sets = {}
    for index in indexes:
        rows = pq.read_table(index).to_pylist()
        for r in rows:
            path = Path(r["path"])
            if not path.is_file():                         # written with a path relative to another directory
                path = index.parent / path.name
            if not path.is_file():
                raise FileNotFoundError(f"evaluation.generations={folder}: {r['path']} listed in {index} is missing")
            r["path"] = str(path)
            r["train_keys"] = list(r.get("train_keys") or [])
            r["label"] = str(r.get("label") or "")
        sets[index.parent.name] = rows
    return sets
