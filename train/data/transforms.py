"""Image and caption handling shared by every data source.

Bad input raises `BadSample(reason)`; sources catch it, count the reason and skip the sample. Random
choices (crop, flip, which of several captions) are a pure function of (seed, epoch, key), so they do
not depend on worker count or process order and a resumed run makes the same ones.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

# A finite guard against decompression bombs (PIL's default is ~89M; SD data rarely exceeds 16k x 16k).
DEFAULT_MAX_PIXELS = 16384 * 16384
# shorter sides below this are skipped ("too_small"): 1x1 tracking pixels, icons and thumbnails in scraped data,
# while the toy world's 16 px images pass. Every source takes it as its min_size default.
DEFAULT_MIN_SIZE = 16
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS
INTERPOLATIONS = {"bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR}
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# Freed image blocks Pillow keeps for the next image (its PILLOW_BLOCKS_MAX). By default it returns every decoded
# image's memory to the OS and faults it in again for the next one: a third of a plain JPEG decode loop's time
# is then the kernel's. Each cached block holds at most one image (Pillow's block size, 16 MiB by default), so a
# process keeps at most IMAGE_BLOCKS x min(image bytes, 16 MiB) for reuse.
IMAGE_BLOCKS = 8


class BadSample(Exception):
    """A sample that cannot be used; `reason` is the short name it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def reuse_image_memory(worker_id: int | None = None) -> None:
    """Let Pillow reuse freed image memory in this process (IMAGE_BLOCKS); a value the user set through
    PILLOW_BLOCKS_MAX or Pillow's API is kept. Training calls it where its data is decoded: in each webdataset
    stream and in each map-style dataloader worker (its worker_init_fn)."""
    if "PILLOW_BLOCKS_MAX" not in os.environ and Image.core.get_blocks_max() == 0:
        Image.core.set_blocks_max(IMAGE_BLOCKS)


