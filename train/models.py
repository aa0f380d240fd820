"""Model components: Stable Diffusion from a local directory or hub id, or the tiny SD-shaped default.

Both paths give the same `Components` (tokenizer, text encoder, VAE, UNet, training noise scheduler),
so the loop never knows which it got. Weights load only through `from_pretrained` (safetensors).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from train.tokenizer import build_tiny_tokenizer

# SD v1's training schedule; the tiny model uses it too so that timesteps mean the same thing.
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, steps_offset=1)


@dataclass
class Components:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler


def load_pretrained(pretrained: str, revision: str | None = None, variant: str | None = None,
                    prediction_type: str | None = None) -> Components:
    """Components of a diffusers Stable Diffusion directory or hub id.

    Args:
        pretrained: local directory (as `save_pretrained` writes it) or hub id; with HF_HUB_OFFLINE=1
            a hub id loads from the local cache.
        revision: hub revision. Default None (main).
        variant: weights variant, e.g. "fp16". Default None.
        prediction_type: override the scheduler's prediction_type ("epsilon" or "v_prediction").
            Default None: keep what the model was trained with.
    """
    kw = dict(revision=revision)
    sched_kw = {} if prediction_type is None else {"prediction_type": prediction_type}
    return Components(
        tokenizer=CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kw),
        text_encoder=CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", variant=variant, **kw),
        vae=AutoencoderKL.from_pretrained(pretrained, subfolder="vae", variant=variant, **kw),
        unet=UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", variant=variant, **kw),
        noise_scheduler=DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **kw, **sched_kw),
    )


def build_tiny(resolution: int = 32, block_out_channels: tuple[int, ...] = (32, 64), layers_per_block: int = 1,
               cross_attention_dim: int = 32, attention_head_dim: int = 8, vae_channels: tuple[int, ...] = (32, 64),
               latent_channels: int = 4, text_layers: int = 2, text_heads: int = 4, max_length: int = 77,
               prediction_type: str = "epsilon", seed: int = 0, cross_attention_levels: int = 1,
               vae_layers_per_block: int = 1, words: list[str] | None = None) -> Components:
    """The SD-shaped default: the same classes and wiring as SD, sized to train on a laptop CPU.

    Args:
        resolution: image size in pixels. Default 32.
        block_out_channels: UNet channels per level; the first level has cross-attention. Default (32, 64).
        layers_per_block: resnets per UNet level. Default 1.
        cross_attention_dim: text embedding width (= text encoder hidden size). Default 32.
        attention_head_dim: UNet attention head size. Default 8.
        vae_channels: VAE channels per level; the VAE downsamples by 2**(len-1). Default (32, 64).
        latent_channels: VAE latent channels. Default 4 (SD's).
        text_layers: CLIP text encoder layers. Default 2.
        text_heads: CLIP text encoder heads. Default 4.
        max_length: tokenizer and position-embedding length. Default 77 (SD's).
        prediction_type: "epsilon" or "v_prediction". Default "epsilon".
        seed: initialisation seed; the same seed gives the same weights. Default 0.
        cross_attention_levels: how many UNet levels (from the top) have cross-attention. Default 1.
        vae_layers_per_block: resnets per VAE level. Default 1.
        words: the tokenizer's whole-word vocabulary. Default: train.tokenizer.DEFAULT_WORDS.
    """
    tokenizer = build_tiny_tokenizer(words, model_max_length=max_length)
    down_factor = 2 ** (len(vae_channels) - 1)
    if resolution % (down_factor * 2 ** (len(block_out_channels) - 1)):
        raise ValueError(f"resolution={resolution} must be divisible by the VAE and UNet downsampling "
                         f"({down_factor} x {2 ** (len(block_out_channels) - 1)})")
    with torch.random.fork_rng(devices=[]):  # init on CPU; leave the caller's RNG alone
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=cross_attention_dim, intermediate_size=cross_attention_dim * 4,
            num_hidden_layers=text_layers, num_attention_heads=text_heads, max_position_embeddings=max_length,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, projection_dim=cross_attention_dim))
        groups = min(32, vae_channels[0])
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=tuple(vae_channels),
            down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
            layers_per_block=vae_layers_per_block, norm_num_groups=groups, sample_size=resolution)
        n = len(block_out_channels)
        a = max(1, min(n, cross_attention_levels))
        unet = UNet2DConditionModel(
            sample_size=resolution // down_factor, in_channels=latent_channels, out_channels=latent_channels,
            layers_per_block=layers_per_block, block_out_channels=tuple(block_out_channels),
            down_block_types=("CrossAttnDownBlock2D",) * a + ("DownBlock2D",) * (n - a),
            up_block_types=("UpBlock2D",) * (n - a) + ("CrossAttnUpBlock2D",) * a,
            cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
            norm_num_groups=min(32, block_out_channels[0]))
    noise_scheduler = DDPMScheduler(**SD_SCHEDULER, prediction_type=prediction_type)
    return Components(tokenizer, text_encoder, vae, unet, noise_scheduler)


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


def build_pipeline(components: Components, unet: UNet2DConditionModel | None = None) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline over the components, with a DDIM sampler of the training schedule.

    The scheduler config records the training prediction_type, so a loaded pipeline samples correctly.
    """
    return StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=unet if unet is not None else components.unet,
        scheduler=DDIMScheduler.from_config(components.noise_scheduler.config, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
