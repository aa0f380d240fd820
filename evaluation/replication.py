"""Replication: how close each generation comes to its nearest training image, in descriptor space.

The pieces of that measurement, each usable alone:
- `embed`: descriptors of the training set, in chunks, cached on disk per chunk (a crash or a second
  evaluation of the same run recomputes nothing that is already there);
- `nearest_neighbours`: exact cosine top-k over the database in chunks with a running top-k merge,
  so that the [Q, N] similarity matrix never exists (1M training images x 1000 generations would be
  4 GB); the database may live on the CPU (even in float16) while the products run on a GPU;
- `replication_stats` and `background_similarity`: the numbers the field reports (mean, p95,
  fraction above 0.5) and the train-vs-train distribution that tells what "close" means here;
- `match_grid` and `similarity_histogram`: pictures for a person.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm


# --------------------------------------------------------------------------- embedding with a cache

def _chunk_paths(descriptor, keys: list[str], cache_dir: Path) -> tuple[Path, Path]:
    """Cache files of one chunk: keyed by the descriptor (name, weights, preprocessing, dim) and the keys."""
    d = descriptor
    folder = cache_dir / "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{d.name}__{d.preprocessing}")
    h = hashlib.sha1(json.dumps([getattr(d, "fingerprint", d.name), d.preprocessing, d.dim, keys]).encode())
    stem = h.hexdigest()[:20]
    return folder / f"{stem}.safetensors", folder / f"{stem}.keys.json"


def _load_chunk(descriptor, keys: list[str], cache_dir: Path) -> torch.Tensor | None:
    mat_path, keys_path = _chunk_paths(descriptor, keys, cache_dir)
    if not (mat_path.exists() and keys_path.exists()):
        return None
    try:
        if json.loads(keys_path.read_text()) != keys:
            return None
        mat = load_file(str(mat_path))["descriptors"]
    except Exception:                                                      # a damaged file: recompute it
        return None
    return mat if mat.shape == (len(keys), descriptor.dim) else None


def _save_chunk(descriptor, keys: list[str], mat: torch.Tensor, cache_dir: Path) -> None:
    mat_path, keys_path = _chunk_paths(descriptor, keys, cache_dir)
    mat_path.parent.mkdir(parents=True, exist_ok=True)
    for path, write in ((mat_path, lambda p: save_file({"descriptors": mat.contiguous()}, p)),
                        (keys_path, lambda p: Path(p).write_text(json.dumps(keys)))):  # keys last: the commit
        tmp = f"{path}.tmp{os.getpid()}"
        write(tmp)
        os.replace(tmp, path)                                              # atomic: no half-written chunk


def embed(descriptor, samples: Iterable[tuple[str, Image.Image]], cache_dir: str | Path | None = None,
          chunk_size: int = 1024, progress: bool = True) -> tuple[list[str], torch.Tensor]:
    """Descriptors of (key, image) samples, in their order, computed in chunks and cached on disk.

    Each chunk of `chunk_size` samples is cached as `<cache_dir>/<name>__<preprocessing>/<hash>.safetensors`
    (the matrix) plus `<hash>.keys.json`, where the hash covers the descriptor's identity and the chunk's
    keys; a later call with the same samples loads every chunk without running the descriptor. Images
    are still read from `samples` (only keys decide a hit); a damaged or mismatched file is recomputed.

    Args:
        descriptor: an evaluation.descriptors.Descriptor (callable on a list of PIL images -> [n, D]).
        samples: iterable of (key, PIL image); keys unique and stable (the data contract's `key`).
        cache_dir: folder for the cache; None = no cache. Default None.
        chunk_size: samples per descriptor pass and per cache file. Default 1024.
        progress: show a tqdm bar. Default True.

    Returns:
        keys (list of N str) and descriptors [N, D] float32.
    """
    cache = Path(cache_dir) if cache_dir is not None else None
    keys: list[str] = []
    parts: list[torch.Tensor] = []
    total = len(samples) if hasattr(samples, "__len__") else None
    bar = tqdm(total=total, desc=f"embed ({descriptor.name})", unit="img", disable=not progress)
    hits = 0

    def flush(ck: list[str], ims: list[Image.Image]) -> None:
        nonlocal hits
        mat = _load_chunk(descriptor, ck, cache) if cache is not None else None
        if mat is None:
            mat = descriptor(ims).float().cpu()                            # [n, D]
            if cache is not None:
                _save_chunk(descriptor, ck, mat, cache)
        else:
            hits += 1
        keys.extend(ck)
        parts.append(mat)
        bar.update(len(ck))
        bar.set_postfix(cached_chunks=hits)

    ck, ims = [], []
    for key, image in samples:
        ck.append(str(key))
        ims.append(image)
        if len(ck) == chunk_size:
            flush(ck, ims)
            ck, ims = [], []
    if ck:
        flush(ck, ims)
    bar.close()
    return keys, (torch.cat(parts) if parts else torch.zeros(0, descriptor.dim))


# --------------------------------------------------------------------------- exact chunked search

def _exclusion_matrix(exclude, q: int) -> torch.Tensor | None:
    """exclude as a LongTensor [Q, E] (-1 = nothing), from [Q], [Q, E] or a ragged list of lists."""
    if exclude is None:
        return None
    if isinstance(exclude, torch.Tensor) or isinstance(exclude, np.ndarray):
        ex = torch.as_tensor(exclude, dtype=torch.long)
    else:
        rows = [list(r) if isinstance(r, Iterable) else [int(r)] for r in exclude]
        width = max((len(r) for r in rows), default=0)
        ex = torch.full((len(rows), max(width, 1)), -1, dtype=torch.long)
        for i, r in enumerate(rows):
            ex[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
    if ex.ndim == 1:
        ex = ex[:, None]
    if ex.shape[0] != q:
        raise ValueError(f"exclude has {ex.shape[0]} rows for {q} queries")
    return ex


@torch.no_grad()
def nearest_neighbours(queries: torch.Tensor, database: torch.Tensor, k: int = 1, chunk_size: int = 65536,
                       exclude: Sequence | torch.Tensor | None = None, exclude_self: bool = False,
                       query_chunk_size: int = 1024, device: str | torch.device | None = None,
                       progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k cosine neighbours of each query in the database, chunked both ways.

    Inputs are L2-normalised, so cosine similarity is the dot product. The products run in float32 on
    blocks of [query_chunk_size, chunk_size] (256 MB at the defaults), merged into a running top-k;
    nothing of size [Q, N] is made. The database may be float16 on the CPU; each chunk is cast and moved.

    Args:
        queries: [Q, D] descriptors.
        database: [N, D] descriptors.
        k: neighbours per query; clamped to N. Default 1.
        chunk_size: database rows per block. Default 65536.
        exclude: database indices a query may not match: [Q] (one each), [Q, E] (-1 = none) or a list
            of lists. Default None.
        exclude_self: query i may not match database row i (queries are the database, or its first Q
            rows). Default False.
        query_chunk_size: query rows per block. Default 1024.
        device: where products run; None = the queries' device. Default None.
        progress: tqdm bar over database chunks. Default False.

    Returns:
        sims [Q, k] float32 (descending) and idx [Q, k] long, on the CPU. A query with fewer than k
        candidates left after exclusions gets sim -inf and idx -1 in the empty places.
    """
    dev = torch.device(device) if device is not None else queries.device
    q_n, n = queries.shape[0], database.shape[0]
    if queries.ndim != 2 or database.ndim != 2 or (n and queries.shape[1] != database.shape[1]):
        raise ValueError(f"queries [Q, D] and database [N, D] needed; "
                         f"got {list(queries.shape)}, {list(database.shape)}")
    k = min(int(k), n)
    ex = _exclusion_matrix(exclude, q_n)
    if exclude_self:
        own = torch.arange(q_n, dtype=torch.long)[:, None]                 # [Q, 1]
        ex = own if ex is None else torch.cat([ex, own], dim=1)
    best_s = torch.full((q_n, k), float("-inf"), device=dev)               # [Q, k] running top-k
    best_i = torch.full((q_n, k), -1, dtype=torch.long, device=dev)
    if q_n == 0 or k == 0:
        return best_s.cpu(), best_i.cpu()
    q_all = queries.to(dev, torch.float32)
    ex = ex.to(dev) if ex is not None else None
    buf = torch.empty(min(query_chunk_size, q_n) * min(chunk_size, n), device=dev)  # one block, reused
    for start in tqdm(range(0, n, chunk_size), desc="nearest neighbours", disable=not progress):
        db = database[start:start + chunk_size].to(dev, torch.float32, non_blocking=True)   # [c, D]
        c = db.shape[0]
        for qs in range(0, q_n, query_chunk_size):
            qe = min(qs + query_chunk_size, q_n)
            s = torch.mm(q_all[qs:qe], db.T, out=buf[:(qe - qs) * c].view(qe - qs, c))   # [q, c] float32
            if ex is not None:                                             # excluded pairs in this block
                e = ex[qs:qe]
                hit = (e >= start) & (e < start + c)
                rows, cols = hit.nonzero(as_tuple=True)
                s[rows, e[rows, cols] - start] = float("-inf")
            if k == 1:
                v, i = s.max(dim=1, keepdim=True)                          # [q, 1]
            else:
                v, i = s.topk(min(k, c), dim=1)                            # [q, k']
            i = torch.where(v == float("-inf"), torch.full_like(i, -1), i + start)
            vs = torch.cat([best_s[qs:qe], v], dim=1)                      # merge: [q, k + k']
            is_ = torch.cat([best_i[qs:qe], i], dim=1)
            top_v, top_j = vs.topk(k, dim=1)
            best_s[qs:qe], best_i[qs:qe] = top_v, is_.gather(1, top_j)
    return best_s.cpu(), best_i.cpu()


def background_similarity(database: torch.Tensor, sample: int | None = 10000, seed: int = 0,
                          chunk_size: int = 65536, device: str | torch.device | None = None) -> torch.Tensor:
    """Similarity of training items to their nearest *other* training item: the background distribution.

    A generation at similarity 0.6 is a replica only if training images are rarely that close to each
    other; this is the distribution to hold it against.

    Args:
        database: [N, D] training descriptors (one row per unique item).
        sample: how many random items to query; None = all. Default 10000.
        seed: the sample's seed. Default 0.
        chunk_size: database rows per block (see nearest_neighbours). Default 65536.
        device: where products run; None = the database's device. Default None.

    Returns:
        [S] float32 similarities, S = min(sample, N); empty when N < 2.
    """
    n = database.shape[0]
    if n < 2:
        return torch.zeros(0)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[: n if sample is None else min(sample, n)]   # [S]
    sims, _ = nearest_neighbours(database[idx], database, k=1, chunk_size=chunk_size, exclude=idx,
                                 device=device)
    return sims[:, 0]


def replication_stats(sims, threshold: float = 0.5) -> dict:
    """The field's summary of nearest-training-image similarities.

    Args:
        sims: 1D tensor, array or list of similarities (non-finite values are dropped).
        threshold: the replication bar. Default 0.5.

    Returns:
        {n, mean, p95 (95th percentile, linear interpolation), max, frac_above (fraction > threshold),
        threshold}; the statistics are None when n is 0.
    """
    x = sims.detach().cpu().double().numpy() if isinstance(sims, torch.Tensor) else np.asarray(sims, dtype=np.float64)
    x = x.reshape(-1)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"n": 0, "mean": None, "p95": None, "max": None, "frac_above": None, "threshold": threshold}
    return {"n": int(x.size), "mean": float(x.mean()), "p95": float(np.percentile(x, 95)), "max": float(x.max()),
            "frac_above": float((x > threshold).mean()), "threshold": threshold}


