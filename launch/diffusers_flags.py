"""diffusers' command-line flags for the training app: `--flag=value` and `--flag value` as diffusers'
train_text_to_image.py and train_text_to_image_sdxl.py take them, turned into Hydra overrides before Hydra parses
the command line. Hydra overrides work beside them; a flag memfilter cannot honour stops with the reason.

    python launch/train.py --pretrained_model_name_or_path=<dir or hub id> --train_data_dir=<folder> \\
        --resolution=512 --train_batch_size=8 --learning_rate=1e-5 --output_dir=<dir> filter=fixed
"""
from __future__ import annotations

# flag -> (kind, config key or reason). kind: "value" (one value), "true" (a store_true flag), "list" (nargs=+),
# "choice" (the value picks a config group option: key is a dict value -> overrides), "no" (not honoured: why).
FLAGS: dict[str, tuple[str, object]] = {
    "pretrained_model_name_or_path": ("value", "model.pretrained"),
    "pretrained_vae_model_name_or_path": ("value", "model.vae"),
    "revision": ("value", "model.revision"),
    "variant": ("value", "model.variant"),
    "prediction_type": ("value", "model.prediction_type"),
    "dataset_name": ("data", ["data=hf", "data.path={}"]),
    "train_data_dir": ("data", ["data=imagefolder", "data.path={}"]),
    "image_column": ("value", "data.image_column"),
    "caption_column": ("value", "data.caption_column"),
    "cache_dir": ("value", "data.cache_dir"),
    "output_dir": ("value", "output_dir"),
    "seed": ("value", "seed"),
    "resolution": ("value", "resolution"),
    "center_crop": ("true", "center_crop"),
    "random_flip": ("true", "random_flip"),
    "image_interpolation_mode": ("value", "interpolation"),
    "train_batch_size": ("value", "train_batch_size"),
    "num_train_epochs": ("value", "num_train_epochs"),
    "max_train_steps": ("value", "max_train_steps"),
    "gradient_accumulation_steps": ("value", "gradient_accumulation_steps"),
    "gradient_checkpointing": ("true", "gradient_checkpointing"),
    "learning_rate": ("value", "optim.learning_rate"),
    "scale_lr": ("true", "optim.scale_lr"),
    "lr_scheduler": ("value", "optim.lr_scheduler"),
    "lr_warmup_steps": ("value", "optim.lr_warmup_steps"),
    "adam_beta1": ("value", "optim.adam_beta1"),
    "adam_beta2": ("value", "optim.adam_beta2"),
    "adam_weight_decay": ("value", "optim.adam_weight_decay"),
    "adam_epsilon": ("value", "optim.adam_epsilon"),
    "max_grad_norm": ("value", "max_grad_norm"),
    "snr_gamma": ("value", "snr_gamma"),
    "noise_offset": ("value", "noise_offset"),
    "proportion_empty_prompts": ("value", "proportion_empty_prompts"),
    "use_ema": ("true", "use_ema"),
    "mixed_precision": ("value", "mixed_precision"),
    "dataloader_num_workers": ("value", "dataloader_num_workers"),
    "checkpointing_steps": ("value", "checkpointing_steps"),
    "checkpoints_total_limit": ("value", "checkpoints_total_limit"),
    "resume_from_checkpoint": ("value", "resume_from_checkpoint"),
    "validation_prompts": ("list", "validation_prompts"),
    "validation_prompt": ("list", "validation_prompts"),
    "num_validation_images": ("value", "num_validation_images"),
    "tracker_project_name": ("value", "logger.project"),
    "report_to": ("choice", {"wandb": ["logger=wandb"], "tensorboard": ["logger=tensorboard"], "all": ["logger=all"],
                             "none": ["logger=none"]}),
    "local_rank": ("ignore", "set by accelerate launch"),
    "allow_tf32": ("true", "allow_tf32"),
    "enable_xformers_memory_efficient_attention": ("ignore", "diffusers uses torch's scaled-dot-product attention"),
    "logging_dir": ("ignore", "trackers write inside output_dir"),
    "max_train_samples": ("value", "max_train_samples"),
    "validation_epochs": ("value", "validation_epochs"),
    "dataset_config_name": ("value", "data.config_name"),
    "non_ema_revision": ("value", "model.non_ema_revision"),
    "use_8bit_adam": ("true", "optim.use_8bit_adam"),
    "offload_ema": ("true", "offload_ema"),
    "foreach_ema": ("true", "foreach_ema"),
    "input_perturbation": ("value", "input_perturbation"),
    "dream_training": ("true", "dream_training"),
    "dream_detail_preservation": ("value", "dream_detail_preservation"),
    "timestep_bias_strategy": ("value", "timestep_bias_strategy"),
    "timestep_bias_multiplier": ("value", "timestep_bias_multiplier"),
    "timestep_bias_begin": ("value", "timestep_bias_begin"),
    "timestep_bias_end": ("value", "timestep_bias_end"),
    "timestep_bias_portion": ("value", "timestep_bias_portion"),
    "enable_npu_flash_attention": ("ignore", "no NPU support"),
    "push_to_hub": ("no", "no hub access from the training app: upload output_dir with huggingface-cli afterwards"),
    "hub_token": ("no", "no hub access from the training app"),
    "hub_model_id": ("no", "no hub access from the training app"),
}
# Hydra's own flags pass through untouched
HYDRA_FLAGS = ("--cfg", "--package", "--resolve", "--info", "--run", "--multirun", "--config-path",
               "--config-name", "--config-dir", "--shell-completion", "--hydra-help", "--help", "--version",
               "--experimental-rerun")


