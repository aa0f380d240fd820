"""Config checks that run before anything is built: a bad value stops the run at start, naming the key and the fix."""
from __future__ import annotations

import math

from pathlib import Path

from omegaconf import DictConfig, ListConfig

from train.families import FAMILIES

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


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


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# (key, test, what the value must be); tests see the value as OmegaConf returns it.
_RULES = [
    ("seed", is_int, "an integer"),
    ("train_batch_size", lambda v: is_int(v) and v >= 1, "an integer >= 1, e.g. train_batch_size=8"),
    ("num_train_epochs", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    ("max_train_steps", lambda v: v is None or (is_int(v) and v >= 1), "null or an integer >= 1"),
    ("gradient_accumulation_steps", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    ("resolution", lambda v: v is None or (is_int(v) and v >= 8 and v % 8 == 0),
     "null (the model's size) or a multiple of 8, e.g. resolution=512"),
    ("mixed_precision", lambda v: v in (None, "no", "fp16", "bf16"), "one of null, no, fp16, bf16"),
    ("max_grad_norm", lambda v: _is_num(v) and v >= 0, "a number >= 0 (0 disables clipping)"),
    ("snr_gamma", lambda v: v is None or (_is_num(v) and v > 0), "null or a number > 0, e.g. snr_gamma=5.0"),
    ("noise_offset", lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    ("proportion_empty_prompts", lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("ema_decay", lambda v: _is_num(v) and 0 < v < 1, "a number in (0, 1), e.g. ema_decay=0.9999"),
    ("checkpointing_steps", lambda v: is_int(v) and v >= 0, "an integer >= 0 (0: no checkpoints)"),
    ("checkpoints_total_limit", lambda v: v is None or (is_int(v) and v >= 1), "null or an integer >= 1"),
    ("validation_steps", lambda v: is_int(v) and v >= 0, "an integer >= 0 (0: only at the end)"),
    ("num_validation_images", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    ("validation_inference_steps", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    ("logging_steps", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    ("dataloader_num_workers", lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    ("records_flush_every", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    ("optim.learning_rate", lambda v: _is_num(v) and v > 0, "a number > 0, e.g. optim.learning_rate=1e-5"),
    ("optim.lr_scheduler", lambda v: v in LR_SCHEDULERS, f"one of {', '.join(LR_SCHEDULERS)}"),
    ("optim.lr_warmup_steps", lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    ("optim.adam_beta1", lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("optim.adam_beta2", lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("optim.adam_weight_decay", lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    ("optim.adam_epsilon", lambda v: _is_num(v) and v > 0, "a number > 0"),
    ("model.prediction_type", lambda v: v in (None, "epsilon", "v_prediction"), "null, epsilon or v_prediction"),
    ("model.lora.rank", lambda v: is_int(v) and v >= 0, "an integer >= 0 (0: full fine-tuning)"),
    ("model.tiny.family", lambda v: v in FAMILIES, f"one of {', '.join(FAMILIES)} (model=tiny or model=tiny_sdxl)"),
    ("logger.name", lambda v: v in ("wandb", "none"), "wandb or none (pick with logger=wandb / logger=none)"),
    ("interpolation", lambda v: v in ("bicubic", "lanczos", "bilinear"), "bicubic, lanczos or bilinear"),
    ("resume_from_checkpoint", lambda v: v is None or isinstance(v, str), "null, latest or a checkpoint path"),
]

_FILTER_RULES = {
    "fixed": [("threshold", lambda v: _is_num(v) and v > 0, "a number > 0, e.g. filter.threshold=2.0")],
    "batch_quantile": [("drop_fraction", lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)")],
    "running_quantile": [
        ("quantile", lambda v: _is_num(v) and 0 < v < 1, "a number in (0, 1), e.g. filter.quantile=0.9"),
        ("window", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
        ("warmup", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
        ("update_with", lambda v: v == "all", "all (a quantile of the kept samples alone would fall without end)")],
    "timestep": [
        ("num_buckets", lambda v: is_int(v) and 1 <= v <= 1000, "an integer in [1, 1000]"),
        ("statistic", lambda v: v in ("median_mad", "quantile", "mean_std"), "median_mad, quantile or mean_std"),
        ("k", lambda v: _is_num(v) and v > 0, "a number > 0, e.g. filter.k=3"),
        ("quantile", lambda v: _is_num(v) and 0 < v < 1, "a number in (0, 1)"),
        ("window", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
        ("warmup", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
        ("update_with", lambda v: v in ("all", "kept", "warmup"), "all, kept or warmup")],
    "caption": [
        ("threshold", lambda v: _is_num(v) and v > 1, "a number > 1, e.g. filter.threshold=1.15"),
        ("baseline", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
        ("decay", lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
        ("min_timestep", lambda v: is_int(v) and v >= 0, "an integer >= 0, e.g. filter.min_timestep=500"),
        ("num_buckets", lambda v: is_int(v) and 1 <= v <= 1000, "an integer in [1, 1000]"),
        ("window", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
        ("warmup", lambda v: is_int(v) and v >= 1, "an integer >= 1")],
    "item": [
        ("margin", lambda v: _is_num(v) and v >= 0, "a number >= 0, e.g. filter.margin=0"),
        ("z_crit", lambda v: _is_num(v) and v >= 0, "a number >= 0, e.g. filter.z_crit=3"),
        ("min_count", lambda v: _is_num(v) and v >= 1, "a number >= 1, e.g. filter.min_count=8"),
        ("half_life", lambda v: _is_num(v) and v > 0, "a number > 0 (decisions), e.g. filter.half_life=50"),
        ("min_timestep", lambda v: is_int(v) and v >= 0, "an integer >= 0, e.g. filter.min_timestep=500"),
        ("num_buckets", lambda v: is_int(v) and 1 <= v <= 1000, "an integer in [1, 1000]"),
        ("window", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
        ("warmup", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
        ("capacity", lambda v: is_int(v) and v >= 1, "an integer >= 1, e.g. filter.capacity=100000"),
        ("group_by", lambda v: isinstance(v, (list, ListConfig)) and len(v) >= 1 and set(v) <= {"caption", "image"},
         "a non-empty list of caption and/or image, e.g. filter.group_by=[caption,image]"),
        ("evidence", lambda v: isinstance(v, (list, ListConfig)) and len(v) >= 1 and set(v) <= {"magnitude", "loss"},
         "a non-empty list of magnitude and/or loss, e.g. filter.evidence=[magnitude,loss]"),
        ("rare_count", lambda v: _is_num(v) and v > 0, "a number > 0, e.g. filter.rare_count=1"),
        ("release", lambda v: v is None or _is_num(v), "null (hold a flagged item) or a number <= filter.margin"),
        ("readmit", lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1], e.g. filter.readmit=0.5 (0: never)")],
    "none": [],
}


def check_train_config(cfg: DictConfig, cuda_available: bool) -> None:
    """Raise ConfigError for the first value that cannot work."""
    for key, ok, must in _RULES:
        check_value(cfg, key, ok, must)
    name = cfg.filter.get("name")
    if name not in _FILTER_RULES:
        raise ConfigError(f"filter.name={name!r}: unknown filter; choose filter=<{' | '.join(_FILTER_RULES)}>")
    for key, ok, must in _FILTER_RULES[name]:
        check_value(cfg, f"filter.{key}", ok, must)
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
    _check_filter_builds(cfg)
    if name in ("running_quantile", "timestep", "caption", "item") and cfg.filter.warmup > cfg.filter.window:
        raise ConfigError(f"filter.warmup={cfg.filter.warmup} > filter.window={cfg.filter.window}: the filter would "
                          "never start; lower filter.warmup or raise filter.window")
    if cfg.logger.name == "wandb" and cfg.logger.get("mode") not in ("offline", "online", "disabled"):
        raise ConfigError(f"logger.mode={cfg.logger.get('mode')!r}: must be offline, online or disabled")


def _check_filter_builds(cfg: DictConfig) -> None:
    """The policy's own checks across its fields (e.g. filter.release <= filter.margin, update_with=kept only
    with a robust statistic) and its fields' names, at start: the policy is built once, as the loop will."""
    from launch.builders import build_filter
    try:
        build_filter(cfg.filter, num_train_timesteps=1000)
    except TypeError as e:                         # a key the policy has no field for
        raise ConfigError(f"filter={cfg.filter.name}: {e}; see conf/filter/{cfg.filter.name}.yaml for its keys") from e
    except ValueError as e:
        raise ConfigError(str(e)) from e


def check_value(cfg, key, ok, must):
    try:
        value = _get(cfg, key)
    except Exception as e:  # missing key or an interpolation that does not resolve
        raise ConfigError(f"{key}: {e}") from None
    if not ok(value):
        raise ConfigError(f"{key}={value!r} is invalid: must be {must}")
