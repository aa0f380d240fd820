"""Model components shared by every family: what a run holds, LoRA adapters, and tiny parts built from config.

A family (train.families) knows how to load, encode, denoise and export its components; this module only holds
them. Weights load only through `from_pretrained` (safetensors).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig

# SD v1's training schedule; the tiny models use it too so that timesteps mean the same thing.
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, steps_offset=1)


@dataclass
class Components:
    """The parts of a text-to-image model a run uses, whatever its family.

    tokenizer, text_encoder, vae, unet: as in every diffusers pipeline of the family.
    noise_scheduler: the training schedule (DDPMScheduler over the base model's betas and prediction_type).
    family: the train.families name ("sd", "sdxl"), read from model_index.json when loaded.
    tokenizer_2, text_encoder_2: SDXL's second text encoder (None for SD 1.x/2.x).
    scheduler: the base model's sampling scheduler, exported as it is; None (a model built from config): DDIM
        over the training schedule.
    pipeline_config: the base pipeline's own flags (SDXL: force_zeros_for_empty_prompt).
    ema_start: the UNet an EMA starts from when it is not the trained one (diffusers' non_ema_revision: the
        trained UNet from that revision, the EMA from `revision`); None: the trained UNet's weights.
    """

    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    family: str = "sd"
    tokenizer_2: Any = None
    text_encoder_2: torch.nn.Module | None = None
    scheduler: Any = None
    pipeline_config: dict = field(default_factory=dict)
    ema_start: torch.nn.Module | None = None


def add_lora(unet: UNet2DConditionModel, rank: int, alpha: float | None = None,
             target_modules: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")) -> None:
    """Freeze the UNet and add trainable LoRA adapters to its attention projections (diffusers' recipe).

    Args:
        unet: the UNet to adapt, in place.
        rank: LoRA rank.
        alpha: LoRA alpha. Default: rank (scale 1).
        target_modules: module names that get adapters. Default: the attention projections.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                target_modules=list(target_modules)))


def check_tiny_resolution(resolution: int, vae_channels, block_out_channels) -> int:
    """The latent size of a tiny model; stops with a message when the resolution does not divide."""
    down_factor = 2 ** (len(vae_channels) - 1)
    if resolution % (down_factor * 2 ** (len(block_out_channels) - 1)):
        raise ValueError(f"resolution={resolution} must be divisible by the VAE and UNet downsampling "
                         f"({down_factor} x {2 ** (len(block_out_channels) - 1)})")
    return resolution // down_factor


def tiny_vae(resolution: int, vae_channels, latent_channels: int, layers_per_block: int) -> AutoencoderKL:
    """SD's AutoencoderKL wiring at a small width; it downsamples by 2**(len(vae_channels)-1)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=tuple(vae_channels),
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        layers_per_block=layers_per_block, norm_num_groups=min(32, vae_channels[0]), sample_size=resolution)


def tiny_text_config(tokenizer, hidden: int, layers: int, heads: int, max_length: int) -> CLIPTextConfig:
    """A CLIP text encoder's config sized `hidden`, over the tokenizer's vocabulary and special tokens."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=hidden)


def tiny_unet(latent_size: int, latent_channels: int, layers_per_block: int, block_out_channels,
              cross_attention_dim: int, attention_head_dim: int, cross_attention_levels: int,
              attention_at_top: bool = True, **extra) -> UNet2DConditionModel:
    """A UNet2DConditionModel with cross-attention at `cross_attention_levels` levels: the top ones (SD) or the
    bottom ones (SDXL, attention_at_top=False); `extra` adds a family's own arguments (SDXL's added embedding)."""
    n = len(block_out_channels)
    a = max(1, min(n, cross_attention_levels))
    down = ("CrossAttnDownBlock2D",) * a + ("DownBlock2D",) * (n - a) if attention_at_top else \
        ("DownBlock2D",) * (n - a) + ("CrossAttnDownBlock2D",) * a
    up = tuple(reversed([b.replace("Down", "Up") for b in down]))
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        layers_per_block=layers_per_block, block_out_channels=tuple(block_out_channels), down_block_types=down,
        up_block_types=up, cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
        norm_num_groups=min(32, block_out_channels[0]), **extra)