class FlagError(ValueError):
    pass


def _quote(value: str) -> str:
    """A value as Hydra's grammar reads it: quoted when it holds characters Hydra would parse."""
    if any(c in value for c in " ,{}[]()'\"=:*$\\"):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def translate(argv: list[str]) -> list[str]:
    """Command-line arguments with diffusers' flags turned into Hydra overrides (the rest as they are)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--") or arg.split("=")[0] in HYDRA_FLAGS or arg.startswith(HYDRA_FLAGS):
            out.append(arg)
            continue
        name, _, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name not in FLAGS:
            raise FlagError(f"--{name}: not a flag of diffusers' train_text_to_image.py that memfilter knows; "
                            "use a config key instead (python launch/train.py --cfg job lists them)")
        kind, target = FLAGS[name]
        values = [value] if value else []
        if kind in ("value", "data", "choice", "list") and not values:   # space-separated value(s)
            while i < len(argv) and not argv[i].startswith("--") and (kind == "list" or not values):
                values.append(argv[i])
                i += 1
            if not values:
                raise FlagError(f"--{name}: needs a value")
        out += _overrides(name, kind, target, values)
    return out


def _overrides(name: str, kind: str, target, values: list[str]) -> list[str]:
    if kind == "no":
        raise FlagError(f"--{name}: {target}")
    if kind == "ignore":
        return []
    if kind == "true":
        return [f"{target}=true"]
    if kind == "value":
        return [f"{target}={_quote(values[0])}"]
    if kind == "list":
        return [f"{target}=[{','.join(_quote(v) for v in values)}]"]
    if kind == "data":
        return [t.format(_quote(values[0])) for t in target]
    if values[0] not in target:
        raise FlagError(f"--{name}={values[0]}: choose one of {', '.join(target)}")
    return list(target[values[0]])


def flag_table() -> str:
    """The README's table: every flag and what it sets (or why it is not honoured)."""
    rows = ["| diffusers flag | memfilter |", "| --- | --- |"]
    for name, (kind, target) in FLAGS.items():
        if kind in ("value", "true", "list"):
            what = f"`{target}`"
        elif kind == "data":
            what = " ".join(f"`{t.format('<value>')}`" for t in target)
        elif kind == "choice":
            what = "; ".join(f"{k}: `{' '.join(v)}`" for k, v in target.items())
        else:
            what = f"ignored: {target}" if kind == "ignore" else f"refused: {target}"
        rows.append(f"| `--{name}` | {what} |")
    return "\n".join(rows)
