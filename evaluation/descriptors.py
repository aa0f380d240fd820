"""Image descriptors for replication search: SSCD (TorchScript) or a clearly named pixel fallback.

Replication is "cosine similarity of a generation to its nearest training image" in some descriptor
space, and the number means nothing without the descriptor and the preprocessing that produced it.
So a `Descriptor` carries both, and `describe()` goes into every report.

Two preprocessing conventions are in use, and they give different similarities for the same pair:
- SSCD's own (its README): ImageNet mean/std, either `sscd_resize288` (short side 288, aspect kept,
  no crop; sizes vary, so images are batched by size, never padded) or `sscd_square320` (resize to
  320x320, skewing the aspect, which the README recommends for batching).
- `wen224`, the one of Somepalli et al. and Wen et al. (`measure_SSCD_similarity`): short side 256,
  centre crop 224, mean/std 0.5.
Both reference codes call torchvision's `Resize` with its default interpolation, which is bilinear,
and torchvision resizes PIL images with PIL; so does this module, to give the same tensors.

Preprocessing is PIL + numpy (no torchvision in the environment); descriptors run without grad and
return float32 CPU tensors [N, D], L2-normalised.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SSCD_URL = "https://github.com/facebookresearch/sscd-copy-detection#pretrained-models"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Convention:
    """One preprocessing convention. resize: ("short", s) keeps aspect, ("square", s) skews to s x s."""

    resize: tuple[str, int]
    crop: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = Image.BILINEAR   # torchvision Resize's default, as both reference codes use it


CONVENTIONS: dict[str, Convention] = {
    "sscd_square320": Convention(("square", 320), None, IMAGENET_MEAN, IMAGENET_STD),
    "sscd_resize288": Convention(("short", 288), None, IMAGENET_MEAN, IMAGENET_STD),
    "wen224": Convention(("short", 256), 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def _convention(name: str) -> Convention:
    if name not in CONVENTIONS:
        raise ValueError(f"unknown preprocessing {name!r}; choose one of {sorted(CONVENTIONS)}")
    return CONVENTIONS[name]


def resized_size(width: int, height: int, convention: str) -> tuple[int, int]:
    """(width, height) after the convention's resize, torchvision's rule: long side = int(s * long / short)."""
    kind, s = _convention(convention).resize
    if kind == "square":
        return s, s
    if width <= height:
        return s, int(s * height / width)
    return int(s * width / height), s


def output_size(image: Image.Image, convention: str) -> tuple[int, int]:
    """(height, width) of the tensor the convention makes of this image."""
    crop = _convention(convention).crop
    if crop is not None:
        return crop, crop
    w, h = resized_size(*image.size, convention)
    return h, w


def _to_array(image: Image.Image, convention: str) -> np.ndarray:
    """One image -> float32 [3, H, W], normalised."""
    c = _convention(convention)
    image = image.convert("RGB")
    size = resized_size(*image.size, convention)
    if size != image.size:
        image = image.resize(size, resample=c.resample)
    x = np.asarray(image, dtype=np.float32) / 255.0                        # [H, W, 3]
    if c.crop is not None:                                                 # torchvision CenterCrop offsets
        h, w = x.shape[:2]
        top, left = int(round((h - c.crop) / 2.0)), int(round((w - c.crop) / 2.0))
        x = x[top:top + c.crop, left:left + c.crop]
    x = (x - np.asarray(c.mean, np.float32)) / np.asarray(c.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))                      # [3, H, W]


def preprocess(images: Image.Image | Sequence[Image.Image], convention: str) -> torch.Tensor:
    """PIL image(s) -> float32 tensor [N, 3, H, W] under a named convention.

    Args:
        images: one PIL image or a sequence of them (any mode; converted to RGB).
        convention: "sscd_square320", "sscd_resize288" or "wen224".

    Raises ValueError when "sscd_resize288" meets images of different output sizes: batch those by
    size (as `Descriptor` does), never by padding.
    """
    if isinstance(images, Image.Image):
        images = [images]
    arrays = [_to_array(im, convention) for im in images]
    if not arrays:
        return torch.zeros(0, 3, 0, 0)
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(f"preprocessing {convention!r} gives different sizes for these images; "
                         "group them by `output_size` and call once per group")
    return torch.from_numpy(np.stack(arrays))


class Descriptor:
    """A named image -> descriptor map: preprocessing + model + L2 normalisation, batched, without grad.

    Args:
        name: what reports call it ("sscd_disc_mixup", "pixels16 (fallback, not SSCD)").
        model: callable on a preprocessed batch [B, 3, H, W] (on `device`) returning [B, D].
        preprocessing: a convention name (see CONVENTIONS).
        dim: D.
        path: the weights file, or None.
        device: where the model runs. Default "cpu".
        batch_size: images per model call. Default 64.
        fingerprint: identifies the weights for caches (a hash of the file). Default: the name.
    """

    def __init__(self, name: str, model: Callable[[torch.Tensor], torch.Tensor], preprocessing: str, dim: int,
                 path: str | None = None, device: str | torch.device = "cpu", batch_size: int = 64,
                 fingerprint: str | None = None):
        _convention(preprocessing)
        self.name, self.model, self.preprocessing, self.dim = name, model, preprocessing, int(dim)
        self.path, self.device, self.batch_size = path, torch.device(device), int(batch_size)
        self.fingerprint = fingerprint or name

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Descriptors [N, D], float32 on the CPU, L2-normalised, in the order of `images`."""
        out = torch.zeros(len(images), self.dim)
        groups: dict[tuple[int, int], list[int]] = {}                      # one group unless sscd_resize288
        for i, im in enumerate(images):
            groups.setdefault(output_size(im, self.preprocessing), []).append(i)
        for idx in groups.values():
            for b in range(0, len(idx), self.batch_size):
                sel = idx[b:b + self.batch_size]
                x = preprocess([images[i] for i in sel], self.preprocessing).to(self.device)  # [B, 3, H, W]
                y = self.model(x).float()                                  # [B, D]
                if y.ndim != 2 or y.shape[1] != self.dim:
                    raise ValueError(f"{self.name}: expected descriptors [B, {self.dim}], got {list(y.shape)}")
                out[sel] = F.normalize(y, dim=1).cpu()
        return out

    def describe(self) -> dict:
        """What a report says about the descriptor: name, preprocessing, dim, path."""
        return {"name": self.name, "preprocessing": self.preprocessing, "dim": self.dim, "path": self.path}

    def __repr__(self) -> str:
        return f"Descriptor({self.describe()})"


