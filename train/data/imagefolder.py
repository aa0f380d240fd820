"""A folder of images with captions, as a map-style source; and the base class map-style sources share.

Users start with a folder. Captions follow the Hugging Face imagefolder convention (`metadata.jsonl` or
`metadata.csv` with `file_name` and a caption column, in the root or any subfolder) or sit next to
each image in a `.txt` or `.json` file with the same stem. Nothing is decoded at construction: the
folder is listed and the metadata read, and every image is decoded (and checked) when it is indexed,
so one bad file costs one skip record, never the run.

`MapSource` splits reading from decoding: `raw(i)` gives the key, the undecoded image (path or
bytes) and the raw caption value; `__getitem__` decodes that into a Sample. The prep CLI uses `raw`
to copy original bytes into shards without re-encoding them.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from memfilter.train.data.collate import skip_record
from memfilter.train.data.transforms import (DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIZE, IMAGE_EXTS,
                                              BadSample, load_image, pick_caption)

log = logging.getLogger("memfilter.data")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_COLUMNS = ("text", "caption")         # tried after the configured column, HF imagefolder style


class DataConfigError(ValueError):
    """A data setting that cannot work; the message names the config field and the fix."""


@dataclass
class RawRecord:
    """One item before decoding: what `MapSource.raw` returns.

    `data` is a file path, encoded bytes or (rarely, from in-memory datasets) a PIL image; `caption`
    is whatever the source holds (str, list of str, dict, None), resolved later by `pick_caption`;
    `skip` is a (reason, detail) known without decoding, e.g. a duplicate key.
    """
    key: str
    data: Any = None
    caption: Any = None
    dup_group: int = -1
    skip: tuple[str, str] | None = None


def as_group(value) -> int:
    """A dup_group value from metadata (int, numeric string, None or '') as an int; -1 when absent."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return -1
    try:
        return int(value)
    except (TypeError, ValueError):
        raise BadSample("bad_metadata", f"dup_group={value!r} is not an integer") from None


