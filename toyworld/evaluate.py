"""Evaluation in the toy world, where memorization is read exactly from pixels.

For one fine-tuned pipeline and the world it was fine-tuned on (`toyworld.world`):

- **detection**: Wen et al.'s step-1 score of every duplicated caption and of a sample of unique ones
  (n generations, the first step of the CFG trajectory), with AUC and TPR at 1% FPR;
- **replication** (unintended memorization, Naseh et al.): each generation's detail descriptor against
  every training item's; a generation replicates when its nearest training item is more similar than
  the *replication bar*, calibrated on the world: the 99th percentile of the nearest-training similarity
  of fresh items that were never trained on (what chance alone reaches). In a world trained with random flips
  (`world.augment`) a generation is compared as drawn and mirrored, the nearer of the two counting
  (`nearest_training`), for the generations and for the fresh items of the bar alike;
- **fidelity** (intended memorization): the named attributes read back from each generation;
- **filter decisions**: the run's per-sample records against the duplication ground truth (precision
  and recall of dropping duplicated samples, overall and over time).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from memfilter.evaluation.detection import detection_metrics
from memfilter.evaluation.detect import score_prompts
from memfilter.evaluation.generate import image_seed
from memfilter.evaluation.replication import nearest_neighbours
from memfilter.toyworld.world import ToyWorld, detail_descriptor, draw_item, fidelity, named_attributes, parse_caption


@dataclass
class WorldEvalSettings:
    """What the world evaluation samples and measures.

    Args:
        num_images_per_prompt: generations per duplicated prompt. Default 8.
        num_unique_prompts: unique training captions sampled. Default 64.
        unique_images: generations per unique prompt. Default 2.
        num_inference_steps: DDIM steps of each generation. Default 50 (the paper's).
        guidance_scale: classifier-free guidance. Default 7.5 (the paper's).
        detection_generations: n initial noises per prompt for the step-1 score. Default 4.
        detection_steps: first k sampling steps averaged. Default 1.
        fresh_items: never-trained items that calibrate the replication bar. Default 1000.
        bar_quantile: quantile of their nearest-training similarity used as the bar. Default 0.99.
        seed: noise seed; image j of prompt p starts from image_seed(seed, p, j) in every run. Default 0.
        batch_size: images per pipeline call. Default 64.
    """

    num_images_per_prompt: int = 8
    num_unique_prompts: int = 64
    unique_images: int = 2
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    detection_generations: int = 4
    detection_steps: int = 1
    fresh_items: int = 1000
    bar_quantile: float = 0.99
    seed: int = 0
    batch_size: int = 64


def _normalise(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(x, np.float32))
    return torch.nn.functional.normalize(t, dim=1)


def descriptor_views(image, world: ToyWorld) -> np.ndarray:
    """[V, D] float32: the detail descriptors under which `image` is compared with the training items: the
    image's own and, in a world trained with random flips (`world.augment`), its horizontal mirror's (V = 2). A
    random crop shifts an appearance by at most `world.augment_pad` (1 px), which leaves a copy's descriptor at
    ~0.86 of its item's, above the bar: no shifted views are needed."""
    a = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    views = [detail_descriptor(a, world.spec)]
    if world.augment:
        views.append(detail_descriptor(np.ascontiguousarray(a[:, ::-1]), world.spec))
    return np.stack(views)


def nearest_training(views: np.ndarray, train_desc: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Nearest training row of each image: `views` [Q, V, D] (descriptor_views per image), `train_desc` [N, D]
    normalised. Returns (similarity [Q], row [Q]): the best over the image's views, so that a mirrored copy
    of a training item counts as that item's copy in an augmented world."""
    views = np.asarray(views, np.float32)
    q, v, d = views.shape
    sims, nn = nearest_neighbours(_normalise(views.reshape(q * v, d)), train_desc, k=1)
    sims, nn = sims[:, 0].reshape(q, v), nn[:, 0].reshape(q, v)
    best = sims.argmax(dim=1, keepdim=True)
    return sims.gather(1, best)[:, 0].numpy(), nn.gather(1, best)[:, 0].numpy()


def training_descriptors(world: ToyWorld) -> tuple[list[int], torch.Tensor, list[np.ndarray]]:
    """(item indices, L2-normalised detail descriptors [N, D], images) of every distinct training item, as the
    evaluation sees it: the item itself, S x S (in an augmented world, the centre of its canvas)."""
    idx, desc, images = [], [], []
    for i, item in world.items():
        idx.append(i)
        desc.append(detail_descriptor(item["image"], world.spec))
        images.append(item["image"])
    return idx, _normalise(np.stack(desc)), images


def replication_bar(world: ToyWorld, train_desc: torch.Tensor, n: int = 1000, quantile: float = 0.99) -> dict:
    """The bar: the `quantile` of nearest-training similarity of `n` fresh (never trained) items, by the rule the
    generations are judged by (`nearest_training`: flip-invariant in an augmented world)."""
    fresh = np.stack([descriptor_views(draw_item(world.seed, "fresh", i, world.spec)["image"], world)
                      for i in range(n)])
    s, _ = nearest_training(fresh, train_desc)
    return {"bar": float(np.quantile(s, quantile)), "quantile": quantile, "fresh_items": n,
            "fresh_mean": float(s.mean()), "fresh_max": float(s.max()), "flip_invariant": world.augment}


@torch.no_grad()
def _generate(pipe, prompts: list[str], n: int, settings: WorldEvalSettings, res: int) -> list[list[Image.Image]]:
    jobs = [(p, j) for p in prompts for j in range(n)]
    images: list[Image.Image] = []
    for s in tqdm(range(0, len(jobs), settings.batch_size), desc=f"generate {n} x {len(prompts)} prompts",
                  unit="batch"):
        chunk = jobs[s:s + settings.batch_size]
        gens = [torch.Generator("cpu").manual_seed(image_seed(settings.seed, p, j)) for p, j in chunk]
        images += pipe([p for p, _ in chunk], generator=gens, num_inference_steps=settings.num_inference_steps,
                       guidance_scale=settings.guidance_scale, height=res, width=res).images
    return [images[i * n:(i + 1) * n] for i in range(len(prompts))]


def filter_decisions(records_dir: str | Path, world: ToyWorld, num_phases: int = 4) -> dict:
    """Precision and recall of dropping duplicated samples, from a run's records (eligible samples only:
    a caption dropped for guidance is never judged)."""
    from memfilter.filtering.records import eligible_mask, read_records

    t = read_records(records_dir).to_pandas()
    items = ToyWorld.item_of_keys(t["key"])
    dup = items < world.num_duplicated
    concept = items >= world.num_duplicated + world.num_unique
    judged = eligible_mask(t)
    dropped = ~t["kept"].to_numpy()
    step = t["step"].to_numpy()

    def pr(sel):
        sel = sel & ~concept                     # intended memorization: reported on its own below
        d, j, x = dup[sel], judged[sel], dropped[sel]
        n_drop = int((x & j).sum())
        return {"dropped": n_drop, "dropped_duplicated": int((x & j & d).sum()),
                "duplicated_judged": int((j & d).sum()), "unique_judged": int((j & ~d).sum()),
                "precision": float((x & j & d).sum() / n_drop) if n_drop else None,
                "recall": float((x & j & d).sum() / max(1, (j & d).sum())),
                "unique_dropped_fraction": float((x & j & ~d).sum() / max(1, (j & ~d).sum()))}

    out = {"overall": pr(np.ones(len(t), bool)), "phases": []}
    if concept.any():
        out["concept_dropped_fraction"] = float(dropped[concept].mean())
    edges = np.linspace(0, step.max(), num_phases + 1) if len(step) else np.zeros(1)
    for a, b in zip(edges[:-1], edges[1:]):
        sel = (step > a) & (step <= b)
        out["phases"].append({"steps": [int(a) + 1, int(b)], **pr(sel)})
    return out


def _generation_rows(pipe, world: ToyWorld, settings: WorldEvalSettings, sets) -> list[dict]:
    """One row per generation of every (set name, items, prompts, images per prompt): the image, its detail
    descriptor and its fidelity to what the prompt names (a concept intends its own item)."""
    spec, rows = world.spec, []
    for set_name, items, prompts, n in sets:
        gens = _generate(pipe, prompts, n, settings, spec.resolution) if prompts else []
        for item, prompt, images in zip(items, prompts, gens):
            attrs = parse_caption(prompt) or world.item(item)["attrs"]
            item_image = Image.fromarray(world.item(item)["image"])
            for j, im in enumerate(images):
                rows.append({"set": set_name, "item": item, "prompt": prompt, "image_index": j, "image": im,
                             "item_image": item_image, "views": descriptor_views(im, world),
                             **{f"fid_{k}": v for k, v in fidelity(im, attrs, spec).items()}})
    return rows


def evaluate_world(pipe, world: ToyWorld, settings: WorldEvalSettings = WorldEvalSettings(),
                   records_dir: str | Path | None = None, bar: dict | None = None,
                   train: tuple | None = None) -> dict:
    """Detection, replication, fidelity (and filter decisions when `records_dir` is given) of one pipeline.

    Returns a dict with the numbers under "detection", "replication", "fidelity", "filter" and, under
    "rows", one row per generation (prompt, set, item, nearest item, similarity, replicated, fidelity,
    the image) for reports.
    """
    spec, res = world.spec, world.spec.resolution
    train = train or training_descriptors(world)
    train_idx, train_desc, train_images = train
    bar = bar or replication_bar(world, train_desc, settings.fresh_items, settings.bar_quantile)

    dup_prompts = [it["caption"] for it in world.duplicated]
    rng = np.random.default_rng(settings.seed)
    uniq_items = sorted(rng.choice(np.arange(world.num_duplicated, world.num_duplicated + world.num_unique),
                                   min(settings.num_unique_prompts, world.num_unique), replace=False).tolist())
    uniq_prompts = [world.item(i)["caption"] for i in uniq_items]

    scores, _ = score_prompts(pipe, dup_prompts + uniq_prompts, num_generations=settings.detection_generations,
                              num_steps=settings.detection_steps, guidance_scale=settings.guidance_scale,
                              seed=settings.seed, batch_size=settings.batch_size, resolution=res)
    labels = np.r_[np.ones(len(dup_prompts)), np.zeros(len(uniq_prompts))]
    det = detection_metrics(scores.numpy(), labels, fprs=(0.01,))
    det.update(num_generations=settings.detection_generations, num_steps=settings.detection_steps,
               duplicated_prompts=len(dup_prompts), unique_prompts=len(uniq_prompts),
               unique_prompts_distinct=len(set(uniq_prompts)),
               score_duplicated_mean=float(scores[:len(dup_prompts)].mean()),
               score_unique_mean=float(scores[len(dup_prompts):].mean()),
               scores_duplicated=scores[:len(dup_prompts)].tolist(), scores_unique=scores[len(dup_prompts):].tolist())
    det.pop("roc", None)

    sets = (("duplicated", list(range(world.num_duplicated)), dup_prompts, settings.num_images_per_prompt),
            ("unique", uniq_items, uniq_prompts, settings.unique_images),
            ("concept", world.concept_indices(), [world.item(i)["caption"] for i in world.concept_indices()],
             settings.num_images_per_prompt))
    rows = _generation_rows(pipe, world, settings, sets)
    sims, nn = nearest_training(np.stack([r["views"] for r in rows]), train_desc)
    own = {i: k for k, i in enumerate(train_idx)}
    for r, s, j in zip(rows, sims.tolist(), nn.tolist()):
        views = _normalise(r.pop("views"))
        r.update(similarity=s, nearest_item=train_idx[j], nearest_image=Image.fromarray(train_images[j]),
                 replicated=s > bar["bar"], own_similarity=float((views @ train_desc[own[r["item"]]]).max()))

    def summary(sel):
        if not sel:
            return {}
        sim = np.array([r["similarity"] for r in sel])
        return {"generations": len(sel), "replicated_fraction": float(np.mean([r["replicated"] for r in sel])),
                "replicated_own_fraction": float(np.mean([r["replicated"] and r["nearest_item"] == r["item"]
                                                          for r in sel])),
                "similarity_mean": float(sim.mean()), "similarity_p95": float(np.quantile(sim, 0.95)),
                "own_similarity_mean": float(np.mean([r["own_similarity"] for r in sel])),
                "items_replicated": int(len({r["item"] for r in sel if r["replicated"]
                                             and r["nearest_item"] == r["item"]}))}

    def fid(sel):
        return {k: float(np.mean([r[f"fid_{k}"] for r in sel])) for k in (*named_attributes(spec), "all")} \
            if sel else {}

    by = {s: [r for r in rows if r["set"] == s] for s in ("duplicated", "unique", "concept")}
    out = {"detection": det, "replication": {"bar": bar, **{s: summary(v) for s, v in by.items()}},
           "fidelity": {s: fid(v) for s, v in by.items()}, "rows": rows,
           "settings": asdict(settings), "descriptor": "world detail (block tints of the background and "
                                                       "the background colour; cosine; exact for the procedural world)"
                                                       + ("; the better of the generation and its mirror: the "
                                                          "world was trained with random flips" if world.augment
                                                          else "")}
    if records_dir is not None and Path(records_dir).exists():
        out["filter"] = filter_decisions(records_dir, world)
    return out


def to_json(result: dict) -> dict:
    """The result without images (for report.json)."""
    rows = [{k: v for k, v in r.items() if not isinstance(v, Image.Image)} for r in result["rows"]]
    return json.loads(json.dumps({**result, "rows": rows}, default=float))
