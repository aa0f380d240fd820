"""Dataset prep: a folder, a table of image paths or an HF dataset -> webdataset shards, manifest, report.

    python launch/prepare.py input.kind=imagefolder input.path=<folder> output_dir=<dir> shard_size=1000 resize=512
    python launch/prepare.py input.kind=table input.path=pairs.parquet input.image_column=file \
        input.caption_column=caption output_dir=<dir>
    python launch/prepare.py input.kind=hf input.path=<save_to_disk folder> output_dir=<dir> \
        duplication.protocol=wen duplication.num_duplicated=10 duplication.repeats=20
    python launch/prepare.py input.kind=world output_dir=<dir> world.num_duplicated=8 world.repeats=50
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from memfilter.launch.config_check import ConfigError, check_value, is_int  # noqa: E402

KINDS = ("imagefolder", "table", "hf", "world")
_RULES = [
    ("input.kind", lambda v: v in KINDS, f"one of {', '.join(KINDS)}"),
    ("input.min_size", lambda v: v is None or (is_int(v) and v >= 0), "null or an integer >= 0"),
    ("input.max_pixels", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    ("output_dir", lambda v: isinstance(v, str) and v, "a folder, e.g. output_dir=data/shards"),
    ("shard_size", lambda v: is_int(v) and v >= 1, "an integer >= 1, e.g. shard_size=1000"),
    ("resize", lambda v: v is None or (is_int(v) and v >= 8), "null or an integer >= 8, e.g. resize=512"),
    ("near_dup_threshold", lambda v: is_int(v) and 0 <= v <= 64, "an integer in [0, 64]"),
    ("dedup", lambda v: v in ("none", "exact", "near"), "none, exact or near"),
    ("num_workers", lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    ("duplication.protocol", lambda v: v in (None, "wen", "somepalli"), "null, wen or somepalli"),
    ("duplication.mode", lambda v: v in ("image_and_caption", "image_only"), "image_and_caption or image_only"),
]
_PATH_RULE = ("input.path", lambda v: isinstance(v, str) and v, "a folder or file, e.g. input.path=data/images")
_WORLD_RULES = [
    ("world.num_unique", lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    ("world.num_duplicated", lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    ("world.repeats", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    ("world.seed", is_int, "an integer"),
]


def build_input(inp: DictConfig):
    """The source named by the `input` block (config_prefix "input", so errors name input.<field>)."""
    from memfilter.train.data.hf import HFSource
    from memfilter.train.data.imagefolder import ImageFolderSource

    common = dict(max_pixels=inp.max_pixels, config_prefix="input")
    if inp.min_size is not None:
        common["min_size"] = inp.min_size
    if inp.kind == "imagefolder":
        return ImageFolderSource(inp.path, caption_column=inp.caption_column, **common)
    return HFSource(inp.path, format=inp.format, split=inp.split, image_column=inp.image_column,
                    caption_column=inp.caption_column, key_column=inp.key_column,
                    dup_group_column=inp.dup_group_column, image_root=inp.image_root, **common)


def run(cfg: DictConfig) -> dict:
    """Check `cfg`, build the input and the duplication plan, write the shards. Returns the prep report."""
    from memfilter.train.data.duplication import make_plan
    from memfilter.train.data.prepare import format_summary, prepare

    for key, ok, must in _RULES:
        check_value(cfg, key, ok, must)
    if cfg.input.kind == "world":
        return _run_world(cfg)
    check_value(cfg, *_PATH_RULE)
    source = build_input(cfg.input)
    dup = OmegaConf.to_container(cfg.duplication, resolve=True)
    captions = None
    if dup.pop("caption_file"):
        path = Path(cfg.duplication.caption_file)
        if not path.is_file():
            raise ConfigError(f"duplication.caption_file={str(path)!r}: no such file; give a text file with one "
                              "caption per line, or null to use other items' captions")
        captions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        plan = make_plan(dup.pop("protocol"), len(source), num_captions=len(captions) if captions else None, **dup)
    except ValueError as e:
        raise ConfigError(f"duplication: {e}") from None
    report = prepare(source, cfg.output_dir, shard_size=cfg.shard_size, resize=cfg.resize, plan=plan,
                     captions=captions, near_dup_threshold=cfg.near_dup_threshold, seed=cfg.seed,
                     num_workers=cfg.num_workers, overwrite=cfg.overwrite, dedup=cfg.dedup,
                     input_info={"kind": cfg.input.kind, "path": str(cfg.input.path)})
    print(format_summary(report))
    return report


def _run_world(cfg: DictConfig) -> dict:
    """The toy world (toyworld/world.py, settings world.* from conf/world/default.yaml): its own duplication,
    written through the same prep code."""
    from memfilter.launch.builders import build_world
    from memfilter.toyworld.world import prepare_world
    from memfilter.train.data.prepare import format_summary

    for key, ok, must in _WORLD_RULES:
        check_value(cfg, key, ok, must)
    if cfg.duplication.protocol:
        raise ConfigError("duplication.protocol: the world duplicates its own items (world.num_duplicated, "
                          "world.repeats); leave duplication.protocol=null with input.kind=world")
    world = build_world(cfg.world)
    report = prepare_world(world, cfg.output_dir, shard_size=cfg.shard_size, seed=cfg.seed, overwrite=cfg.overwrite,
                           dedup=cfg.dedup)
    print(format_summary(report))
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="prepare")
def main(cfg: DictConfig) -> None:
    from memfilter.train.data.imagefolder import DataConfigError

    try:
        run(cfg)
    except (ConfigError, DataConfigError) as e:
        print(f"memfilter prep: invalid config: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
