"""Collision and invariance rates of `memfilter.filtering.items.source_item_id` (docs/item-identity.md quotes them).

Collisions (fraction of pairs of different sources that share an id), beside those of the previous id's recipe
(an 8 x 8 average hash with a median threshold, no colour) on the same untouched pictures:
- flat: random flat colours;
- gradients: linear gradients between two random colours in a random direction (and how alike colliding ones are);
- textures: smooth random textures (low-passed noise at random scales);
- photos: the real photos installed with scikit-learn and matplotlib, and random crops of them (0.3-0.7 of each
  side, random positions) as sources of their own: pairs of crops of one photo that overlap by half or more (of
  the smaller crop) are not counted.
Invariance (fraction of images whose id a change keeps): horizontal flip, JPEG q75/q90 re-encoding, resize to half,
a 0.95 and a 0.9 crop (of each side, at a random position), a small tint (each channel +-8 levels) and a 10%
brightness gain, on each set. Then the CPU time per picture.

    OPENBLAS_NUM_THREADS=1 python docs/scripts/item_id_collisions.py [--flat 512] [--gradients 512] \
        [--textures 512] [--crops 40] [--seed 0]
"""
from __future__ import annotations

import argparse
import io
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from memfilter.filtering.items import describe, source_item_id


def photos() -> dict[str, Image.Image]:
    """The real photos installed here: scikit-learn's china.jpg and flower.jpg, matplotlib's grace_hopper.jpg."""
    found = {}
    try:
        from sklearn.datasets import load_sample_images
        data = load_sample_images()
        for name, arr in zip(data.filenames, data.images):
            found[Path(name).name] = Image.fromarray(arr)
    except ImportError:
        pass
    try:
        import matplotlib
        p = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        if p.exists():
            found[p.name] = Image.open(p).convert("RGB")
    except ImportError:
        pass
    return found


def flat(rng, n: int, size: int = 64) -> list[Image.Image]:
    return [Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3))) for _ in range(n)]


def gradients(rng, n: int, size: int = 128) -> tuple[list[Image.Image], list[tuple]]:
    """(images, (direction the grey level grows in, colour 0, colour 1) of each)."""
    out, params = [], []
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    for _ in range(n):
        a = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(a) + yy * np.sin(a)
        t = (t - t.min()) / (t.max() - t.min())
        c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        out.append(Image.fromarray((c0 + t[..., None] * (c1 - c0)).round().astype(np.uint8)))
        brighter = (c1 - c0) @ np.array([0.299, 0.587, 0.114]) >= 0
        params.append((a if brighter else a + np.pi, c0, c1))      # the direction grey grows in
    return out, params


def direction_gap(a: float, b: float) -> float:
    """Degrees between two gradient directions, a mirror (a -> pi - a) counting as the same direction."""
    def gap(x, y):
        d = abs(x - y) % (2 * np.pi)
        return min(d, 2 * np.pi - d)
    return float(np.degrees(min(gap(a, b), gap(np.pi - a, b))))


def average_hash(im: Image.Image) -> int:
    """The id the item filter used before, on an untouched picture: 8 x 8 grey area means, bit = above their
    median, no colour (filtering/policies.py image_groups)."""
    grey = np.asarray(im.convert("RGB"), dtype=np.float64) @ np.array([0.299, 0.587, 0.114])
    h, w = grey.shape
    cells = np.array([[grey[i * h // 8:(i + 1) * h // 8, j * w // 8:(j + 1) * w // 8].mean() for j in range(8)]
                      for i in range(8)])
    return hash(np.packbits(cells > np.median(cells)).tobytes())


def textures(rng, n: int, size: int = 256) -> list[Image.Image]:
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (int(rng.integers(3, 24)),) * 2 + (3,), dtype=np.uint8)
        im = Image.fromarray(small).resize((size, size), Image.BICUBIC)
        out.append(im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 3)))))
    return out


def crops(rng, images: dict[str, Image.Image], per_photo: int) -> list[tuple[str, tuple, Image.Image]]:
    """(photo, box, crop): the whole photo, then random crops of 0.3-0.7 of each side."""
    out = []
    for name, im in images.items():
        w, h = im.size
        out.append((name, (0, 0, w, h), im))
        for _ in range(per_photo):
            cw, ch = int(w * rng.uniform(0.3, 0.7)), int(h * rng.uniform(0.3, 0.7))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            box = (x, y, x + cw, y + ch)
            out.append((name, box, im.crop(box)))
    return out


