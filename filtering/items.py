"""Item identity from the data: one 48-bit id per source picture, computed before any augmentation.

The item filter counts evidence per item, so the id has to follow a picture through everything training and
the data do to it: a dataloader's random crop and flip (the collate computes the id on the decoded source image,
before its transform), a copy that was re-encoded, resized or slightly tinted (a near duplicate), a mirrored copy.
And two different pictures must not share one.

`source_item_id` hashes a small perceptual description of the picture (docs/item-identity.md has measured rates):
- structure: an 8 x 8 grid of grey area means, each bit = cell above the grid's mean (the mean, not the median: a
  median is one of the cells, so two cells always sit on the threshold; and a gain leaves the signs as they are),
  flip-invariant by taking the smaller of the bits and their mirror (the grid of a mirrored picture is exactly the
  mirrored grid: `_reduced`; every pixel counts, so a resize moves no cell edge);
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


def _spans(n: int, k: int) -> tuple[int, int]:
    """(margin, blocks): a side of n pixels as a margin, `blocks` blocks of k and the same margin again (under k
    pixels each: k odd, so the remainder or the remainder plus k is even)."""
    m = n % k
    m += k if m % 2 else 0
    return m // 2, (n - m) // k


def _reduced(image: Image.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The image as block means: ([H, W, 3] float64, row edges [H + 1], column edges [W + 1] in pixels). Blocks are
    k x k (k odd, the shorter side keeps MIN_SIDE blocks or more), laid out symmetrically: the remainder of a side
    is split into two equal margin blocks at its ends. Every pixel counts once, and the blocks of a mirrored image
    are exactly the mirrored blocks (PIL's integer reduction of the same pixels), so the grid is mirror-exact."""
    w, h = image.size
    k = max(1, min(w, h) // MIN_SIDE)
    k -= (k % 2 == 0)
    if k == 1:
        return np.asarray(image, dtype=np.float64), np.arange(h + 1), np.arange(w + 1)
    parts = []
    for n in (w, h):
        c, blocks = _spans(n, k)
        # (start, end, block size) of the margin, the blocks, the other margin; empty margins left out
        parts.append([p for p in ((0, c, c), (c, n - c, k), (n - c, n, c)) if p[1] > p[0]])
    rows = []
    for top, bottom, fy in parts[1]:
        rows.append(np.concatenate([np.asarray(image.reduce((fx, fy), box=(left, top, right, bottom)))
                                    for left, right, fx in parts[0]], axis=1))
    edges = [np.concatenate([[0]] + [np.arange(a + f, b + 1, f) for a, b, f in part]) for part in parts]
    return np.concatenate(rows, axis=0).astype(np.float64), edges[1], edges[0]


def _area_weights(edges: np.ndarray, cells: int) -> np.ndarray:
    """[cells, len(edges) - 1] weights: row i averages [i n / cells, (i+1) n / cells) of the n pixels that the blocks
    between `edges` cover, each block's mean weighted by its overlap with it."""
    key = (edges.tobytes(), cells)
    if key not in _WEIGHTS:
        n = edges[-1]
        bounds = np.arange(cells + 1) * n / cells
        overlap = np.minimum(edges[None, 1:], bounds[1:, None]) - np.maximum(edges[None, :-1], bounds[:-1, None])
        if len(_WEIGHTS) > 1024:
            _WEIGHTS.clear()
        _WEIGHTS[key] = np.clip(overlap, 0, None) / (n / cells)
    return _WEIGHTS[key]


_WEIGHTS: dict = {}      # the weights of the image sizes seen (a data set has few)


def describe(image) -> dict:
    """The quantised description `source_item_id` hashes (for inspection and the doc's measurements): structure
    bits [GRID, GRID] (canonical orientation), contrast, low_contrast, mean colour and its bins."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 uint8 array, got shape {image.shape}")
        image = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    elif image.mode != "RGB":
        image = image.convert("RGB")
    px, row_edges, col_edges = _reduced(image)                              # [h, w, 3] block means
    h, w, _ = px.shape
    strips = (_area_weights(row_edges, GRID) @ px.reshape(h, w * 3)).reshape(GRID, w, 3)   # [GRID, w, 3]
    cells = _area_weights(col_edges, GRID) @ strips                                     # [GRID, GRID, 3] (y, x, c)
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