# --------------------------------------------------------------------------- pictures for a person

def _fit(image: Image.Image | None, cell: int) -> Image.Image:
    """The image scaled into a cell x cell grey square (aspect kept); a crossed cell when missing."""
    out = Image.new("RGB", (cell, cell), (200, 200, 200))
    if image is None:
        d = ImageDraw.Draw(out)
        d.line((0, 0, cell, cell), fill=(150, 150, 150))
        d.text((4, 4), "not found", fill=(0, 0, 0), font=ImageFont.load_default())
        return out
    im = image.convert("RGB")
    scale = cell / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
    out.paste(im, ((cell - im.width) // 2, (cell - im.height) // 2))
    return out


def _truncate(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def match_grid(rows: list[dict], path: str | Path, cell: int = 128) -> Path:
    """A PNG: one row per match, "generation | nearest training image", similarity and prompt below.

    Args:
        rows: dicts with generated (PIL), match (PIL or None), similarity (float), prompt (str).
        path: the PNG to write.
        cell: pixel size of each image cell. Default 128.
    """
    font = ImageFont.load_default()
    header, text_h, pad = 16, 28, 4
    width = 2 * cell + 3 * pad
    canvas = Image.new("RGB", (width, header + max(len(rows), 1) * (cell + text_h)), "white")
    draw = ImageDraw.Draw(canvas)
    title = _truncate(draw, "generation | nearest training image", width - pad, font)
    draw.text((pad, 2), title, fill="black", font=font)
    if not rows:
        draw.text((pad, header + 4), "no generations", fill="black", font=font)
    for r, row in enumerate(rows):
        y = header + r * (cell + text_h)
        canvas.paste(_fit(row.get("generated"), cell), (pad, y))
        canvas.paste(_fit(row.get("match"), cell), (2 * pad + cell, y))
        draw.text((pad, y + cell + 2), f"similarity {row.get('similarity', float('nan')):.3f}", fill="black", font=font)
        draw.text((pad, y + cell + 14), _truncate(draw, str(row.get("prompt", "")), width - 2 * pad, font),
                  fill=(60, 60, 60), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def similarity_histogram(groups: dict[str, Sequence[float]], path: str | Path, threshold: float = 0.5,
                         title: str = "similarity to the nearest training image", bins: int = 50) -> Path:
    """A PNG histogram (density) of similarity distributions, one per group, with the threshold line.

    Args:
        groups: name -> similarities (e.g. duplicated, unique, train vs train background); empty ones skipped.
        path: the PNG to write.
        threshold: the replication bar, drawn as a vertical line. Default 0.5.
        title: plot title (name the descriptor in it). Default "similarity to the nearest training image".
        bins: histogram bins over the common range. Default 50.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure                                   # no pyplot: no global backend state

    data = {k: np.asarray(v.detach().double().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64).reshape(-1)
            for k, v in groups.items()}
    data = {k: v[np.isfinite(v)] for k, v in data.items()}
    data = {k: v for k, v in data.items() if v.size}
    lo = min([0.0] + [float(v.min()) for v in data.values()])
    edges = np.linspace(lo, 1.0, bins + 1)
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, v in data.items():
        ax.hist(np.clip(v, lo, 1.0), bins=edges, density=True, alpha=0.5, label=f"{name} (n={v.size})")
    ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold}")
    ax.set_xlabel("cosine similarity to the nearest training image")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
