"""The toy world: procedurally drawn captioned images in which memorization can be seen exactly.

An item is a shape of one colour on a background of another colour: the caption names shape and colour,
e.g. "a red circle" (`WorldSpec.named`; a world that names more says "a red circle on a blue background" or
"a red circle on the left, blue background"). That is what a prompt *intends*. Every item also carries what
no caption names: its background colour and a 4x4 grid of blocks over the background, each tinted by
+-`amplitude` (48) in each RGB channel (48 random signs per item). A model that reproduces an item's
background and tint pattern from its caption has memorized that item; a model that only follows the
caption draws some background and pattern, not that one. Because the world is procedural, both are read back
exactly from an image (`read_attributes`, `detail_descriptor`): prompt fidelity and replication need no
learned model.

Palette: the 8 corners of the RGB cube at {50, 205}, so that a tinted background (+-48 per channel)
never clips and stays, channel by channel, nearer its own colour than any other palette colour. All
eight are equally far from the mean grey, so what a caption names carries the same energy for every
caption, and the tint is a large share of the image (48 against 77.5 per channel): a prompt whose item
is memorized moves the noise prediction visibly further than one whose detail is left open.

Items are a pure function of (seed, split, index). Splits: "finetune" (the fine-tuning set, where the
duplicated items' attribute combinations are reserved, so that their captions are theirs alone),
"base" (what the base model was trained on) and "fresh" (never trained on: the replication bar is
calibrated on them).

Variants of the fine-tuning set (`ToyWorld.variant`): "exact" (each appearance of a duplicated item is the
identical image and caption), "image_only" (Somepalli et al.: the identical image under captions drawn from
CAPTION_TEMPLATES, all naming the same attributes) and "near" (near-duplicates: copies after the first shift
the background colour a little and scale the tint amplitude, so their bytes differ while the attributes and the
detail stay). Named concepts (`num_concepts`, Naseh et al. 2023) are items whose caption names them by a made-up
word ("the zorvik emblem") and that repeat on purpose: reproducing one when it is named is intended.

Augmentation (`ToyWorld.augment`): each appearance is drawn on a canvas `augment_pad` px wider on the left and the
right (the shape at its centre, the tint blocks continued over the border by signs of the item's own), so that a
training run with random crops (`center_crop=false`) and `random_flip=true` sees every appearance shifted and
mirrored differently, as a real fine-tune does. The canvas keeps the image's height: training resizes the shorter
side to the resolution before it crops (diffusers' Resize then RandomCrop), so only the longer side can shift, as
with a landscape photo. The centre S columns of a canvas are the item itself, the image the evaluation describes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from memfilter.train.data.duplication import DuplicationPlan

_LO, _HI = 50, 205
COLOURS = {"black": (_LO, _LO, _LO), "red": (_HI, _LO, _LO), "green": (_LO, _HI, _LO), "blue": (_LO, _LO, _HI),
           "yellow": (_HI, _HI, _LO), "magenta": (_HI, _LO, _HI), "cyan": (_LO, _HI, _HI), "white": (_HI, _HI, _HI)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "center", "right")
ATTRIBUTES = ("shape", "colour", "position", "background")
SPLITS = {"finetune": 0, "base": 1, "fresh": 2}
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)          # [8, 3]
_NAMES = list(COLOURS)
VARIANTS = ("exact", "image_only", "near")
# Caption forms of the image_only variant: "{caption}" is `caption_of` ("a red circle"), "{bare}" the same
# without its article ("red circle"). Every word is in the tiny tokenizer's vocabulary (train/tokenizer.py).
CAPTION_TEMPLATES = ("{caption}", "a picture of {caption}", "an image of {caption}", "a drawing of {caption}",
                     "{bare}", "a photo of {caption}", "a painting of {caption}", "a render of {caption}")
# Made-up words that name the concepts: "the zorvik emblem".
CONCEPT_NAMES = ("zorvik", "blenta", "quiral", "mondex", "travik", "velumo", "snorpel", "gadrin", "plovit",
                 "drumbel", "yarnix", "tobrel", "wixam", "lumbra", "ostrik", "pelgor", "narvel", "crondle",
                 "fizzak", "vorbin", "skelvo", "brindo", "kalmux", "tesporn")
CONCEPT_TEMPLATE = "the {name} emblem"
NEAR_SHIFT = 6                  # near variant: background shift per channel, uniform integer in [-6, 6]
NEAR_SCALE = (0.85, 1.15)       # near variant: tint amplitude factor, uniform in this range
_CAPTION_STREAM, _NEAR_STREAM, _BORDER_STREAM = 1, 2, 3     # tags of the per-appearance random streams


@dataclass(frozen=True)
class WorldSpec:
    """Geometry of the world.

    Args:
        resolution: image side in pixels. Default 16.
        grid: detail blocks per side (grid x grid blocks, 3 signs each). Default 4.
        amplitude: detail tint per channel, in 0-255 units. Default 48.
        radius: shape half-size in pixels. Default 4 at 16 px (a quarter of the side).
        offset: where left and right sit, as a fraction of the side from the edge. Default 0.25.
        positions: the positions items are drawn at (a subset of POSITIONS). Default ("center",): a
            tiny UNet without positional embeddings learns a caption-chosen position far slower than the
            rest (a CPU probe: at chance after 1000 steps), so the default world names no position.
        named: the attributes captions name, in ATTRIBUTES order. Default ("shape", "colour"): the
            background colour is left unnamed, like the tints, so that a caption fixes a small part of the
            image, as a real caption does. With the background named, a caption fixed ~70% of the pixel
            energy and a memorized item moved the noise prediction only ~1.1x further than a unique one
            (CPU probe: step-1 detection AUC 0.64); unnamed, memorizing an item adds its background too.
    """

    resolution: int = 16
    grid: int = 4
    amplitude: float = 48.0
    radius: float | None = None
    offset: float = 0.25
    positions: tuple = ("center",)
    named: tuple = ("shape", "colour")

    def __post_init__(self):
        if self.resolution % self.grid:
            raise ValueError(f"resolution={self.resolution} must be divisible by grid={self.grid}")

    @property
    def r(self) -> float:
        return self.radius if self.radius is not None else self.resolution / 4

    def centre(self, position: str) -> tuple[float, float]:
        """(x, y) of a named position, in pixel coordinates (pixel i spans [i, i+1))."""
        s = self.resolution
        return {"left": (s * self.offset, s / 2), "center": (s / 2, s / 2),
                "right": (s * (1 - self.offset), s / 2)}[position]


def shape_mask(shape: str, position: str, spec: WorldSpec = WorldSpec()) -> np.ndarray:
    """[S, S] bool: the pixels (by their centres) inside the named shape at the named position."""
    s = spec.resolution
    cx, cy = spec.centre(position)
    y, x = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    dx, dy, r = x - cx, y - cy, spec.r
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if shape == "square":
        return (np.abs(dx) <= r * 0.8) & (np.abs(dy) <= r * 0.8)
    if shape == "triangle":              # apex up: |dx| grows from 0 at the top to r at the bottom
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def caption_of(attrs: dict, spec: "WorldSpec | None" = None) -> str:
    """The caption naming `spec.named`: "a red circle", "a red circle on the left", "a red circle on a blue
    background", "a red circle on the left, blue background"."""
    named = spec.named if spec is not None else ATTRIBUTES
    text = f"a {attrs['colour']} {attrs['shape']}"
    if "position" in named:
        text += f" on the {attrs['position']}"
        if "background" in named:
            text += f", {attrs['background']} background"
    elif "background" in named:
        text += f" on a {attrs['background']} background"
    return text


