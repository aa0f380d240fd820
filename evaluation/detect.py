"""Score prompts with a pipeline: the detectors of filtering.detection, batched over prompts and generations."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from memfilter.filtering.detection import DETECTORS, detection_scores, trajectory_scores
from memfilter.train.families import from_pipeline


@dataclass
class DetectionRun:
    """What `run_detectors` measured.

    per_step: {detector: [P, n, k]} scores per prompt, generation and step.
    seconds: {detector: wall seconds of its own pass over every prompt}.
    timesteps: the k sampling timesteps the steps were taken at (the schedule's first k).
    """
    per_step: dict[str, torch.Tensor]
    seconds: dict[str, float] = field(default_factory=dict)
    timesteps: list[int] = field(default_factory=list)


class PipelineTrajectory(NamedTuple):
    """What the trajectory tools (detection, explanation, mitigation) take from a pipeline."""
    family: object                      # train.families Family over the pipeline's components
    scheduler: object                   # a copy of the pipeline's scheduler (set_timesteps mutates it)
    resolution: int                     # image size in pixels
    latent_shape: tuple                 # (C, h, w) of one latent
    uncond: dict                        # the empty prompt's conditioning at that size, batch 1


def pipeline_trajectory(pipe, resolution: int | None = None) -> PipelineTrajectory:
    """The family, a scheduler copy, the resolution (default the pipeline's native one), the latent shape and the
    empty prompt's conditioning of `pipe`."""
    family = from_pipeline(pipe)
    res = resolution or family.native_resolution()
    f = family.vae_scale_factor()
    return PipelineTrajectory(family, type(pipe.scheduler).from_config(pipe.scheduler.config), res,
                              (pipe.unet.config.in_channels, res // f, res // f), family.uncond_conditioning(res))


def end_token_positions(family, prompts: list[str]) -> torch.Tensor:
    """[P] index of each prompt's first end token in the family's (first) tokenizer's ids."""
    ids = family.tokenize_fn()(prompts)["input_ids"]                          # [P, L]
    eos = family.c.tokenizer.eos_token_id
    is_end = ids == eos
    if not bool(is_end.any(1).all()):
        raise ValueError("a prompt's token ids hold no end token: the tokenizer has no eos_token_id in its output")
    return is_end.int().argmax(1)


@torch.no_grad()
def run_detectors(pipe, prompts: list[str], *, detectors: list[str] | tuple[str, ...] = ("magnitude",),
                  num_generations: int = 4, num_steps: int = 1, num_inference_steps: int = 50,
                  guidance_scale: float = 7.5, seed: int = 0, batch_size: int = 16, resolution: int | None = None,
                  chunk: int = 64) -> DetectionRun:
    """Every detector over `prompts`, each in its own timed pass (see filtering.detection for the definitions).

    The pipeline's family (train.families) conditions the prompts as the pipeline does (SDXL: both text encoders,
    pooled embeddings, time ids of the full image); the trajectory uses a copy of the pipeline's own scheduler.

    Args:
        pipe: a loaded diffusers pipeline (SD 1.x/2.x or SDXL).
        prompts: the prompts.
        detectors: any of filtering.detection.DETECTORS. Default ("magnitude",).
        num_generations, num_steps, num_inference_steps, guidance_scale, seed, batch_size: as
            filtering.detection.trajectory_scores (defaults 4, 1, 50, 7.5, 0, 16).
        resolution: image size; default the pipeline's native one.
        chunk: prompts encoded at once. Default 64.
    """
    family, scheduler, res, shape, uncond = pipeline_trajectory(pipe, resolution)
    kw = dict(num_generations=num_generations, num_steps=num_steps, num_inference_steps=num_inference_steps,
              guidance_scale=guidance_scale, seed=seed, batch_size=batch_size)
    run = DetectionRun(per_step={})
    for d in detectors:
        parts, start = [], time.perf_counter()
        for i in tqdm(range(0, len(prompts), chunk), desc=f"detect {d}", unit="chunk"):
            part = prompts[i:i + chunk]
            ends = end_token_positions(family, part) if d == "bright_ending" else None
            parts.append(trajectory_scores(pipe.unet, scheduler, family.prompt_conditioning(part, res), uncond, shape,
                                           detectors=(d,), end_positions=ends, index_offset=i, **kw)[d])
        run.per_step[d] = torch.cat(parts) if parts else torch.zeros(0, num_generations, num_steps)
        run.seconds[d] = time.perf_counter() - start
    scheduler.set_timesteps(num_inference_steps)
    run.timesteps = [int(t) for t in scheduler.timesteps[:num_steps]]
    return run


def score_prompts(pipe, prompts: list[str], **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Wen et al.'s detection alone: (scores [P], magnitudes [P, n, k]); run_detectors' keyword arguments."""
    mags = run_detectors(pipe, prompts, detectors=("magnitude",), **kw).per_step["magnitude"]
    return detection_scores(mags), mags


__all__ = ["DETECTORS", "DetectionRun", "PipelineTrajectory", "end_token_positions", "pipeline_trajectory",
           "run_detectors", "score_prompts"]
