"""A Hugging Face `datasets.Dataset` as a map-style source: the second step after a folder.

The dataset comes from `save_to_disk` output, from local data files (Parquet, Arrow, CSV, JSON or an
imagefolder) or from a hub id already in the local cache. Images are never decoded by `datasets`:
the image column is cast to `datasets.Image(decode=False)`, so a corrupt image reaches `load_image`
as bytes and becomes one skip record instead of an exception inside a dataloader worker. Image values
may be {"bytes", "path"} dicts, raw bytes, path strings (resolved against `image_root`) or PIL images.
"""
from __future__ import annotations

from pathlib import Path

import datasets
from PIL import Image

from memfilter.train.data.imagefolder import DataConfigError, MapSource, RawRecord, as_group
from memfilter.train.data.transforms import (DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIZE,
                                              BadSample, pick_caption)

FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}


def load_hf_dataset(path: str | None, *, format: str | None = None, data_files=None, split: str = "train",
                    cache_dir: str | None = None, config_name: str | None = None,
                    config_prefix: str = "data") -> datasets.Dataset:
    """One split of a dataset from disk, from data files or from the hub cache.

    Args:
        path: a `save_to_disk` folder, a data file or folder, or a hub id (cached; HF_HUB_OFFLINE=1).
        format: builder for data files: "parquet", "arrow", "csv", "json" or "imagefolder". Default None:
            a save_to_disk folder, else inferred from the file extension, else `datasets`' own inference.
        data_files: files (a path, glob or list) to load with `format`; overrides `path` as the files.
            Default None.
        split: the split to use. Default "train".
        cache_dir: where `load_dataset` writes its Arrow cache. Default None (the HF cache).
        config_name: the dataset's configuration (`load_dataset(path, name)`, diffusers' --dataset_config_name),
            for a hub dataset or a folder whose README.md declares `configs`. Default None (the default one).
        config_prefix: the config block named in error messages. Default "data".
    """
    p = Path(path).expanduser() if path else None
    where = f"{config_prefix}.path={path!r}"
    saved = p is not None and p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists())
    if config_name is not None and (saved or format is not None or data_files is not None or (p and p.is_file())):
        raise DataConfigError(f"{config_prefix}.config_name={config_name!r}: a configuration is chosen only for a "
                              f"hub dataset or a dataset folder whose README.md declares `configs`; set "
                              f"{config_prefix}.config_name=null for a save_to_disk folder or data files")
    if saved and format is None and data_files is None:
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataConfigError(f"{config_prefix}.split={split!r}: not a split of {path}; "
                                      f"available: {sorted(ds)}")
            ds = ds[split]
        return ds
    local = data_files is not None or (p is not None and p.exists())
    if not local and (p is None or format is not None):
        raise DataConfigError(f"{where}: no such file or folder; set {config_prefix}.path to a save_to_disk "
                              f"folder, a data file or folder ({config_prefix}.format=parquet|arrow|csv|json|"
                              "imagefolder), or a cached hub dataset id")
    if local and format is None and p is not None and p.is_file():
        format = FORMATS.get(p.suffix.lower())
        if format is None:
            raise DataConfigError(f"{where}: cannot tell the format of {p.name}; set {config_prefix}.format "
                                  f"to one of {sorted(set(FORMATS.values()))}")
    try:
        if data_files is not None:
            return datasets.load_dataset(format, data_files=data_files, split=split, cache_dir=cache_dir)
        if local and format is None:                      # a folder: let datasets infer the builder
            return datasets.load_dataset(str(p), config_name, split=split, cache_dir=cache_dir)
        if local and p.is_dir():
            return datasets.load_dataset(format, data_dir=str(p), split=split, cache_dir=cache_dir)
        if local:
            return datasets.load_dataset(format, data_files=str(p), split=split, cache_dir=cache_dir)
        return datasets.load_dataset(path, config_name, split=split, cache_dir=cache_dir)
    except Exception as e:  # datasets raises many types (FileNotFoundError, ValueError, ConnectionError, ...)
        kind = "as local data" if local else "as a hub dataset (no network: HF_HUB_OFFLINE=1 and a cached copy)"
        raise DataConfigError(f"{where}: could not load {kind}: {type(e).__name__}: {e}. Check {config_prefix}."
                              f"path, {config_prefix}.format, {config_prefix}.config_name and {config_prefix}.split, "
                              "or save the dataset with save_to_disk and point at that folder") from e