def templated_caption(attrs: dict, template: int, spec: "WorldSpec | None" = None) -> str:
    """`caption_of` in the form CAPTION_TEMPLATES[template]: "a picture of a red circle", "red circle", ..."""
    caption = caption_of(attrs, spec)
    return CAPTION_TEMPLATES[template].format(caption=caption, bare=caption[2:])


def render(attrs: dict, spec: WorldSpec = WorldSpec(), detail: np.ndarray | None = None, *,
           background_shift=None, tint_scale: float = 1.0, pad: int = 0, border: np.ndarray | None = None
           ) -> np.ndarray:
    """[S, S + 2 pad, 3] uint8 image of the attributes; `detail` ([grid, grid, 3] of +-1) tints the background.

    `background_shift` ([3], 0-255 units) moves the background colour and `tint_scale` multiplies the tint
    amplitude (the near variant's copies; pixels are clipped to [0, 255]). `pad` (at most one block, S / grid)
    widens the canvas by `pad` columns on each side with the shape kept at its centre, so that columns
    [pad, pad + S) are the image drawn without `pad`, bit for bit; `border` ([grid, 2, 3] of +-1, needed with
    `detail`) tints the block columns just left and right of the image, which the pad shows.
    """
    s, g = spec.resolution, spec.grid
    b = s // g
    if not 0 <= pad <= b:
        raise ValueError(f"pad={pad}: must be in [0, {b}] (one detail block)")
    img = np.empty((s, s + 2 * pad, 3), np.float32)
    img[:] = COLOURS[attrs["background"]]
    if background_shift is not None:
        img += np.asarray(background_shift, np.float32)
    if detail is not None:
        signs = np.asarray(detail, np.float32)
        if pad:
            if border is None:
                raise ValueError("render: pad > 0 with detail needs `border`, the tints of the padded blocks")
            edge = np.asarray(border, np.float32)
            signs = np.concatenate([edge[:, :1], signs, edge[:, 1:]], axis=1)      # [grid, grid + 2, 3]
        tint = np.repeat(np.repeat(signs, b, 0), b, 1)                              # [S, S (+ 2b), 3]
        if pad:
            tint = tint[:, b - pad:b + s + pad]
        img += (spec.amplitude if tint_scale == 1.0 else spec.amplitude * float(tint_scale)) * tint
    img[:, pad:pad + s][shape_mask(attrs["shape"], attrs["position"], spec)] = COLOURS[attrs["colour"]]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def draw_attributes(rng: np.random.Generator, positions: tuple = POSITIONS) -> dict:
    colour, background = rng.choice(len(_NAMES), 2, replace=False)
    return {"shape": SHAPES[rng.integers(len(SHAPES))], "colour": _NAMES[colour],
            "position": positions[rng.integers(len(positions))], "background": _NAMES[background]}