def rng_for(seed: int, epoch: int, key: str, purpose: str) -> random.Random:
    """A random.Random for one decision about one sample in one epoch."""
    h = hashlib.sha256(f"{seed}/{epoch}/{key}/{purpose}".encode()).digest()
    return random.Random(int.from_bytes(h[:8], "little"))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: alpha composited on white, palette with transparency, CMYK, 16-bit, float."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(data: bytes | str | Path | Image.Image, *, min_size: int = DEFAULT_MIN_SIZE,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes (or a file) to an upright RGB image, or raise BadSample.

    The pixel count is read from the header and checked before any pixel is decoded. An already decoded
    PIL image (in-memory datasets) goes through the same checks.

    Args:
        data: encoded bytes, a path or a PIL image.
        min_size: reject images whose shorter side is below this (reason "too_small"). Default 16 px.
        max_pixels: reject images with more pixels (reason "too_large"). Default 16384^2.
    """
    if isinstance(data, Image.Image):
        if data.size[0] * data.size[1] > max_pixels:
            raise BadSample("too_large", f"{data.size[0]}x{data.size[1]} > {max_pixels} pixels")
        return _upright_rgb(data, min_size)
    try:
        fp = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else open(data, "rb")
    except OSError as e:
        raise BadSample("unreadable", str(e)) from None
    with fp:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(fp)
                w, h = image.size
                if w * h > max_pixels:
                    raise BadSample("too_large", f"{w}x{h} > {max_pixels} pixels")
                image.load()                     # full decode: catches truncated data
        except BadSample:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadSample("too_large", str(e)) from None
        except Exception as e:                   # PIL raises many types for broken files
            raise BadSample("undecodable", f"{type(e).__name__}: {e}") from None
    return _upright_rgb(image, min_size)


def _upright_rgb(image: Image.Image, min_size: int) -> Image.Image:
    if image.getexif().get(0x0112, 1) != 1:        # an EXIF orientation: turn it upright (otherwise no copy)
        image = ImageOps.exif_transpose(image)
    if min(image.size) < max(1, min_size):
        raise BadSample("too_small", f"{image.size[0]}x{image.size[1]} < {min_size}")
    return to_rgb(image)


def pick_caption(value, *, seed: int = 0, epoch: int = 0, key: str = "") -> str:
    """A caption from str, bytes, a list of captions (one drawn per epoch) or JSON with caption/text.

    Raises BadSample("missing_caption") for None and BadSample("empty_caption") for blank text.
    """
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if isinstance(value, dict):
        value = next((value[k] for k in ("caption", "text", "prompt", "TEXT") if value.get(k) is not None), None)
    if isinstance(value, (list, tuple)):
        options = [v for v in value if isinstance(v, str) and v.strip()]
        if not options:
            raise BadSample("empty_caption" if value else "missing_caption")
        value = rng_for(seed, epoch, key, "caption").choice(options)
    if value is None:
        raise BadSample("missing_caption")
    if not isinstance(value, str):
        value = str(value)
    if not value.strip():
        raise BadSample("empty_caption")
    return value.strip()


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """Batch pixels as the VAE takes them: uint8 [0, 255] -> float32 [-1, 1] (a float tensor is taken to be in
    [-1, 1] already), in planar memory whatever the layout the collate stacked (channels-last). Bitwise what the
    transform computed in the workers before it passed uint8."""
    if pixels.dtype != torch.uint8:
        return pixels
    return pixels.to(torch.float32, memory_format=torch.contiguous_format) / 127.5 - 1.0


class ImageTransform:
    """RGB PIL image -> [3, H, W] uint8 tensor (resize short side, crop, optional flip); `to_model_range` makes
    the [-1, 1] floats on the device.

    Args:
        resolution: output size (square).
        interpolation: "bicubic" (default), "lanczos" or "bilinear".
        center_crop: centre crop (default) or a random crop.
        random_flip: flip horizontally with probability 0.5. Default False.
        seed: seed of the random crop/flip (with epoch and key). Default 0.
    """

    def __init__(self, resolution: int, interpolation: str = "bicubic", center_crop: bool = True,
                 random_flip: bool = False, seed: int = 0):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation={interpolation!r}: expected one of {sorted(INTERPOLATIONS)}")
        self.resolution, self.interpolation = resolution, INTERPOLATIONS[interpolation]
        self.center_crop, self.random_flip, self.seed = center_crop, random_flip, seed

    def __call__(self, image: Image.Image, key: str = "", epoch: int = 0) -> torch.Tensor:
        return self.apply(image, key, epoch)[0]

    def apply(self, image: Image.Image, key: str = "", epoch: int = 0) -> tuple[torch.Tensor, tuple, tuple]:
        """(pixels [3, r, r], original (height, width), crop (top, left) in the resized image, after the flip):
        SDXL conditions on the last two (its time ids)."""
        r = self.resolution
        w, h = image.size
        original = (h, w)
        s = r / min(w, h)
        size = (max(r, round(w * s)), max(r, round(h * s)))
        if size != (w, h):
            image = image.resize(size, self.interpolation)
        w, h = image.size
        if self.center_crop:
            left, top = (w - r) // 2, (h - r) // 2
        else:
            rng = rng_for(self.seed, epoch, key, "crop")
            left, top = rng.randint(0, w - r), rng.randint(0, h - r)
        if (w, h) != (r, r):                        # crop() copies even when the box is the whole image
            image = image.crop((left, top, left + r, top + r))
        if self.random_flip and rng_for(self.seed, epoch, key, "flip").random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            left = w - left - r                       # the crop's left edge in the flipped image
        # uint8 through the dataloader workers (a quarter of the float bytes, no float work there); the model's
        # range is made on the device (to_model_range). A [3, H, W] view of the HWC pixels: the collate's stack
        # (stack_pixels) makes the one copy into the batch
        with warnings.catch_warnings():            # PIL's array is read-only; nothing writes to the view
            warnings.simplefilter("ignore", UserWarning)
            pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8)).permute(2, 0, 1)
        return pixels, original, (top, left)