def overlap(a: tuple, b: tuple) -> float:
    """Intersection over the smaller box's area."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / area


def colliding_pairs(ids: list[int], distinct=None) -> tuple[int, int]:
    """(colliding pairs, pairs) among pairs (i < j) with distinct(i, j) true (all pairs by default)."""
    if distinct is None:
        counts = Counter(ids)
        n = len(ids)
        return sum(c * (c - 1) // 2 for c in counts.values()), n * (n - 1) // 2
    hits = total = 0
    for i in range(len(ids)):
        for j in range(i + 1, len(ids)):
            if distinct(i, j):
                total += 1
                hits += ids[i] == ids[j]
    return hits, total


def jpeg(im: Image.Image, q: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def random_crop(im: Image.Image, frac: float, rng) -> Image.Image:
    w, h = im.size
    cw, ch = round(w * frac), round(h * frac)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return im.crop((x, y, x + cw, y + ch))


def tint(im: Image.Image, rng, amount: int = 8) -> Image.Image:
    a = np.asarray(im, dtype=np.int16) + rng.integers(-amount, amount + 1, 3)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def gain(im: Image.Image, g: float = 1.1) -> Image.Image:
    return Image.fromarray(np.clip(np.asarray(im, dtype=np.float32) * g, 0, 255).round().astype(np.uint8))


CHANGES = {
    "flip": lambda im, rng: im.transpose(Image.FLIP_LEFT_RIGHT),
    "jpeg q75": lambda im, rng: jpeg(im, 75),
    "jpeg q90": lambda im, rng: jpeg(im, 90),
    "resize 0.5": lambda im, rng: im.resize((max(1, im.width // 2), max(1, im.height // 2)), Image.LANCZOS),
    "crop 0.95": lambda im, rng: random_crop(im, 0.95, rng),
    "crop 0.9": lambda im, rng: random_crop(im, 0.9, rng),
    "tint +-8": lambda im, rng: tint(im, rng),
    "gain 1.1": lambda im, rng: gain(im),
}


def invariance(images: list[Image.Image], rng) -> dict[str, float]:
    base = [source_item_id(im) for im in images]
    return {name: float(np.mean([source_item_id(change(im, rng)) == b for im, b in zip(images, base)]))
            for name, change in CHANGES.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flat", type=int, default=512)
    ap.add_argument("--gradients", type=int, default=512)
    ap.add_argument("--textures", type=int, default=512)
    ap.add_argument("--crops", type=int, default=40, help="random crops per photo")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)

    grads, grad_params = gradients(rng, args.gradients)
    sets = {"flat colours": flat(rng, args.flat), "gradients": grads, "smooth textures": textures(rng, args.textures)}
    pics = photos()
    cropped = crops(rng, pics, args.crops)
    sets["photos + crops"] = [c for _, _, c in cropped]

    print(f"photos: {', '.join(f'{n} {im.width}x{im.height}' for n, im in pics.items()) or 'none installed'}")
    print("\ncollisions (pairs of different sources sharing an id)")
    ids_of = {}
    for name, images in sets.items():
        ids = ids_of[name] = [source_item_id(im) for im in images]
        old = [average_hash(im) for im in images]
        distinct = None
        if name == "photos + crops":
            def distinct(i, j):
                return cropped[i][0] != cropped[j][0] or overlap(cropped[i][1], cropped[j][1]) < 0.5
        hits, total = colliding_pairs(ids, distinct)
        old_hits, _ = colliding_pairs(old, distinct)
        print(f"  {name:16s} {len(images):4d} sources, {len(set(ids)):4d} ids: {hits} of {total} pairs "
              f"({hits / max(total, 1):.3%}); the previous average hash: {old_hits / max(total, 1):.3%}")
    ids = ids_of["gradients"]
    pairs = [(i, j) for i in range(len(ids)) for j in range(i + 1, len(ids))]
    apart = [(i, j) for i, j in pairs if direction_gap(grad_params[i][0], grad_params[j][0]) > 20]
    hits = [(i, j) for i, j in pairs if ids[i] == ids[j]]
    gaps = [direction_gap(grad_params[i][0], grad_params[j][0]) for i, j in hits]
    low = [describe(im)["low_contrast"] for im in grads]
    textured = [d for (i, j), d in zip(hits, gaps) if not low[i]]
    print(f"  gradients: colliding pairs' directions differ by {np.median(gaps) if gaps else 0:.0f} degrees "
          f"(median), {max(gaps) if gaps else 0:.0f} at most; pairs more than 20 degrees apart: "
          f"{sum(ids[i] == ids[j] for i, j in apart)} of {len(apart)} collide; {len(hits) - len(textured)} colliding "
          f"pairs are low-contrast ({sum(low)} of {len(low)} gradients are), the others' directions differ by "
          f"{max(textured) if textured else 0:.0f} degrees at most")
    ids, cols = ids_of["flat colours"], [np.asarray(im)[0, 0].astype(int) for im in sets["flat colours"]]
    near = [int(np.abs(cols[i] - cols[j]).max()) for i in range(len(ids)) for j in range(i + 1, len(ids))
            if ids[i] == ids[j]]
    print(f"  flat colours: colliding pairs differ by {np.median(near) if near else 0:.0f} levels in their most "
          f"different channel (median), {max(near) if near else 0} at most")

    print("\ninvariance (fraction of images whose id the change keeps)")
    print("  " + " " * 16 + "".join(f"{c:>11s}" for c in CHANGES))
    for name, images in sets.items():
        rates = invariance(images, rng)
        print(f"  {name:16s}" + "".join(f"{rates[c]:11.1%}" for c in CHANGES))

    if pics:
        print("\nCPU time per picture (a photo resized; time.process_time)")
        photo = next(iter(pics.values()))
        for size in ((1536, 1024), (1024, 1024), (512, 512), (384, 256)):
            im = photo.resize(size)
            source_item_id(im)
            t0 = time.process_time()
            for _ in range(200):
                source_item_id(im)
            print(f"  {size[0]}x{size[1]}: {(time.process_time() - t0) / 200 * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
