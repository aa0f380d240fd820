"""Stable Diffusion 1.x/2.x: one CLIP text encoder, its last hidden state as the conditioning; epsilon or
v-prediction (the scheduler's prediction_type)."""
from __future__ import annotations

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from transformers import CLIPTextModel

from memfilter.train.families.base import Family
from memfilter.train.models import (SD_SCHEDULER, Components, check_tiny_resolution, tiny_text_config, tiny_unet,
                                    tiny_vae)
from memfilter.train.tokenizer import build_tiny_tokenizer


class StableDiffusion(Family):
    name = "sd"
    pipeline_class_name = "StableDiffusionPipeline"
    component_classes = {"tokenizer": "CLIPTokenizer", "text_encoder": "CLIPTextModel", "vae": "AutoencoderKL",
                         "unet": "UNet2DConditionModel"}

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> dict:
        """{"encoder_hidden_states": [B, L, D]}: the text encoder's last hidden state."""
        return {"encoder_hidden_states": self.c.text_encoder(tokens["input_ids"])[0]}

    def pipeline(self, unet=None) -> StableDiffusionPipeline:
        c = self.c
        return StableDiffusionPipeline(
            vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=unet if unet is not None else c.unet,
            scheduler=self.sampling_scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)


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
    latent_size = check_tiny_resolution(resolution, vae_channels, block_out_channels)
    with torch.random.fork_rng(devices=[]):  # init on CPU; leave the caller's RNG alone
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(tiny_text_config(tokenizer, cross_attention_dim, text_layers, text_heads,
                                                      max_length))
        vae = tiny_vae(resolution, vae_channels, latent_channels, vae_layers_per_block)
        unet = tiny_unet(latent_size, latent_channels, layers_per_block, block_out_channels, cross_attention_dim,
                         attention_head_dim, cross_attention_levels)
    noise_scheduler = DDPMScheduler(**SD_SCHEDULER, prediction_type=prediction_type)
    return Components(tokenizer, text_encoder, vae, unet, noise_scheduler, family="sd")