class HFSource(MapSource):
    """Map-style source over one split of a `datasets.Dataset`.

    Args:
        path: see `load_hf_dataset`; ignored when `dataset` is given. Default None.
        format: data file builder ("parquet", "arrow", "csv", "json", "imagefolder"). Default None (inferred).
        data_files: data files to load with `format`. Default None.
        split: split name; also the key prefix when `key_prefix` is None. Default "train".
        image_column: column with the images. Default "image".
        caption_column: column with the caption (a string, or a list: one drawn per epoch). Default "text".
        key_column: column with unique ids used as keys. Default None: f"{key_prefix}-{index:08d}".
        key_prefix: prefix of index keys. Default None (the split name).
        dup_group_column: column with duplicate-group ids (-1 or null: not duplicated). Default None.
        image_root: folder against which relative image paths are resolved. Default None: `path`'s folder.
        min_size: shorter side below which an image is skipped ("too_small"). Default 16 (DEFAULT_MIN_SIZE).
        max_pixels: pixel count above which an image is skipped ("too_large"). Default 16384^2.
        seed: seed of the per-epoch caption choice. Default 0.
        cache_dir: Arrow cache of `load_dataset`. Default None (the HF cache).
        config_name: the dataset's configuration (see `load_hf_dataset`). Default None.
        dataset: an already loaded `datasets.Dataset` (notebooks, tests). Default None.
        config_prefix: the config block named in error messages. Default "data".
    """

    source_name = "hf"

    def __init__(self, path: str | None = None, format: str | None = None, data_files=None, split: str = "train",
                 image_column: str = "image", caption_column: str = "text", key_column: str | None = None,
                 key_prefix: str | None = None, dup_group_column: str | None = None, image_root: str | None = None,
                 min_size: int = DEFAULT_MIN_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS, seed: int = 0,
                 cache_dir: str | None = None, config_name: str | None = None,
                 dataset: datasets.Dataset | None = None, config_prefix: str = "data"):
        super().__init__(min_size, max_pixels, seed)
        ds = dataset if dataset is not None else load_hf_dataset(
            path, format=format, data_files=data_files, split=split, cache_dir=cache_dir, config_name=config_name,
            config_prefix=config_prefix)
        columns = {"image_column": image_column, "caption_column": caption_column, "key_column": key_column,
                   "dup_group_column": dup_group_column}
        for field, name in columns.items():
            if name is not None and name not in ds.column_names:
                raise DataConfigError(f"{config_prefix}.{field}={name!r}: no such column in {path or 'the dataset'}; "
                                      f"available columns: {ds.column_names}. Set {config_prefix}.{field} "
                                      "to one of them")
        used = [c for c in dict.fromkeys(columns.values()) if c is not None]
        ds = ds.select_columns(used)
        if isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.ds, self.image_column, self.caption_column = ds, image_column, caption_column
        self.key_column, self.dup_group_column = key_column, dup_group_column
        self.key_prefix = key_prefix if key_prefix is not None else split
        self.image_root = Path(image_root).expanduser() if image_root else None
        if self.image_root is None and path and Path(path).expanduser().exists():
            p = Path(path).expanduser()
            self.image_root = p if p.is_dir() else p.parent
        self._captions = ds.select_columns([caption_column])   # caption lookups without reading images
        self._keys: list[str] | None = None
        self._dup_of: dict[int, int] = {}                      # row -> first row with the same key
        if key_column is not None:
            values = ds.select_columns([key_column]).with_format("arrow")[:][key_column].to_pylist()
            self._keys = ["" if v is None else str(v) for v in values]
            first: dict[str, int] = {}
            for i, k in enumerate(self._keys):
                if k and first.setdefault(k, i) != i:
                    self._dup_of[i] = first[k]

    def __len__(self) -> int:
        return len(self.ds)

    def key(self, i: int) -> str:
        if self._keys is None:
            return f"{self.key_prefix}-{i:08d}"
        return self._keys[i] or f"{self.key_prefix}-{i:08d}"

    def raw(self, i: int) -> RawRecord:
        key = self.key(i)
        if self._keys is not None and not self._keys[i]:
            return RawRecord(key, skip=("missing_key", f"row {i}: {self.key_column} is empty"))
        if i in self._dup_of:
            return RawRecord(key, skip=("duplicate_key", f"row {i} has the same key as row {self._dup_of[i]}"))
        row = self.ds[i]
        group = as_group(row[self.dup_group_column]) if self.dup_group_column else -1
        return RawRecord(key, data=self._image_data(row[self.image_column]), caption=row[self.caption_column],
                         dup_group=group)

    def caption_of(self, i: int) -> str:
        if i in self._dup_of:
            raise BadSample("duplicate_key")
        return pick_caption(self._captions[i][self.caption_column], seed=self.seed, epoch=self.epoch, key=self.key(i))

    def _image_data(self, value):
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, str) and value:
            p = Path(value).expanduser()
            return p if p.is_absolute() or self.image_root is None else self.image_root / p
        raise BadSample("missing_image", f"{self.image_column} is {type(value).__name__}")