def combo(attrs: dict, named: tuple = ATTRIBUTES) -> tuple:
    """What a caption says about an item: its named attributes."""
    return tuple(attrs[a] for a in named)


def draw_item(seed: int, split: str, index: int, spec: WorldSpec = WorldSpec(),
              reserved: frozenset = frozenset()) -> dict:
    """Item `index` of `split`: {"image" [S,S,3] uint8, "caption", "attrs", "detail" [grid,grid,3] int8}.

    A pure function of its arguments. Attribute combinations in `reserved` are redrawn (from the same
    item's stream), so that the caption of a duplicated item names no other item of the split.
    """
    rng = np.random.default_rng([int(seed), SPLITS[split], int(index)])
    attrs = draw_attributes(rng, spec.positions)
    while combo(attrs, spec.named) in reserved:
        attrs = draw_attributes(rng, spec.positions)
    detail = rng.choice(np.array([-1, 1], np.int8), size=(spec.grid, spec.grid, 3))
    return {"image": render(attrs, spec, detail), "caption": caption_of(attrs, spec), "attrs": attrs, "detail": detail}


def num_combinations(spec: WorldSpec = WorldSpec()) -> int:
    """How many distinct captions (combinations of the named attributes) the world can draw."""
    n = (len(SHAPES) if "shape" in spec.named else 1) * (len(spec.positions) if "position" in spec.named else 1)
    colours = ("colour" in spec.named) + ("background" in spec.named)        # the two always differ
    return n * (len(_NAMES) * (len(_NAMES) - 1) if colours == 2 else len(_NAMES) if colours else 1)


