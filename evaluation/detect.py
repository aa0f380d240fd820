"""Score prompts with a pipeline: Wen et al.'s detection, batched over prompts (filtering.detection does the math)."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from memfilter.filtering.detection import detection_scores, trajectory_magnitudes
from memfilter.train.families import from_pipeline


@torch.no_grad()
def score_prompts(pipe, prompts: list[str], *, num_generations: int = 4, num_steps: int = 1,
                  num_inference_steps: int = 50, guidance_scale: float = 7.5, seed: int = 0, batch_size: int = 16,
                  resolution: int | None = None, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [P], magnitudes [P, n, k]) for prompts; see filtering.detection for the definition.

    The pipeline's family (train.families) conditions the prompts as the pipeline does (SDXL: both text
    encoders, pooled embeddings, time ids of the full image); the trajectory uses the pipeline's own scheduler.
    """
    family = from_pipeline(pipe)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)     # a copy: set_timesteps mutates it
    res = resolution or family.native_resolution()
    f = family.vae_scale_factor()
    shape = (pipe.unet.config.in_channels, res // f, res // f)
    uncond = family.uncond_conditioning(res)
    mags = []
    for i in tqdm(range(0, len(prompts), chunk), desc="detect", unit="chunk"):
        cond = family.prompt_conditioning(prompts[i:i + chunk], res)
        m = trajectory_magnitudes(pipe.unet, scheduler, cond, uncond, shape, num_generations=num_generations,
                                  num_steps=num_steps, num_inference_steps=num_inference_steps,
                                  guidance_scale=guidance_scale, seed=seed, batch_size=batch_size,
                                  index_offset=i)
        mags.append(m)
    mags = torch.cat(mags) if mags else torch.zeros(0, num_generations, num_steps)
    return detection_scores(mags), mags
