"""Score prompts with a pipeline: Wen et al.'s detection, batched over prompts (filtering.detection does the math)."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from filtering.detection import detection_scores, trajectory_magnitudes


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """[P, L, D] text embeddings as the pipeline conditions on them (padded to the tokenizer length)."""
    tok = pipe.tokenizer
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = tok(prompts[i:i + batch_size], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(pipe.device)
        out.append(pipe.text_encoder(ids)[0])
    return torch.cat(out)


@torch.no_grad()
def score_prompts(pipe, prompts: list[str], *, num_generations: int = 4, num_steps: int = 1,
                  num_inference_steps: int = 50, guidance_scale: float = 7.5, seed: int = 0, batch_size: int = 16,
                  resolution: int | None = None, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [P], magnitudes [P, n, k]) for prompts; see filtering.detection for the definition."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    res = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    shape = (pipe.unet.config.in_channels, res // pipe.vae_scale_factor, res // pipe.vae_scale_factor)
    uncond = encode_prompts(pipe, [""])
    mags = []
    for i in tqdm(range(0, len(prompts), chunk), desc="detect", unit="chunk"):
        emb = encode_prompts(pipe, prompts[i:i + chunk])
        m = trajectory_magnitudes(pipe.unet, scheduler, emb, uncond, shape, num_generations=num_generations,
                                  num_steps=num_steps, num_inference_steps=num_inference_steps,
                                  guidance_scale=guidance_scale, seed=seed, batch_size=batch_size,
                                  index_offset=i)
        mags.append(m)
    mags = torch.cat(mags) if mags else torch.zeros(0, num_generations, num_steps)
    return detection_scores(mags), mags