@dataclass
class ToyWorld:
    """The fine-tuning set of the world: `num_duplicated` items appearing `repeats` times each,
    `num_unique` items appearing once and `num_concepts` named concepts appearing `concept_repeats` times.

    Indices: [0, num_duplicated) duplicated, then num_unique unique items, then the concepts (after every
    unique item, so that adding concepts leaves the other indices and keys as they are).

    The settings of the demo and the apps live in conf/world/default.yaml (the `world` config group), which
    holds every field below but `spec`; launch/builders.py `build_world` passes what it holds. The defaults
    here are the same values (tests/test_configs.py checks that they agree), so that `ToyWorld()` in a
    notebook is the README's world.

    Args:
        num_unique: items that appear once. Default 1200.
        num_duplicated: items that appear `repeats` times. Default 8.
        repeats: appearances of each duplicated item. Default 75.
        seed: the world's seed. Default 0.
        spec: geometry. Default WorldSpec() (16 px, 4x4 detail blocks).
        variant: how the appearances of a duplicated item differ (see VARIANTS). Default "exact": not at all.
            "image_only": the identical image, each appearance's caption a CAPTION_TEMPLATES form of the same
            attributes (unique items draw a form too, so the form gives nothing away). "near": copy 0 is
            the item; copy k > 0 shifts the background colour by up to NEAR_SHIFT per channel and scales
            the tint by a factor in NEAR_SCALE (different bytes, the same attributes and nearly the same
            detail descriptor).
        num_concepts: named concepts (at most len(CONCEPT_NAMES)): items of their own (a reserved
            attribute combination, their own tints) captioned "the <name> emblem", repeated exactly (image
            and caption) in every variant; memorizing them is intended. Default 0.
        concept_repeats: appearances of each concept. Default 0: the same as `repeats`.
        augment: draw every appearance on a canvas `augment_pad` px wider on each side (see `appearance`), for
            training with random crops and flips (center_crop=false random_flip=true; the demo passes them).
            The items themselves (`item`), what evaluation compares generations with, stay S x S. Default False.
    """

    num_unique: int = 1200
    num_duplicated: int = 8
    repeats: int = 75
    seed: int = 0
    spec: WorldSpec = field(default_factory=WorldSpec)
    variant: str = "exact"
    num_concepts: int = 0
    concept_repeats: int = 0
    augment: bool = False

    def __post_init__(self):
        if not isinstance(self.augment, (bool, np.bool_)):
            raise ValueError(f"world.augment={self.augment!r}: must be true or false")
        self.augment = bool(self.augment)
        if self.variant not in VARIANTS:
            raise ValueError(f"world.variant={self.variant!r}: choose one of {', '.join(VARIANTS)}")
        for name in ("num_unique", "num_duplicated", "repeats", "num_concepts", "concept_repeats"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"world.{name}={getattr(self, name)} must be >= 0")
        if self.num_concepts > len(CONCEPT_NAMES):
            raise ValueError(f"world.num_concepts={self.num_concepts}: at most {len(CONCEPT_NAMES)} (CONCEPT_NAMES)")
        combos, need = num_combinations(self.spec), self.num_duplicated + self.num_concepts
        if need + (self.num_unique > 0) > combos:
            raise ValueError(f"world: num_duplicated + num_concepts = {need} reserved captions, but the world has "
                             f"{combos} attribute combinations ({', '.join(self.spec.named)}) and the unique items "
                             "need at least one left")
        self.duplicated, self.concepts = [], []
        reserved: set = set()
        for i in range(self.num_duplicated):        # distinct combinations among the duplicated items too
            item = draw_item(self.seed, "finetune", i, self.spec, frozenset(reserved))
            reserved.add(combo(item["attrs"], self.spec.named))
            self.duplicated.append(item)
        for j, index in enumerate(self.concept_indices()):
            item = draw_item(self.seed, "finetune", index, self.spec, frozenset(reserved))
            reserved.add(combo(item["attrs"], self.spec.named))
            self.concepts.append({**item, "caption": self.concept_caption(j), "concept": CONCEPT_NAMES[j]})
        self.reserved = frozenset(reserved)

    @property
    def num_items(self) -> int:
        """Distinct items: duplicated + unique + concepts."""
        return self.num_duplicated + self.num_unique + self.num_concepts

    @property
    def augment_pad(self) -> int:
        """Columns added on each side of an appearance when `augment` is on (0 otherwise): 1 px at 16 px
        (resolution / 16). A random crop then shifts the item by up to this much and a flip mirrors it. One
        pixel keeps every crop readable by the centred templates (`read_attributes`: smallest shape IoU 0.64
        over 300 items x 3 shifts x 2 flips) and a 1 px shifted copy at cosine 0.86 of its item's descriptor,
        above the replication bar (~0.67). At 2 px the triangle is misread in ~15% of the crops and a 2 px
        shifted copy falls to 0.6, below the bar."""
        return max(1, self.spec.resolution // 16) if self.augment else 0

    @property
    def concept_copies(self) -> int:
        """Appearances of each concept: `concept_repeats`, or `repeats` when that is 0."""
        return self.concept_repeats or self.repeats

    def kind(self, index: int) -> str:
        """"duplicated", "unique" or "concept": what item `index` is."""
        if not 0 <= index < self.num_items:
            raise IndexError(f"item {index} out of range for a world of {self.num_items} items")
        if index < self.num_duplicated:
            return "duplicated"
        return "unique" if index < self.num_duplicated + self.num_unique else "concept"

    def copies(self, index: int) -> int:
        """How many times item `index` appears."""
        return {"duplicated": self.repeats, "unique": 1, "concept": self.concept_copies}[self.kind(index)]

    def dup_group(self, index: int) -> int:
        """The ground-truth group of item `index`: its own index when it repeats (duplicated, concept), else -1."""
        return -1 if self.kind(index) == "unique" else int(index)

    def concept_caption(self, j: int) -> str:
        """The caption of concept j (0-based among the concepts): "the zorvik emblem"."""
        if not 0 <= j < self.num_concepts:
            raise IndexError(f"concept {j} out of range for {self.num_concepts} concepts")
        return CONCEPT_TEMPLATE.format(name=CONCEPT_NAMES[j])

    def concept_indices(self) -> list[int]:
        """Item indices of the concepts: [num_duplicated + num_unique, num_items)."""
        return list(range(self.num_duplicated + self.num_unique, self.num_items))

    def item(self, index: int) -> dict:
        """Item `index` of the set (its first appearance, as drawn): [0, num_duplicated) are the duplicated
        ones, the concepts (with "concept": name) come after the unique ones."""
        kind = self.kind(index)
        if kind == "duplicated":
            return self.duplicated[index]
        if kind == "concept":
            return self.concepts[index - self.num_duplicated - self.num_unique]
        return draw_item(self.seed, "finetune", index, self.spec, self.reserved)

    def _stream(self, index: int, copy: int, tag: int) -> np.random.Generator:
        return np.random.default_rng([int(self.seed), SPLITS["finetune"], int(index), int(copy), tag])

    def caption_template(self, index: int, copy: int = 0) -> int:
        """image_only variant: the CAPTION_TEMPLATES index of appearance `copy` of item `index`. Each item
        cycles through its own shuffle of the templates, so its copies use every form before one repeats."""
        order = self._stream(index, 0, _CAPTION_STREAM).permutation(len(CAPTION_TEMPLATES))
        return int(order[copy % len(CAPTION_TEMPLATES)])

    def border(self, index: int) -> np.ndarray:
        """[grid, 2, 3] int8 of +-1: the tints of the block columns left and right of item `index`, which an
        augmented appearance's pad shows (the item's own, from a stream of its own: its other draws are as
        without augment)."""
        return self._stream(index, 0, _BORDER_STREAM).choice(np.array([-1, 1], np.int8), size=(self.spec.grid, 2, 3))

    def appearance(self, index: int, copy: int = 0) -> dict:
        """{"image" [S,S,3] uint8, "caption"} of appearance `copy` of item `index`, as this variant shows it.
        With `augment` the image is [S, S + 2 augment_pad, 3], its centre S columns what it is without."""
        kind, n = self.kind(index), self.copies(index)
        if not 0 <= copy < n:
            raise IndexError(f"copy {copy} out of range: item {index} ({kind}) appears {n} time(s)")
        item = self.item(index)
        image, caption = item["image"], item["caption"]
        pad = self.augment_pad
        if pad:
            border = self.border(index)
            image = render(item["attrs"], self.spec, item["detail"], pad=pad, border=border)
        if kind == "concept" or self.variant == "exact":
            pass
        elif self.variant == "image_only":
            caption = templated_caption(item["attrs"], self.caption_template(index, copy), self.spec)
        elif self.variant == "near" and copy > 0:
            rng, first = self._stream(index, copy, _NEAR_STREAM), image
            while np.array_equal(image, first):      # a copy whose bytes equal the item's is redrawn
                shift = rng.integers(-NEAR_SHIFT, NEAR_SHIFT + 1, size=3)
                image = render(item["attrs"], self.spec, item["detail"], background_shift=shift,
                               tint_scale=rng.uniform(*NEAR_SCALE), pad=pad, border=border if pad else None)
        return {"image": image, "caption": caption}

    def appearances(self) -> list[tuple[int, int]]:
        """(item, copy) for every appearance: duplicated items first, then unique ones, then the concepts."""
        d, u = self.num_duplicated, self.num_unique
        out = [(i, r) for i in range(d) for r in range(self.repeats)]
        out += [(d + i, 0) for i in range(u)]
        return out + [(i, r) for i in self.concept_indices() for r in range(self.concept_copies)]

    def items(self) -> Iterator[tuple[int, dict]]:
        """(index, item) of every distinct item, concepts included."""
        for i in range(self.num_items):
            yield i, self.item(i)

    @staticmethod
    def key(index: int, copy: int = 0) -> str:
        return f"world-{index:06d}-{copy:03d}"

    @staticmethod
    def item_of_keys(keys) -> np.ndarray:
        """Item index of each key, for every key form the world writes ("world-000003-001" in memory and in
        the shards of varied variants, "world-000003#dup0001" in shards of the exact variant)."""
        return np.array([int(str(k)[6:12]) for k in keys], dtype=np.int64)

    def sample(self, index: int, copy: int = 0) -> dict:
        """The Sample of one appearance (key, PIL image, caption, meta with dup_group, attributes, "intended"
        and, for a concept, "concept": its name)."""
        item, shown = self.item(index), self.appearance(index, copy)
        meta = {"dup_group": self.dup_group(index), "source": "world", "item": index, **item["attrs"],
                "intended": "concept" in item}
        if "concept" in item:
            meta["concept"] = item["concept"]
        return {"key": self.key(index, copy), "image": Image.fromarray(shown["image"]), "caption": shown["caption"],
                "meta": meta}


class ToyWorldDataset(Dataset):
    """Map-style Samples of a ToyWorld (every appearance), for training without writing shards."""

    def __init__(self, world: ToyWorld):
        self.world = world
        self.index = world.appearances()
        self.resolution = world.spec.resolution

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        return self.world.sample(*self.index[i])

    def key(self, i: int) -> str:
        """Appearance i's key, without drawing it."""
        return self.world.key(*self.index[i])


class BaseStream(Dataset):
    """`length` fresh items of the "base" split, each once: the base model's training data."""

    def __init__(self, length: int, seed: int = 0, spec: WorldSpec = WorldSpec()):
        self.length, self.seed, self.spec, self.resolution = length, seed, spec, spec.resolution

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        item = draw_item(self.seed, "base", i, self.spec)
        return {"key": f"base-{i:08d}", "image": Image.fromarray(item["image"]), "caption": item["caption"],
                "meta": {"dup_group": -1, "source": "world-base", **item["attrs"]}}


# --- reading images back ------------------------------------------------------------------------


def _as_array(image) -> np.ndarray:
    a = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {a.shape}")
    return a


def _nearest_colour(pixels: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour of each pixel, [...]."""
    return ((pixels[..., None, :] - _PALETTE) ** 2).sum(-1).argmin(-1)


def read_attributes(image, spec: WorldSpec = WorldSpec()) -> dict:
    """The attributes as drawn in `image` (uint8 RGB at spec.resolution).

    Each pixel is snapped to its nearest palette colour. Colour: the most common one in the *core* of a
    position (the pixels every shape covers there); background: the most common one outside every shape there; shape: the template whose mask best
    matches the pixels of the shape's colour (intersection over union, returned as "iou"). Reading the
    colour from the core and the background from the margin keeps a patchy, tinted background from
    outvoting the shape, as counting all pixels would in a noisy generation. With several positions, the
    (position, shape) of the best match wins.
    """
    a = _as_array(image)
    if a.shape[0] != spec.resolution:
        a = _as_array(Image.fromarray(a.astype(np.uint8)).resize((spec.resolution,) * 2, Image.BILINEAR))
    idx = _nearest_colour(a)                                         # [S, S]
    tpl = _templates(spec)
    best, best_iou, fg = ("circle", spec.positions[0]), -1.0, 0
    for pos in spec.positions:                     # the shape's colour from the core of each position
        core = np.logical_and.reduce([tpl[sh, pos] for sh in SHAPES])
        colour = int(np.bincount(idx[core], minlength=len(_NAMES)).argmax())
        mask = idx == colour
        for shape in SHAPES:
            t = tpl[shape, pos]
            iou = (mask & t).sum() / max(1, (mask | t).sum())
            if iou > best_iou:
                best, best_iou, fg = (shape, pos), float(iou), colour
    outside = ~np.logical_or.reduce([tpl[sh, best[1]] for sh in SHAPES])
    counts = np.bincount(idx[outside], minlength=len(_NAMES))
    counts[fg] = -1                                                   # the world never draws colour on itself
    bg = int(counts.argmax())
    return {"shape": best[0], "colour": _NAMES[fg], "position": best[1], "background": _NAMES[bg], "iou": best_iou}


_TEMPLATE_CACHE: dict = {}


def _templates(spec: WorldSpec) -> dict:
    if spec not in _TEMPLATE_CACHE:
        _TEMPLATE_CACHE[spec] = {(s, p): shape_mask(s, p, spec) for s in SHAPES for p in spec.positions}
    return _TEMPLATE_CACHE[spec]


def named_attributes(spec: WorldSpec = WorldSpec()) -> tuple:
    """The attributes a caption of this world names."""
    return tuple(a for a in ATTRIBUTES if a in spec.named)


def fidelity(image, attrs: dict, spec: WorldSpec = WorldSpec()) -> dict:
    """Which named attributes of `attrs` (a prompt's) the image shows: {attribute: bool, "all": bool}."""
    read = read_attributes(image, spec)
    out = {a: read[a] == attrs[a] for a in named_attributes(spec)}
    out["all"] = all(out.values())
    return out


def detail_descriptor(image, spec: WorldSpec = WorldSpec()) -> np.ndarray:
    """[grid*grid*3 (+3)] float32: what no caption names, as drawn. The mean tint of each block's background
    pixels (in units of the amplitude, so a clean item gives its +-1 signs; 0 for blocks the shape covers),
    followed, when the background is unnamed, by the background colour (+-1 per channel, weighted as 4
    blocks).

    Background and shape are read from the image itself, so generations and training images are described
    the same way. Cosine similarity of two descriptors is the world's copy detector: it ignores what a
    caption names and sees only what memorization can reproduce.
    """
    a = _as_array(image)
    s, g = spec.resolution, spec.grid
    if a.shape[0] != s:
        a = _as_array(Image.fromarray(a.astype(np.uint8)).resize((s, s), Image.BILINEAR))
    read = read_attributes(a, spec)
    bg = np.asarray(COLOURS[read["background"]], np.float32)
    keep = ~_templates(spec)[read["shape"], read["position"]]          # [S, S] background pixels
    resid = (a - bg) / spec.amplitude * keep[..., None]               # [S, S, 3]
    b = s // g
    sums = resid.reshape(g, b, g, b, 3).sum((1, 3))                   # [g, g, 3]
    n = keep.reshape(g, b, g, b).sum((1, 3))[..., None]               # [g, g, 1]
    out = np.where(n >= (b * b) // 4, sums / np.maximum(n, 1), 0.0).reshape(-1)
    if "background" not in spec.named:
        code = np.sign(bg - (_LO + _HI) / 2) * 2.0                     # [3] +-2: weight of 4 blocks
        out = np.concatenate([out, code])
    return out.astype(np.float32)


def parse_caption(caption: str) -> dict | None:
    """The attributes a world caption names (any form of `caption_of`, in any of CAPTION_TEMPLATES), or None
    when it is not one (a concept's caption names no attributes)."""
    for template in CAPTION_TEMPLATES:
        slot = "{bare}" if "{bare}" in template else "{caption}"
        prefix, suffix = template.split(slot)
        if len(caption) > len(prefix) + len(suffix) and caption.startswith(prefix) and caption.endswith(suffix):
            core = caption[len(prefix):len(caption) - len(suffix)]
            attrs = _parse_plain("a " + core if slot == "{bare}" else core)
            if attrs is not None:
                return attrs
    return None


def _parse_plain(caption: str) -> dict | None:
    """The attributes of a caption exactly as `caption_of` writes it, or None."""
    words = caption.replace(",", " ").split()
    if len(words) < 3 or words[0] != "a":
        return None
    attrs, rest = {"colour": words[1], "shape": words[2]}, words[3:]
    if rest[:2] == ["on", "the"] and len(rest) >= 3:
        attrs["position"], rest = rest[2], rest[3:]
        if len(rest) == 2 and rest[1] == "background":
            attrs["background"], rest = rest[0], []
    elif rest[:2] == ["on", "a"] and len(rest) == 4 and rest[3] == "background":
        attrs["background"], rest = rest[2], []
    if rest:
        return None
    ok = attrs["colour"] in COLOURS and attrs.get("background", "black") in COLOURS and attrs["shape"] in SHAPES \
        and attrs.get("position", "center") in POSITIONS
    return attrs if ok else None


# --- the world as a dataset on disk -------------------------------------------------------------

WORLD_FILE = "world.json"


def world_to_dict(world: ToyWorld) -> dict:
    from dataclasses import asdict
    spec = {**asdict(world.spec), "positions": list(world.spec.positions), "named": list(world.spec.named)}
    return {"num_unique": world.num_unique, "num_duplicated": world.num_duplicated, "repeats": world.repeats,
            "seed": world.seed, "spec": spec, "variant": world.variant, "num_concepts": world.num_concepts,
            "concept_repeats": world.concept_repeats, "augment": world.augment}


def world_from_dict(d: dict) -> ToyWorld:
    spec = {**d["spec"], "positions": tuple(d["spec"].get("positions", ("center",))),
            "named": tuple(d["spec"].get("named", ("shape", "colour")))}
    return ToyWorld(num_unique=d["num_unique"], num_duplicated=d["num_duplicated"], repeats=d["repeats"],
                    seed=d["seed"], spec=WorldSpec(**spec), variant=d.get("variant", "exact"),
                    num_concepts=d.get("num_concepts", 0), concept_repeats=d.get("concept_repeats", 0),
                    augment=d.get("augment", False))


def load_world(data_dir) -> ToyWorld:
    """The ToyWorld a `prepare_world` folder was written from (its world.json)."""
    import json
    from pathlib import Path

    path = Path(data_dir) / WORLD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a world dataset (write one with `python launch/prepare.py "
                                "input.kind=world output_dir=<dir>`)")
    return world_from_dict(json.loads(path.read_text()))


def _records(world: ToyWorld) -> list[tuple[int, int]]:
    """What `world_source` holds: (item, copy) per record. Exact variant: every distinct item once (copy 0; the
    plan repeats it). Other variants: every appearance, since appearances differ (captions, pixels)."""
    if world.variant == "exact":
        return [(i, 0) for i in range(world.num_items)]
    return world.appearances()


def world_source(world: ToyWorld):
    """The world as a MapSource for the prep code. Exact variant: the distinct items, keys world-<index>
    (copies become world-<index>#dup<copy> through `world_plan`). Other variants: every appearance, keys
    world-<index>-<copy> as in `ToyWorld.sample`, so the shards hold what `ToyWorldDataset` yields."""
    from memfilter.train.data.imagefolder import MapSource, RawRecord

    records = _records(world)
    exact = world.variant == "exact"

    class WorldSource(MapSource):
        source_name = "world"

        def __len__(self) -> int:
            return len(records)

        def key(self, i: int) -> str:
            index, copy = records[i]
            return f"world-{index:06d}" if exact else ToyWorld.key(index, copy)

        def raw(self, i: int) -> RawRecord:
            index, copy = records[self._check_index(i)]
            shown = world.appearance(index, copy)
            return RawRecord(key=self.key(i), data=Image.fromarray(shown["image"]), caption=shown["caption"],
                             dup_group=world.dup_group(index))

    return WorldSource()


@dataclass(eq=False)
class WorldPlan(DuplicationPlan):
    """A DuplicationPlan whose duplicated items are its groups: with varied appearances every appearance is a
    source record of its own, so counting distinct sources would count appearances."""

    @property
    def duplicated_sources(self) -> np.ndarray:
        return np.unique(self.dup_group[self.dup_group >= 0])

    def ground_truth(self, keys) -> dict[str, dict]:
        """Per source key: {"dup_group", "appearances" (of its item, all copies), "duplicated"}."""
        groups, counts = np.unique(self.dup_group[self.dup_group >= 0], return_counts=True)
        per_group = dict(zip(groups.tolist(), counts.tolist()))
        out = {}
        for s, g in zip(self.source.tolist(), self.dup_group.tolist()):
            out[keys[s]] = {"dup_group": int(g), "appearances": per_group.get(g, 1), "duplicated": g >= 0}
        return out


def world_plan(world: ToyWorld) -> WorldPlan:
    """The duplication plan over `world_source(world)`. Exact variant: duplicated items [0, num_duplicated) x
    repeats, unique items once, concepts x concept_copies. Other variants: every record once (it already is
    one appearance). dup_group: the item index of duplicated items and concepts, -1 for unique items."""
    d, r, n = world.num_duplicated, world.repeats, world.num_unique
    params = {"num_duplicated": d, "repeats": r, "num_unique": n, "seed": world.seed, "variant": world.variant,
              "num_concepts": world.num_concepts, "concept_repeats": world.concept_copies}
    if world.variant == "exact":
        concepts = np.asarray(world.concept_indices(), np.int64)
        k = world.concept_copies
        source = np.concatenate([np.repeat(np.arange(d), r), d + np.arange(n), np.repeat(concepts, k)]).astype(np.int64)
        copy = np.concatenate([np.tile(np.arange(r), d), np.zeros(n), np.tile(np.arange(k), len(concepts))]
                              ).astype(np.int64)
        group = np.where((source < d) | (source >= d + n), source, -1).astype(np.int64)
    else:
        records = _records(world)
        source = np.arange(len(records), dtype=np.int64)
        copy = np.zeros(len(records), np.int64)
        group = np.array([world.dup_group(i) for i, _ in records], np.int64)
    return WorldPlan(source, copy, group, np.full(len(source), -1, np.int64), protocol="world", params=params)


def prepare_world(world: ToyWorld, output_dir, *, shard_size: int = 500, seed: int = 0,
                  overwrite: bool = False, progress: bool = True, dedup: str = "none") -> dict:
    """Write `world` as webdataset shards through the prep code (manifest, shards.json, duplicates,
    report), plus world.json, from which `load_world` rebuilds it; `dedup` as in `prepare` (a deduplication
    baseline). Returns the prep report."""
    import json
    from pathlib import Path

    from memfilter.train.data.prepare import prepare

    report = prepare(world_source(world), output_dir, shard_size=shard_size, plan=world_plan(world), seed=seed,
                     overwrite=overwrite, input_info={"kind": "world", **world_to_dict(world)}, progress=progress,
                     dedup=dedup)
    (Path(output_dir) / WORLD_FILE).write_text(json.dumps(world_to_dict(world), indent=1))
    return report


def shard_urls(data_dir) -> str:
    """The brace pattern of the shards a prep folder holds (for data.shards)."""
    import json
    from pathlib import Path

    names = sorted(json.loads((Path(data_dir) / "shards.json").read_text()))
    names = [Path(n).name for n in names]
    last = int(names[-1].split("-")[1].split(".")[0])
    return str(Path(data_dir).resolve() / (f"shard-{{000000..{last:06d}}}.tar" if last else names[0]))
