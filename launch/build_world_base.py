"""Rebuild the toy world's base model (toyworld/assets/world-base), the stand-in for a pretrained Stable Diffusion.

    python launch/build_world_base.py                          # the shipped weights: ~20 minutes on 2 CPU cores
    python launch/build_world_base.py output_dir=/tmp/my-base unet_steps=2000

Trains the VAE, then the UNet and text encoder on fresh, never-duplicated items of the world
(toyworld/base.py), and saves the pipeline with save_pretrained (safetensors) plus world_base.json
(its measurements: VAE PSNR, latent scaling factor, prompt fidelity during training).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from memfilter.launch.config_check import check_value, is_int, run_or_exit  # noqa: E402

_RULES = [(k, lambda v: is_int(v) and v >= 1, "an integer >= 1")
          for k in ("vae_steps", "unet_steps", "batch_size", "eval_every")]


def run(cfg: DictConfig) -> Path:
    import torch

    from memfilter.toyworld.base import ASSET_DIR, BaseArgs, build_world_base

    for key, ok, must in _RULES:
        check_value(cfg, key, ok, must)
    logging.getLogger("memfilter").setLevel(logging.INFO)
    torch.set_num_threads(cfg.num_threads or torch.get_num_threads())
    values = OmegaConf.to_container(cfg, resolve=True)
    args = BaseArgs(**{f.name: values[f.name] for f in dataclasses.fields(BaseArgs) if f.name in values})
    return build_world_base(cfg.output_dir or ASSET_DIR, args)


@hydra.main(version_base="1.3", config_path="../conf", config_name="build_world_base")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
