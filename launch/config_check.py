"""Config checks that run before anything is built: a bad value stops the run at start, naming the key and the fix."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from omegaconf import DictConfig, ListConfig

from memfilter.filtering.settings import is_int, is_num  # noqa: F401  (the apps' own rules use them)
from memfilter.train.families import FAMILIES


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and how to fix it."""


def run_or_exit(run, cfg: DictConfig) -> None:
    """Body of every Hydra app: run, and turn a ConfigError into one clear line and exit status 2."""
    import sys

    try:
        run(cfg)
    except ConfigError as err:
        print(f"memfilter: invalid config: {err}", file=sys.stderr)
        sys.exit(2)


def _get(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node




# (key, test, what the value must be) for the groups that have no dataclass of their own (model, logger); every
# loop, optimizer and filter setting is checked by the dataclass that defines it (filtering.settings).
_RULES = [
    ("mixed_precision", lambda v: v in (None, "no", "fp16", "bf16"), "one of null, no, fp16, bf16"),
    ("model.prediction_type", lambda v: v in (None, "epsilon", "v_prediction"), "null, epsilon or v_prediction"),
    ("model.lora.rank", lambda v: is_int(v) and v >= 0, "an integer >= 0 (0: full fine-tuning)"),
    ("model.tiny.family", lambda v: v in FAMILIES, f"one of {', '.join(FAMILIES)} (model=tiny or model=tiny_sdxl)"),
    ("logger.name", lambda v: v in ("wandb", "tensorboard", "all", "none"),
     "wandb, tensorboard, all or none (pick with logger=<name>, or --report_to=<name>)"),
]


def train_args(cfg: DictConfig):
    """(TrainArgs, OptimArgs) of a composed train config, checked by their fields; a top-level key that neither
    has nor a config group owns is an error (it would otherwise configure nothing)."""
    from omegaconf import OmegaConf

    from memfilter.launch.schema import APP_KEYS, GROUPS
    from memfilter.train.loop import OptimArgs, TrainArgs

    resolved = OmegaConf.to_container(cfg, resolve=True)
    names = {f.name for f in dataclasses.fields(TrainArgs)}
    unknown = sorted(set(resolved) - names - set(GROUPS) - set(APP_KEYS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: no such setting (train/loop.py TrainArgs lists them; groups: "
                          f"{', '.join(GROUPS)})")
    try:
        args = TrainArgs(**{k: v for k, v in resolved.items() if k in names}, lora_rank=cfg.model.lora.rank)
        optim = OptimArgs(**resolved["optim"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    except TypeError as e:                 # a key under optim that OptimArgs has no field for
        raise ConfigError(f"optim: {e}; train/loop.py OptimArgs lists its keys") from None
    return args, optim


def check_train_config(cfg: DictConfig, cuda_available: bool) -> None:
    """Raise ConfigError for the first value that cannot work."""
    for key, ok, must in _RULES:
        check_value(cfg, key, ok, must)
    _, optim = train_args(cfg)
    from memfilter.train.loop import adamw_class
    try:
        adamw_class(optim.use_8bit_adam)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_filter_builds(cfg)
    _check_mitigation(cfg)
    if cfg.mixed_precision == "fp16" and not cuda_available:
        raise ConfigError("mixed_precision=fp16 needs a CUDA GPU; on CPU use mixed_precision=bf16 or no")
    if cfg.use_ema and cfg.model.lora.rank:
        raise ConfigError("use_ema=true with model.lora.rank>0: EMA of LoRA adapters is not supported; "
                          "set use_ema=false or model.lora.rank=0")
    protect = cfg.filter.get("protect") or {}
    check_value(cfg, "filter.protect.captions", lambda v: isinstance(v, (list, ListConfig)) and
                all(isinstance(x, str) for x in v), "a list of regular expressions, e.g. "
                "'filter.protect.captions=[\"zorvik\"]'")
    check_value(cfg, "filter.protect.keys", lambda v: isinstance(v, (list, ListConfig)), "a list of sample keys")
    if protect.get("keep_list") and not Path(str(protect["keep_list"])).is_file():
        raise ConfigError(f"filter.protect.keep_list={protect['keep_list']!r}: no such file; give a text file "
                          "with one key per line or a Parquet file with a `key` column")
    _check_world_data(cfg)
    if cfg.logger.name in ("wandb", "all") and cfg.logger.get("mode") not in (None, "offline", "online", "disabled"):
        raise ConfigError(f"logger.mode={cfg.logger.get('mode')!r}: must be null (WANDB_MODE), offline, online or "
                          "disabled")


def check_model_settings(cfg: DictConfig, components) -> None:
    """The settings that depend on the loaded model (its training timesteps, its prediction type), before the
    run writes anything."""
    from memfilter.train.noise import check_noise
    try:
        check_noise(train_args(cfg)[0], components.noise_scheduler)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_world_data(cfg: DictConfig) -> None:
    """A real model is not fine-tuned on the toy world's little shapes by accident (data=world is the default)."""
    pretrained = str(cfg.model.get("pretrained") or "")
    if cfg.data.get("name") == "world" and pretrained and not pretrained.startswith("builtin:") \
            and not cfg.data.get("any_model", False):
        raise ConfigError(f"data: model.pretrained={pretrained!r} would be fine-tuned on the toy world (data=world, "
                          "the default: little shapes drawn in memory); choose its data, e.g. data=imagefolder "
                          "data.path=/data/images, data=hf data.path=/data/hf_dataset or data=webdataset "
                          "'data.shards=\"/data/shards/shard-{000000..000099}.tar\"' (data.any_model=true trains "
                          "it on the world on purpose)")


def _check_filter_builds(cfg: DictConfig) -> None:
    """The policy's own checks across its fields (e.g. filter.release <= filter.margin, update_with=kept only
    with a robust statistic) and its fields' names, at start: the policy is built once, as the loop will."""
    from memfilter.launch.builders import build_filter
    try:
        build_filter(cfg.filter, num_train_timesteps=1000)
    except TypeError as e:                         # a key the policy has no field for
        raise ConfigError(f"filter={cfg.filter.name}: {e}; see conf/filter/{cfg.filter.name}.yaml for its keys") from e
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _check_mitigation(cfg: DictConfig) -> None:
    """The training-time baseline's settings (train.mitigation.MitigationArgs) and its caption file, at start."""
    from omegaconf import OmegaConf

    from memfilter.train.mitigation import MitigationArgs, read_caption_file
    try:
        args = MitigationArgs(**OmegaConf.to_container(cfg.mitigation, resolve=True))
        if args.name == "multiple_captions":
            read_caption_file(args.caption_file)
    except TypeError as e:                         # a key MitigationArgs has no field for
        raise ConfigError(f"mitigation: {e}; train/mitigation.py MitigationArgs lists its keys") from None
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_value(cfg, key, ok, must):
    try:
        value = _get(cfg, key)
    except Exception as e:  # missing key or an interpolation that does not resolve
        raise ConfigError(f"{key}: {e}") from None
    if not ok(value):
        raise ConfigError(f"{key}={value!r} is invalid: must be {must}")


def _register_settings() -> None:
    """Every app imports this module before Hydra composes: the settings' defaults must be in the ConfigStore."""
    from memfilter.launch.schema import register
    register()


_register_settings()
