"""The seam every model family implements: what the training step, the magnitude, detection, validation and
export need from a model, and nothing else.

A family wraps a `Components` and answers:
- `tokenize(captions)` -> token ids by name (runs in dataloader workers: picklable);
- `encode_text(tokens)` -> the text part of the conditioning; `empty_text()` -> the unconditional one, as the
  family's pipeline uses it for classifier-free guidance;
- `unet_kwargs(text, ...)` -> the denoiser's keyword arguments (filtering.conditioning), adding what the family
  conditions on besides text (SDXL: pooled embeddings and time ids);
- `encode_images(pixels, generator)` -> latents the denoiser sees;
- `prompt_conditioning(prompts, resolution)` -> conditioning of prompts as the pipeline would build it;
- `pipeline(unet)` -> the family's diffusers pipeline over the components (the base model's scheduler);
  `save_lora(...)` -> adapters in diffusers' layout.
Loading reads the family from the model's model_index.json (train.families.load_pretrained).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import ClassVar

import diffusers
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from memfilter.filtering.conditioning import expand
from memfilter.train.data.collate import Tokenize
from memfilter.train.data.transforms import to_model_range
from memfilter.train.models import Components


class Family:
    """SD-like behaviour shared by the families; subclasses override what differs."""

    name: ClassVar[str]
    pipeline_class_name: ClassVar[str]              # model_index.json's _class_name
    # subfolder -> transformers/diffusers class name loaded from it (tokenizers have no weights variant)
    component_classes: ClassVar[dict[str, str]]
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    pipeline_flags: ClassVar[dict[str, object]] = {}   # model_index.json flags the pipeline takes, with defaults

    def __init__(self, components: Components):
        self.c = components

    # --- loading ---------------------------------------------------------------------------------------
    @classmethod
    def load(cls, pretrained: str, index: dict, *, revision: str | None = None, variant: str | None = None,
             prediction_type: str | None = None) -> Components:
        """Components of a diffusers directory or hub id whose model_index.json is `index`."""
        import transformers

        parts = {}
        for sub, klass in cls.component_classes.items():
            lib = transformers if hasattr(transformers, klass) and not hasattr(diffusers, klass) else diffusers
            kw = {} if sub.startswith("tokenizer") else {"variant": variant}
            parts[sub] = getattr(lib, klass).from_pretrained(pretrained, subfolder=sub, revision=revision, **kw)
        sched_kw = {} if prediction_type is None else {"prediction_type": prediction_type}
        noise = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", revision=revision, **sched_kw)
        sampler_cls = getattr(diffusers, (index.get("scheduler") or [None, ""])[1] or "", None)
        sampler = None if sampler_cls is None else sampler_cls.from_pretrained(
            pretrained, subfolder="scheduler", revision=revision, **sched_kw)
        flags = {k: index.get(k, d) for k, d in cls.pipeline_flags.items()}
        return Components(**parts, noise_scheduler=noise, family=cls.name, scheduler=sampler, pipeline_config=flags)

    # --- frozen parts ----------------------------------------------------------------------------------
    def frozen_names(self) -> tuple[str, ...]:
        return ("vae",) + self.text_encoder_names

    def prepare_frozen(self, device, dtype: torch.dtype) -> None:
        """Frozen parts on `device` in `dtype` (a VAE that asks for it, like SDXL's, stays in fp32 under fp16)."""
        for name in self.frozen_names():
            module = getattr(self.c, name).requires_grad_(False)
            upcast = name == "vae" and dtype == torch.float16 and module.config.get("force_upcast", False)
            module.to(device, dtype=torch.float32 if upcast else dtype)

    def frozen_copy(self, unet) -> Components:
        """The components with deep copies of the frozen parts (kept in full precision for the export)."""
        return dataclasses.replace(self.c, unet=unet,
                                   **{n: copy.deepcopy(getattr(self.c, n)) for n in self.frozen_names()})

    # --- conditioning ----------------------------------------------------------------------------------
    def text_device(self) -> torch.device:
        return next(self.c.text_encoder.parameters()).device

    def tokenize_fn(self) -> Tokenize:
        return Tokenize(input_ids=self.c.tokenizer)

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> dict:
        raise NotImplementedError

    @torch.no_grad()
    def empty_text(self, device=None) -> dict:
        """The unconditional text conditioning (batch 1) as the family's pipeline uses it for guidance."""
        dev = device or self.text_device()
        return self.encode_text({k: v.to(dev) for k, v in self.tokenize_fn()([""]).items()})

    def unet_kwargs(self, text: dict, *, resolution: int, original_sizes: torch.Tensor | None = None,
                    crop_top_lefts: torch.Tensor | None = None) -> dict:
        """The denoiser's keyword arguments for `text` (SD: the text conditioning as it is)."""
        return text

    @torch.no_grad()
    def prompt_conditioning(self, prompts: list[str], resolution: int, batch_size: int = 64) -> dict:
        """Conditioning of prompts as the pipeline builds it (full image, no crop), P rows."""
        from memfilter.filtering.conditioning import cat

        dev = self.text_device()
        parts = [self.encode_text({k: v.to(dev) for k, v in self.tokenize_fn()(prompts[i:i + batch_size]).items()})
                 for i in range(0, len(prompts), batch_size)]
        return self.unet_kwargs(cat(parts), resolution=resolution)

    def uncond_conditioning(self, resolution: int) -> dict:
        """The empty prompt's denoiser arguments at full image size, batch 1."""
        return self.unet_kwargs(self.empty_text(), resolution=resolution)

    def uncond_like(self, empty: dict, b: int, **sizes) -> dict:
        """The empty prompt's arguments for a batch of b with the batch's own size conditions."""
        return self.unet_kwargs(expand(empty, b), **sizes)

    # --- images ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None, *,
                      sample: bool = True) -> torch.Tensor:
        """[B, 3, H, W] uint8 (as the collate passes them) or floats in [-1, 1] -> float32 latents [B, C, h, w] as the
        denoiser sees them: drawn from the VAE's posterior with `generator`, or its mean (sample=False:
        deterministic, as the curation pass scores)."""
        vae = self.c.vae
        dist = vae.encode(to_model_range(pixels).to(vae.dtype)).latent_dist
        latents = (dist.sample(generator) if sample else dist.mode()).float()
        shift = vae.config.get("shift_factor", None)
        if shift is not None:
            latents = latents - shift
        return latents * vae.config.scaling_factor

    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.c.vae.config.block_out_channels) - 1)

    def native_resolution(self) -> int:
        """Pixels the UNet was built for: sample_size x the VAE's downsampling factor."""
        return int(self.c.unet.config.sample_size) * self.vae_scale_factor()

    # --- pipeline --------------------------------------------------------------------------------------
    def sampling_scheduler(self):
        """The base model's sampler (its class and config); DDIM over the training schedule when built from
        config. The training prediction_type is recorded so that a loaded pipeline samples correctly."""
        ptype = self.c.noise_scheduler.config.prediction_type
        if self.c.scheduler is not None:
            return type(self.c.scheduler).from_config(self.c.scheduler.config, prediction_type=ptype)
        return DDIMScheduler.from_config(self.c.noise_scheduler.config, set_alpha_to_one=False)

    def pipeline(self, unet=None):
        raise NotImplementedError

    def save_lora(self, out_dir, unet_lora_layers: dict) -> None:
        getattr(diffusers, self.pipeline_class_name).save_lora_weights(
            save_directory=out_dir, unet_lora_layers=unet_lora_layers, safe_serialization=True)
