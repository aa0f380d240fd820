"""Item identity from the data: one 48-bit id per source picture, computed before any augmentation.

The item filter counts evidence per item, so the id has to follow a picture through everything training and
the data do to it: a dataloader's random crop and flip (the collate computes the id on the decoded source image,
before its transform), a copy that was re-encoded, resized or slightly tinted (a near duplicate), a mirrored copy.
And two different pictures must not share one.

`source_item_id` hashes a small perceptual description of the picture (docs/item-identity.md has measured rates):
- structure: an 8 x 8 grid of grey area means, each bit = cell above the grid's mean (the mean, not the median: a
  median is one of the cells, so two cells always sit on the threshold; and a gain leaves the signs as they are),
  flip-invariant by taking the smaller of the bits and their mirror (the grid of a mirrored picture is exactly the
  mirrored grid: `_reduced`);
- colour: the mean colour's chroma (R-Y, B-Y) in wide bins centred on grey, so a tint shift of a natural picture
  keeps its bin, while a red and a blue gradient of one layout differ;
- low-contrast pictures (grid std below LOW_CONTRAST grey levels: flat colours, faint gradients), whose structure
  says little and would be noise, get a 4 x 4 grid with a dead zone (a flat picture: all bits 0) and, instead of
  the wide chroma, the mean colour's luminance and chroma in LOW_STEP bins, so flat colours do not all collide.
An exact hash of quantised features keeps its id unless some feature sits within the change of a bin edge; the
doc quotes how often that happens.

`item_id_of_value` maps an id a prep manifest provides (the sha256 of the image bytes, a near-duplicate cluster) into
the same 48-bit space. `id48` is the 48-bit convention every item id of the project uses.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
from PIL import Image

GRID = 8                # structure cells per side: 64 bits
MIN_SIDE = 64           # the integer reduction keeps at least this many pixels on the shorter side
TIE = 0.01              # grey levels above the mean a cell must be to set its bit (exact ties: no bit)
LOW_CONTRAST = 6.0      # grid std (grey levels) below which a picture is "low contrast"
LOW_GRID = 4            # low contrast: structure cells per side
DEAD_ZONE = 1.0         # low contrast: grey levels a cell must exceed the mean by to set its bit
CHROMA_STEP = 80.0      # chroma bin width (grey levels), bins centred on grey (a mean this far from grey: saturated)
LOW_STEP = 24.0         # low contrast: luminance and chroma bin width
VERSION = b"item-v1"    # in the hashed bytes: a change of the description makes other ids, never mixed ones


def id48(data: bytes) -> int:
    """An item id: 48 bits of the SHA-256 of `data` (exact in two float32 halves), never 0."""
    return int(hashlib.sha256(data).hexdigest()[:12], 16) or 1


def item_id_of_value(value) -> int:
    """The item id of a value a manifest provides: the sha256 (hex) of the image bytes -> its first 48 bits, i.e.
    `id48(image bytes)`; anything else (a near-duplicate cluster id, int or str; "7" and 7 are one item) -> id48
    of its text. Raises ValueError for None or an empty string."""
    if value is None or isinstance(value, bool):
        raise ValueError(f"item id {value!r}: expected a sha256 hex string or a cluster id")
    if isinstance(value, (int, np.integer)):
        text = str(int(value))
    else:
        text = str(value).strip().lower()
    if not text:
        raise ValueError("item id: empty")
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        return int(text[:12], 16) or 1
    return id48(b"item-value/" + text.encode())


def _reduced(image: Image.Image) -> np.ndarray:
    """[h, w, 3] float64 of the image reduced by an odd integer factor k (exact block means), after a crop that
    removes the same number of columns (rows) on both sides: the reduction of a mirrored image is then exactly the
    mirror of the reduction. k keeps the shorter side at MIN_SIDE pixels or more; the crop takes at most 2k-1
    pixels of a side, under 3.2% of it (1.6% at each edge)."""
    w, h = image.size
    k = max(1, min(w, h) // MIN_SIDE)
    k -= (k % 2 == 0)                        # odd: a multiple of k of the same parity as the side always exists
    if k == 1:
        return np.asarray(image, dtype=np.float64)

    def span(n: int) -> tuple[int, int]:
        keep = n - n % k
        if (n - keep) % 2:
            keep -= k
        cut = (n - keep) // 2
        return cut, cut + keep

    (left, right), (top, bottom) = span(w), span(h)
    return np.asarray(image.reduce(k, box=(left, top, right, bottom)), dtype=np.float64)


@lru_cache(maxsize=256)
def _area_weights(n: int, cells: int) -> np.ndarray:
    """[cells, n] weights (read-only): row i averages the pixels of [i n/cells, (i+1) n/cells), partial pixels pro
    rata."""
    edges = np.arange(cells + 1) * n / cells
    j = np.arange(n)
    overlap = np.minimum(j[None, :] + 1, edges[1:, None]) - np.maximum(j[None, :], edges[:-1, None])
    weights = np.clip(overlap, 0, None) / (n / cells)
    weights.flags.writeable = False
    return weights


def describe(image) -> dict:
    """The quantised description `source_item_id` hashes (for inspection and the doc's measurements): structure
    bits [GRID, GRID] (canonical orientation), contrast, low_contrast, mean colour and its bins."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 uint8 array, got shape {image.shape}")
        image = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    elif image.mode != "RGB":
        image = image.convert("RGB")
    px = _reduced(image)                                                    # [h, w, 3]
    h, w, _ = px.shape
    strips = (_area_weights(h, GRID) @ px.reshape(h, w * 3)).reshape(GRID, w, 3)      # [GRID, w, 3] row means
    cells = _area_weights(w, GRID) @ strips                                            # [GRID, GRID, 3] (y, x, c)
    rgb = cells.mean(axis=(0, 1))
    cells = cells @ np.array([0.299, 0.587, 0.114])                                     # [GRID, GRID] grey
    # rounded: a picture and its mirror sum the same values in another order, and must not land on two sides of
    # a bin edge by one ulp
    contrast, y = round(float(cells.std()), 6), round(float(cells.mean()), 6)
    chroma = (round(float(rgb[0]) - y, 6), round(float(rgb[2]) - y, 6))
    low = contrast < LOW_CONTRAST
    if low:
        cells = cells.reshape(LOW_GRID, GRID // LOW_GRID, LOW_GRID, GRID // LOW_GRID).mean(axis=(1, 3))
        bits = cells - y > DEAD_ZONE
        bins = [int(y // LOW_STEP)] + [round(c / LOW_STEP) for c in chroma]
    else:
        bits = cells - y > TIE
        bins = [round(c / CHROMA_STEP) for c in chroma] if CHROMA_STEP else []
    bits = min(bits, bits[:, ::-1], key=lambda b: np.packbits(b).tobytes())
    return {"bits": bits, "contrast": contrast, "low_contrast": low, "mean_rgb": rgb, "bins": bins}


def source_item_id(image) -> int:
    """The 48-bit item id (non-zero) of a decoded picture: an RGB PIL image (other modes are converted) or an
    HxWx3 uint8 array. The same for the picture and its horizontal mirror; kept by JPEG re-encoding, resizing and
    small tint shifts unless a feature sits at a bin edge (docs/item-identity.md); different for different pictures
    but for a small measured rate. About 1 ms of CPU for a 1024 px picture, most of it PIL's integer reduction
    (numpy then works on 64-127 px), 0.2 ms for a 256 px one."""
    d = describe(image)
    data = VERSION + bytes([d["low_contrast"]]) + np.packbits(d["bits"]).tobytes() + \
        np.array(d["bins"], dtype=np.int8).tobytes()
    return id48(data)
