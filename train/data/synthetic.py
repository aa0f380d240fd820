"""A small captioned image set the project draws itself: the data of the embedded default.

Each item is a coloured shape on a background, deterministic from (seed, item index); its caption
names the shape, colour, position and background. `num_duplicated` items appear `repeats` times
each (meta["dup_group"] = item index), the others once (dup_group = -1), so experiments have
duplication ground truth without any download.
"""
from __future__ import annotations

import random

from PIL import Image, ImageDraw
from torch.utils.data import Dataset

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (240, 240, 240), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7), "center": (0.5, 0.5)}


def draw_item(index: int, resolution: int, seed: int = 0) -> tuple[Image.Image, str, dict]:
    """Image, caption and attributes of item `index` (pure function of its arguments)."""
    rng = random.Random(seed * 1_000_003 + index)
    shape = rng.choice(SHAPES)
    colour, background = rng.sample(sorted(COLOURS), 2)
    position = rng.choice(sorted(POSITIONS))
    img = Image.new("RGB", (resolution, resolution), COLOURS[background])
    d = ImageDraw.Draw(img)
    for _ in range(3):  # a few faint marks no caption names: item-specific detail
        x, y = rng.randrange(resolution), rng.randrange(resolution)
        d.point((x, y), fill=tuple(min(255, c + 60) for c in COLOURS[background]))
    cx, cy = (int(p * resolution) for p in POSITIONS[position])
    r = max(2, int(resolution * rng.uniform(0.15, 0.25)))
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    caption = f"a {colour} {shape} on the {position}, {background} background"
    return img, caption, {"shape": shape, "colour": colour, "position": position, "background": background}


class SyntheticShapes(Dataset):
    """Map-style dataset of drawn items with injected duplication.

    Args:
        num_unique: items that appear once. Default 64.
        num_duplicated: items that appear `repeats` times. Default 0.
        repeats: appearances of each duplicated item. Default 1.
        resolution: image size in pixels. Default 32.
        seed: drawing seed. Default 0.
    """

    def __init__(self, num_unique: int = 64, num_duplicated: int = 0, repeats: int = 1, resolution: int = 32,
                 seed: int = 0):
        self.resolution, self.seed = resolution, seed
        # (item index, copy index); duplicated items are indices [0, num_duplicated)
        self.index = [(i, r) for i in range(num_duplicated) for r in range(repeats)]
        self.index += [(num_duplicated + i, 0) for i in range(num_unique)]
        self.num_duplicated = num_duplicated

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        item, copy = self.index[i]
        image, caption, attrs = draw_item(item, self.resolution, self.seed)
        dup = item < self.num_duplicated
        return {"key": f"synth-{item:06d}-{copy:03d}", "image": image, "caption": caption,
                "meta": {"dup_group": item if dup else -1, "source": "synthetic", **attrs}}
