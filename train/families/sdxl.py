"""Stable Diffusion XL: two CLIP text encoders, added conditions.

The conditioning is built as diffusers' StableDiffusionXLPipeline and train_text_to_image_sdxl.py build it:
- encoder_hidden_states: both encoders' penultimate hidden states, concatenated on the feature axis [B, L, D1+D2];
- text_embeds: the second encoder's pooled, projected output [B, P];
- time_ids: (original height, original width, crop top, crop left, target height, target width) per sample [B, 6]:
  in training the image's size before resizing and where it was cropped; for prompts (detection, generation)
  the full target image, uncropped, as the pipeline does by default.
The unconditional text is zeros where the pipeline's `force_zeros_for_empty_prompt` is set (SDXL base's default),
else the empty caption encoded: the magnitude's reference and the caption dropout use what sampling uses.
"""
from __future__ import annotations

import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from memfilter.train.families.base import Family, Tokenize
from memfilter.train.models import (SD_SCHEDULER, Components, check_tiny_resolution, tiny_text_config, tiny_unet,
                                    tiny_vae)
from memfilter.train.tokenizer import build_tiny_tokenizer


class StableDiffusionXL(Family):
    name = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    component_classes = {"tokenizer": "CLIPTokenizer", "tokenizer_2": "CLIPTokenizer",
                         "text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection",
                         "vae": "AutoencoderKL", "unet": "UNet2DConditionModel"}
    text_encoder_names = ("text_encoder", "text_encoder_2")
    pipeline_flags = {"force_zeros_for_empty_prompt": True}

    def tokenize_fn(self) -> Tokenize:
        return Tokenize(input_ids=self.c.tokenizer, input_ids_2=self.c.tokenizer_2)

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> dict:
        """{"encoder_hidden_states": [B, L, D1 + D2], "text_embeds": [B, P]}."""
        h1 = self.c.text_encoder(tokens["input_ids"], output_hidden_states=True).hidden_states[-2]
        out2 = self.c.text_encoder_2(tokens["input_ids_2"], output_hidden_states=True)
        return {"encoder_hidden_states": torch.cat([h1, out2.hidden_states[-2]], dim=-1),
                "text_embeds": out2.text_embeds}

    @torch.no_grad()
    def empty_text(self, device=None) -> dict:
        text = super().empty_text(device)
        if self.c.pipeline_config.get("force_zeros_for_empty_prompt", True):
            text = {k: torch.zeros_like(v) for k, v in text.items()}
        return text

    def unet_kwargs(self, text: dict, *, resolution: int, original_sizes: torch.Tensor | None = None,
                    crop_top_lefts: torch.Tensor | None = None) -> dict:
        """SDXL's UNet arguments: the text states plus added_cond_kwargs {text_embeds, time_ids [B, 6]}."""
        e = text["encoder_hidden_states"]
        b, dev = e.shape[0], e.device
        full = torch.tensor([resolution, resolution], device=dev)
        orig = full.expand(b, 2) if original_sizes is None else original_sizes.to(dev)
        crop = torch.zeros(b, 2, device=dev, dtype=torch.long) if crop_top_lefts is None else crop_top_lefts.to(dev)
        time_ids = torch.cat([orig.to(e.dtype), crop.to(e.dtype), full.to(e.dtype).expand(b, 2)], dim=1)
        return {"encoder_hidden_states": e,
                "added_cond_kwargs": {"text_embeds": text["text_embeds"], "time_ids": time_ids}}

    def pipeline(self, unet=None) -> StableDiffusionXLPipeline:
        c = self.c
        return StableDiffusionXLPipeline(
            vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2, tokenizer=c.tokenizer,
            tokenizer_2=c.tokenizer_2, unet=unet if unet is not None else c.unet, scheduler=self.sampling_scheduler(),
            force_zeros_for_empty_prompt=c.pipeline_config.get("force_zeros_for_empty_prompt", True),
            add_watermarker=False)


def build_tiny_sdxl(resolution: int = 32, block_out_channels: tuple[int, ...] = (32, 64), layers_per_block: int = 1,
                    cross_attention_dim: int = 64, attention_head_dim: int = 8,
                    vae_channels: tuple[int, ...] = (32, 64), latent_channels: int = 4, text_layers: int = 2,
                    text_heads: int = 4, max_length: int = 77, prediction_type: str = "epsilon", seed: int = 0,
                    cross_attention_levels: int = 1, vae_layers_per_block: int = 1, words: list[str] | None = None,
                    addition_time_embed_dim: int = 8) -> Components:
    """An SDXL-shaped model built from config: SDXL's classes and wiring (two text encoders, text_time added
    embedding, linear projections, no attention at the top UNet level), sized for a laptop CPU.

    Args: as train.families.sd.build_tiny, and
        cross_attention_dim: the concatenated text width; each encoder has half of it. Default 64.
        cross_attention_levels: how many UNet levels (from the bottom, as in SDXL) have cross-attention. Default 1.
        addition_time_embed_dim: width of each of the 6 time-id embeddings. Default 8.
    """
    if cross_attention_dim % 2:
        raise ValueError(f"cross_attention_dim={cross_attention_dim}: SDXL splits it between two text encoders; "
                         "give an even width")
    tokenizer = build_tiny_tokenizer(words, model_max_length=max_length)
    tokenizer_2 = build_tiny_tokenizer(words, model_max_length=max_length)
    latent_size = check_tiny_resolution(resolution, vae_channels, block_out_channels)
    half = cross_attention_dim // 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(tiny_text_config(tokenizer, half, text_layers, text_heads, max_length))
        text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(tokenizer_2, half, text_layers, text_heads,
                                                                      max_length))
        vae = tiny_vae(resolution, vae_channels, latent_channels, vae_layers_per_block)
        unet = tiny_unet(latent_size, latent_channels, layers_per_block, block_out_channels, cross_attention_dim,
                         attention_head_dim, cross_attention_levels, attention_at_top=False,
                         use_linear_projection=True, addition_embed_type="text_time",
                         addition_time_embed_dim=addition_time_embed_dim,
                         projection_class_embeddings_input_dim=half + 6 * addition_time_embed_dim)
    noise_scheduler = DDPMScheduler(**SD_SCHEDULER, prediction_type=prediction_type)
    return Components(tokenizer, text_encoder, vae, unet, noise_scheduler, family="sdxl", tokenizer_2=tokenizer_2,
                      text_encoder_2=text_encoder_2, pipeline_config={"force_zeros_for_empty_prompt": True})