class MapSource(Dataset):
    """Base of map-style sources: Samples from `raw(i)`, skip records for bad items, epoch-aware captions.

    With dataloader workers, call `set_epoch` before each epoch's iterator is created (the training loop
    does): workers copy the dataset when they start.

    Args:
        min_size: shorter image side below which an image is skipped as "too_small". Default 16 (DEFAULT_MIN_SIZE).
        max_pixels: pixel count above which an image is skipped as "too_large". Default 16384^2.
        seed: seed of the per-epoch caption choice when an item has several captions. Default 0.
    """

    source_name = "map"

    def __init__(self, min_size: int = DEFAULT_MIN_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS, seed: int = 0):
        self.min_size, self.max_pixels, self.seed = int(min_size), int(max_pixels), int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def key(self, i: int) -> str:
        raise NotImplementedError

    def raw(self, i: int) -> RawRecord:
        raise NotImplementedError

    @property
    def keys(self) -> list[str]:
        return [self.key(i) for i in range(len(self))]

    def caption_of(self, i: int) -> str:
        """Item i's caption for the current epoch, without decoding its image; raises BadSample."""
        rec = self.raw(i)
        if rec.skip:
            raise BadSample(*rec.skip)
        return pick_caption(rec.caption, seed=self.seed, epoch=self.epoch, key=rec.key)

    def _check_index(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        return int(i)

    def __getitem__(self, i: int) -> dict:
        i = self._check_index(i)
        key = self.key(i)
        try:
            rec = self.raw(i)
            key = rec.key
            if rec.skip:
                return skip_record(key, *rec.skip)
            caption = pick_caption(rec.caption, seed=self.seed, epoch=self.epoch, key=key)
            image = load_image(rec.data, min_size=self.min_size, max_pixels=self.max_pixels)
        except BadSample as e:
            return skip_record(key, e.reason, e.detail)
        return {"key": key, "image": image, "caption": caption,
                "meta": {"source": self.source_name, "dup_group": rec.dup_group, "epoch": self.epoch}}


def _read_metadata(path: Path, prefix: str) -> tuple[list[dict], int]:
    """Rows of one metadata.jsonl / metadata.csv and the number of unreadable jsonl lines."""
    rows, bad = [], 0
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if "file_name" not in (reader.fieldnames or []):
                raise DataConfigError(f"{prefix}.path: {path} has no file_name column (columns: "
                                      f"{reader.fieldnames}); the HF imagefolder convention needs file_name "
                                      "plus a caption column")
            rows = list(reader)
    else:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    bad += 1
                    continue
                if isinstance(row, dict) and "file_name" in row:
                    rows.append(row)
                else:
                    bad += 1
    return rows, bad


class ImageFolderSource(MapSource):
    """Images under a folder (recursive), captions from metadata.jsonl/.csv or .txt/.json sidecars.

    Keys are the image paths relative to the folder, without extension (`sub/cat_01`); two images
    with the same key (`a.jpg`, `a.png`) keep the first in sorted order and the other becomes a
    "duplicate_key" skip. A metadata row wins over sidecars; `dup_group` comes from a metadata column
    (or a .json sidecar) and is -1 when absent.

    Args:
        path: the folder (config field `<config_prefix>.path`).
        caption_column: metadata column holding the caption; "text" and "caption" are tried after it.
            Default "text".
        min_size: shorter side below which an image is skipped ("too_small"). Default 16 (DEFAULT_MIN_SIZE).
        max_pixels: pixel count above which an image is skipped ("too_large"). Default 16384^2.
        seed: seed of the per-epoch choice among several captions. Default 0.
        config_prefix: the config block named in error messages. Default "data".
    """

    source_name = "imagefolder"

    def __init__(self, path: str | Path, caption_column: str = "text", min_size: int = DEFAULT_MIN_SIZE,
                 max_pixels: int = DEFAULT_MAX_PIXELS, seed: int = 0, config_prefix: str = "data"):
        super().__init__(min_size, max_pixels, seed)
        root = Path(path).expanduser()
        hint = (f"set {config_prefix}.path to a folder of images ({', '.join(IMAGE_EXTS)}) with captions in "
                "metadata.jsonl / metadata.csv (file_name + text) or in a .txt file next to each image")
        if not root.is_dir():
            raise DataConfigError(f"{config_prefix}.path={str(path)!r}: "
                                  f"{'not a folder' if root.exists() else 'no such folder'}; {hint}")
        self.root = root
        self.caption_columns = (caption_column,) + tuple(c for c in CAPTION_COLUMNS if c != caption_column)
        images, self._sidecars, metadata = self._scan(root)
        if not images:
            raise DataConfigError(f"{config_prefix}.path={str(path)!r}: no images found (searched recursively "
                                  f"for {', '.join(IMAGE_EXTS)}); {hint}")
        self._meta: dict[str, dict] = {}
        bad = 0
        # Shallow metadata files first, so a subfolder's own metadata wins for its images.
        for mpath in sorted(metadata, key=lambda p: (len(p.relative_to(root).parts), str(p))):
            rows, n_bad = _read_metadata(mpath, config_prefix)
            bad += n_bad
            base = mpath.parent.relative_to(root).as_posix()
            for row in rows:
                rel = posixpath.normpath(posixpath.join(base, str(row["file_name"]).replace("\\", "/")))
                self._meta[rel] = row
        if bad:
            log.warning("%s: %d unreadable metadata line(s) ignored", root, bad)
        self._items: list[tuple[str, str, str | None]] = []      # (key, relative path, first path with that key)
        first: dict[str, str] = {}
        for rel in images:
            key = posixpath.splitext(rel)[0]
            self._items.append((key, rel, first.get(key)))
            first.setdefault(key, rel)

    @staticmethod
    def _scan(root: Path) -> tuple[list[str], set[str], list[Path]]:
        images, sidecars, metadata = [], set(), []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            base = Path(dirpath).relative_to(root).as_posix()
            for name in filenames:
                if name.startswith("."):
                    continue
                rel = name if base == "." else f"{base}/{name}"
                ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
                if name in METADATA_FILES:
                    metadata.append(Path(dirpath) / name)
                elif ext in IMAGE_EXTS:
                    images.append(rel)
                elif ext in ("txt", "json"):
                    sidecars.add(rel)
        return sorted(images), sidecars, metadata

    def __len__(self) -> int:
        return len(self._items)

    def key(self, i: int) -> str:
        return self._items[i][0]

    @property
    def keys(self) -> list[str]:
        return [k for k, _, _ in self._items]

    def raw(self, i: int) -> RawRecord:
        key, rel, first = self._items[i]
        if first is not None:
            return RawRecord(key, skip=("duplicate_key", f"{rel} has the same key as {first}"))
        caption, group = None, None
        row = self._meta.get(rel)
        column = next((c for c in self.caption_columns if c in row), None) if row else None
        if column is not None:
            caption = row[column]
        if row is not None:
            group = row.get("dup_group")
        if column is None and f"{key}.txt" in self._sidecars:
            caption = self._read_sidecar(f"{key}.txt")
        json_side = f"{key}.json" in self._sidecars
        if json_side and ((column is None and caption is None) or group is None):
            obj = self._read_sidecar(f"{key}.json")
            try:
                obj = json.loads(obj)
            except json.JSONDecodeError as e:
                raise BadSample("bad_metadata", f"{key}.json: {e}") from None
            if isinstance(obj, dict):
                group = obj.get("dup_group") if group is None else group
                if column is None and caption is None:
                    caption = obj
        return RawRecord(key, data=self.root / rel, caption=caption, dup_group=as_group(group))

    def _read_sidecar(self, rel: str) -> str:
        try:
            return (self.root / rel).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise BadSample("unreadable", f"{rel}: {e}") from None
