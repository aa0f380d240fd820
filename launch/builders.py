"""Config -> objects. The only place where a Hydra config becomes models, data and policies."""
from __future__ import annotations

import dataclasses
import re

from omegaconf import DictConfig, OmegaConf

from memfilter.filtering.policies import build_policy
from memfilter.filtering.protect import Protect
from memfilter.launch.config_check import ConfigError
from memfilter.train.data.duplication import DuplicatedDataset, make_plan
from memfilter.train.data.hf import HFSource
from memfilter.train.data.imagefolder import ImageFolderSource
from memfilter.train.data.wds import WebDatasetSource
from memfilter.train.families import build_tiny_model, get_family, load_pretrained
from memfilter.train.models import Components
from memfilter.toyworld.world import ToyWorld, ToyWorldDataset, WorldSpec


BUILTIN = "builtin:"


def resolve_device(name: str) -> str:
    """`device=auto` is cuda where torch sees a GPU, else cpu; any other name as it is."""
    import torch
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def resolve_pretrained(pretrained: str) -> str:
    """`builtin:<name>` is a model shipped in the repo (toyworld/assets/<name>); anything else is returned as is."""
    if not str(pretrained).startswith(BUILTIN):
        return pretrained
    from memfilter.toyworld.base import ASSET_DIR

    name = str(pretrained)[len(BUILTIN):]
    path = ASSET_DIR.parent / name
    if not (path / "model_index.json").is_file():
        raise ConfigError(f"model.pretrained={pretrained!r}: {path} holds no pipeline; the repo ships "
                          "builtin:world-base (rebuild it with `python launch/build_world_base.py`)")
    return str(path)


def build_components(model: DictConfig) -> Components:
    """model.pretrained (directory, hub id or builtin:<name>; its family from model_index.json) or the tiny model
    of model.tiny.family built from model.tiny."""
    if model.pretrained:
        path = resolve_pretrained(model.pretrained)
        try:
            return load_pretrained(path, revision=model.revision, variant=model.variant,
                                   prediction_type=model.prediction_type, vae=model.get("vae"),
                                   non_ema_revision=model.get("non_ema_revision"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.pretrained={model.pretrained!r} could not be loaded ({e}). Give a local "
                              "diffusers directory (as save_pretrained writes it) or a hub id that is cached "
                              "(HF_HUB_OFFLINE=1), or use model=tiny") from e
    tiny = OmegaConf.to_container(model.tiny, resolve=True)
    return build_tiny_model(**tiny, prediction_type=model.prediction_type or "epsilon")


def native_resolution(components: Components) -> int:
    """Pixels the UNet was built for: sample_size x the VAE's downsampling factor."""
    return get_family(components).native_resolution()


# What the world group (conf/world/default.yaml) holds: every ToyWorld field but the geometry (spec).
WORLD_KEYS = tuple(f.name for f in dataclasses.fields(ToyWorld) if f.name != "spec")


def build_world(world: DictConfig, *, seed: int | None = None, resolution: int | None = None,
                prefix: str = "world") -> ToyWorld:
    """The ToyWorld of a config node composed from the world group (`world` in the demo and prep apps, `data`
    with data=world): the group's keys are passed as they are, other keys of the node (name, shard_size) are
    not the world's. `seed` replaces world.seed (the demo's seeds); `resolution` draws at the model's size
    (null or 0: WorldSpec's 16 px). A value ToyWorld rejects stops the run naming `<prefix>.<key>`."""
    kw = {k: world[k] for k in WORLD_KEYS if k in world}
    if seed is not None:
        kw["seed"] = seed
    try:
        return ToyWorld(**kw, spec=WorldSpec(resolution=resolution) if resolution else WorldSpec())
    except ValueError as e:           # ToyWorld names its fields world.<key>
        raise ConfigError(re.sub(r"\bworld(?=[.:])", prefix, str(e))) from None


def build_dataset(data: DictConfig, resolution: int, seed: int = 0):
    """The data source named by data.name; a bad path or column stops here, before any model is built."""
    from omegaconf.errors import MissingMandatoryValue

    try:
        kw = OmegaConf.to_container(data, resolve=True, throw_on_missing=True)
        name = kw.pop("name")
        if name == "webdataset":
            shards = kw.pop("shards")
            return WebDatasetSource(shards, seed=seed, **kw)
        keep = kw.pop("keep_list", None)
        if name == "world":
            return _keep_listed(ToyWorldDataset(build_world(data, resolution=resolution, prefix="data")), keep)
        if name in ("imagefolder", "hf"):
            dup = kw.pop("duplication", None) or {}
            source = (ImageFolderSource if name == "imagefolder" else HFSource)(**kw)
            return _keep_listed(_with_duplication(source, dup), keep)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key or 'data'} is required: set it on the command line, e.g. "
                          f"data.path=<folder>") from None
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from e
    raise ConfigError(f"data.name={data.name!r}: unknown data source; choose "
                      "data=world|imagefolder|hf|webdataset")


def _keep_listed(source, keep_list: str | None):
    """data.keep_list: only the listed keys of a map-style source (train.data.keeplist)."""
    if not keep_list:
        return source
    from memfilter.train.data.keeplist import KeepList, read_keep_list
    return KeepList(source, read_keep_list(keep_list))


def _with_duplication(source, dup: dict):
    """Wrap a map-style source in the duplication plan of data.duplication (by indexing, no copies)."""
    if not dup or not dup.get("protocol"):
        return source
    captions = None
    caption_file = dup.pop("caption_file", None)
    if caption_file:
        captions = [line.strip() for line in open(caption_file, encoding="utf-8") if line.strip()]
    plan = make_plan(dup.pop("protocol"), len(source), num_captions=len(captions) if captions else None, **dup)
    return DuplicatedDataset(source, plan, captions)


def build_filter(filter_cfg: DictConfig, num_train_timesteps: int):
    """The filter policy of `filter` (every key but name and protect)."""
    kwargs = {k: v for k, v in OmegaConf.to_container(filter_cfg, resolve=True).items()
              if k not in ("name", "protect")}
    if filter_cfg.name in ("timestep", "caption", "item"):
        kwargs["num_train_timesteps"] = num_train_timesteps
    return build_policy(filter_cfg.name, **kwargs)


def build_mitigation(mitigation_cfg: DictConfig, components, seed: int):
    """The training-time baseline (mitigation=...; train.mitigation), its vocabulary from the model's tokenizer."""
    from memfilter.filtering.mitigate import token_vocabulary
    from memfilter.train.mitigation import Mitigation, MitigationArgs

    try:
        args = MitigationArgs(**OmegaConf.to_container(mitigation_cfg, resolve=True))
        vocabulary = token_vocabulary(components.tokenizer) if args.name in ("random_caption",
                                                                                 "random_tokens") else []
        return Mitigation(args, vocabulary, seed)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e


def build_protect(filter_cfg: DictConfig) -> Protect:
    """The samples the filter exempts (filter.protect)."""
    try:
        return Protect(**OmegaConf.to_container(filter_cfg.get("protect") or {}, resolve=True))
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from e