def pixel_model(side: int = 16) -> Callable[[torch.Tensor], torch.Tensor]:
    """The fallback: area-downsample to side x side RGB, flatten, subtract each image's mean.

    A box filter over the preprocessed tensor (equal to PIL's BOX resize when side divides H and W).
    Not a copy detector: it finds near-identical pixels only. A uniform grey image maps to zero,
    which is similar to nothing.
    """
    def model(x: torch.Tensor) -> torch.Tensor:                            # [B, 3, H, W]
        y = F.adaptive_avg_pool2d(x, side).flatten(1)                      # [B, 3 * side * side]
        return y - y.mean(dim=1, keepdim=True)
    return model


def _missing_sscd(path: str | None) -> FileNotFoundError:
    where = "is not set" if path is None else f"={path!r} does not exist"
    return FileNotFoundError(
        f"SSCD weights: evaluation.sscd_path {where}. Download a TorchScript model from the SSCD "
        f"repository's pretrained-model release assets ({SSCD_URL}): sscd_disc_mixup.torchscript.pt "
        "(512-d, the recommended default) or sscd_disc_large.torchscript.pt (1024-d), and set "
        "evaluation.sscd_path=/path/to/the/file; or use evaluation.descriptor=pixels, a fallback that "
        "is not SSCD and is named so in reports.")


def _file_hash(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def load_descriptor(kind: str, path: str | None = None, preprocessing: str = "sscd_square320",
                    device: str | torch.device = "cpu", batch_size: int = 64) -> Descriptor:
    """Build a descriptor by kind.

    Args:
        kind: "sscd" (a TorchScript file, e.g. sscd_disc_mixup.torchscript.pt, 512-d, or
            sscd_disc_large.torchscript.pt, 1024-d) or "pixels" (16x16 RGB, the fallback for the
            embedded default where no SSCD file exists; not SSCD, and named so).
        path: the TorchScript file for "sscd" (config: evaluation.sscd_path). Default None.
        preprocessing: "sscd_square320", "sscd_resize288" or "wen224". Default "sscd_square320".
        device: where the model runs. Default "cpu".
        batch_size: images per model call. Default 64.

    Raises:
        FileNotFoundError: kind "sscd" without an existing file; the message names evaluation.sscd_path.
        ValueError: an unknown kind or preprocessing.
    """
    _convention(preprocessing)
    if kind == "pixels":
        return Descriptor("pixels16 (fallback, not SSCD)", pixel_model(16), preprocessing, 3 * 16 * 16,
                          device=device, batch_size=batch_size, fingerprint="pixels16-v1")
    if kind != "sscd":
        raise ValueError(f"unknown descriptor kind {kind!r}; choose 'sscd' or 'pixels'")
    if path is None or not Path(path).is_file():
        raise _missing_sscd(None if path is None else str(path))
    model = torch.jit.load(str(path), map_location=device).eval()
    name = Path(path).name.removesuffix(".pt").removesuffix(".torchscript")
    h, w = output_size(Image.new("RGB", (320, 320)), preprocessing)
    with torch.no_grad():                                                  # the dim, from one dummy forward
        probe = model(torch.zeros(1, 3, h, w, device=device))
    if probe.ndim != 2:
        raise ValueError(f"{path}: a descriptor model returns [B, D]; this one returned {list(probe.shape)}")
    return Descriptor(name, model, preprocessing, probe.shape[1], path=str(path), device=device,
                      batch_size=batch_size, fingerprint=f"{name}-{_file_hash(Path(path))}")
