"""What a training step draws: the noise, the timesteps, and x_t and the target built from them, with diffusers'
recipes (noise offset, input perturbation, timestep bias, DREAM) as settings of the loop.

`NoiseArgs` holds the recipes' settings; TrainArgs inherits them, so they are flat config keys with diffusers'
names (`timestep_bias_strategy=later`, `dream_training=true`). Everything is drawn from the step's generator in a
fixed order (noise, noise offset, timesteps, input perturbation), so a resumed run draws what the uninterrupted one
drew, and a run without a recipe draws exactly what it drew before the recipe existed.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from memfilter.filtering.settings import int_at_least, num_in, setting

BIAS_STRATEGIES = ("none", "earlier", "later", "range")


@dataclass
class NoiseArgs:
    """diffusers' noise and timestep recipes (train_text_to_image.py and train_text_to_image_sdxl.py)."""

    noise_offset: float = setting(0.0, "a number >= 0", num_in(0, math.inf), "diffusers' noise offset")
    input_perturbation: float = setting(0.0, "a number >= 0, e.g. input_perturbation=0.1", num_in(0, math.inf),
                                        "perturb the noise x_t is made from, not the target (Ning et al. 2023)")
    timestep_bias_strategy: str = setting("none", f"one of {', '.join(BIAS_STRATEGIES)}",
                                          lambda v: v in BIAS_STRATEGIES,
                                          "draw timesteps with more weight on the earlier, later or a range of them")
    timestep_bias_multiplier: float = setting(1.0, "a number > 0, e.g. 2.0 (0.5 lowers the weight)",
                                              num_in(0, math.inf, lo_open=True), "weight of the biased timesteps")
    timestep_bias_begin: int = setting(0, "an integer >= 0", int_at_least(0),
                                       "first biased timestep with timestep_bias_strategy=range")
    timestep_bias_end: int = setting(1000, "an integer >= 1", int_at_least(1),
                                     "end (exclusive) of the biased timesteps with timestep_bias_strategy=range")
    timestep_bias_portion: float = setting(0.25, "a number in (0, 1]", num_in(0, 1, lo_open=True),
                                           "share of the timesteps biased by earlier/later")
    dream_training: bool = setting(False, "true or false", lambda v: isinstance(v, bool),
                                   "DREAM (Zhou et al. 2024): rectify x_t and the target with the model's own "
                                   "prediction (one extra no-grad forward)")
    dream_detail_preservation: float = setting(1.0, "a number > 0", num_in(0, math.inf, lo_open=True),
                                               "DREAM's p: lambda = sqrt(1 - alpha_bar)^p")

    def __post_init__(self):
        if self.timestep_bias_strategy == "range" and self.timestep_bias_begin >= self.timestep_bias_end:
            raise ValueError(f"timestep_bias_begin={self.timestep_bias_begin} must be below timestep_bias_end="
                             f"{self.timestep_bias_end} with timestep_bias_strategy=range")


def timestep_weights(noise: NoiseArgs, num_timesteps: int) -> torch.Tensor | None:
    """Sampling weights of the timesteps [num_timesteps] as diffusers' SDXL script builds them; None: uniform."""
    strategy = noise.timestep_bias_strategy
    if strategy == "none":
        return None
    if strategy == "range" and noise.timestep_bias_end > num_timesteps:
        raise ValueError(f"timestep_bias_end={noise.timestep_bias_end} is beyond the model's {num_timesteps} "
                         f"training timesteps: set it to at most {num_timesteps}")
    n = max(1, int(noise.timestep_bias_portion * num_timesteps))
    biased = {"earlier": slice(0, n), "later": slice(num_timesteps - n, None),
              "range": slice(noise.timestep_bias_begin, noise.timestep_bias_end)}[strategy]
    weights = torch.ones(num_timesteps)
    weights[biased] *= noise.timestep_bias_multiplier
    return weights / weights.sum()


def check_noise(noise: NoiseArgs, noise_scheduler) -> None:
    """The recipes against the model, at start: a ValueError naming the setting."""
    timestep_weights(noise, noise_scheduler.config.num_train_timesteps)
    if noise.dream_training and noise_scheduler.config.prediction_type != "epsilon":
        raise ValueError("dream_training=true needs an epsilon-prediction model (DREAM is defined for epsilon; "
                         f"this one predicts {noise_scheduler.config.prediction_type}): set dream_training=false")


@dataclass
class Noised:
    """A micro-batch's draw: x_t, t, the training target and the noise it was made from."""

    noisy: torch.Tensor       # [B, C, h, w]
    timesteps: torch.Tensor   # [B] long
    target: torch.Tensor      # [B, C, h, w]
    noise: torch.Tensor       # [B, C, h, w]


def noised_inputs(noise_scheduler, latents: torch.Tensor, generator: torch.Generator,
                  noise: NoiseArgs | None = None) -> Noised:
    """x_t, t and the training target of a micro-batch, drawn from `generator` (noise, noise offset, timesteps,
    then the input perturbation of Ning et al. 2023 as diffusers applies it: x_t gets noise + gamma * fresh noise,
    the target keeps the noise)."""
    noise = noise or NoiseArgs()
    b, dev, dt = latents.shape[0], latents.device, latents.dtype
    eps = torch.randn(latents.shape, generator=generator, device=dev, dtype=dt)
    if noise.noise_offset:
        eps = eps + noise.noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=generator, device=dev,
                                                     dtype=dt)
    num = noise_scheduler.config.num_train_timesteps
    weights = timestep_weights(noise, num)
    if weights is None:
        timesteps = torch.randint(0, num, (b,), generator=generator, device=dev).long()
    else:
        timesteps = torch.multinomial(weights.to(dev), b, replacement=True, generator=generator).long()
    ptype = noise_scheduler.config.prediction_type
    if ptype not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type={ptype!r}: training supports epsilon and v_prediction "
                         "(set model.prediction_type)")
    target = eps if ptype == "epsilon" else noise_scheduler.get_velocity(latents, eps, timesteps)
    noised = eps
    if noise.input_perturbation:
        noised = eps + noise.input_perturbation * torch.randn(latents.shape, generator=generator, device=dev,
                                                              dtype=dt)
    return Noised(noise_scheduler.add_noise(latents, noised, timesteps), timesteps, target, eps)


def dream(unet, noise_scheduler, drawn: Noised, cond: dict, detail_preservation: float,
          autocast: contextlib.AbstractContextManager | None = None) -> Noised:
    """DREAM (Zhou et al., CVPR 2024) as diffusers' compute_dream_and_update_latents defines it, for any family's
    conditioning: with the model's own no-grad prediction eps_hat and lambda = sqrt(1 - alpha_bar_t)^p,
    delta = lambda * (eps - eps_hat); x_t += sqrt(1 - alpha_bar_t) * delta and the target += delta."""
    abar = noise_scheduler.alphas_cumprod.to(drawn.timesteps.device)[drawn.timesteps].float()[:, None, None, None]
    sigma = (1.0 - abar) ** 0.5
    with torch.no_grad(), autocast or contextlib.nullcontext():
        pred = unet(drawn.noisy, drawn.timesteps, **cond).sample
    delta = ((drawn.noise - pred).float() * sigma ** detail_preservation).detach()
    noisy = drawn.noisy + (sigma * delta).to(drawn.noisy.dtype)
    return Noised(noisy, drawn.timesteps, drawn.target + delta.to(drawn.target.dtype), drawn.noise)


def training_inputs(unet, noise_scheduler, latents: torch.Tensor, generator: torch.Generator, noise: NoiseArgs,
                    cond: dict, autocast: contextlib.AbstractContextManager | None = None) -> Noised:
    """A micro-batch's draw with every recipe applied: `noised_inputs`, then DREAM when it is on."""
    drawn = noised_inputs(noise_scheduler, latents, generator, noise)
    if noise.dream_training:
        drawn = dream(unet, noise_scheduler, drawn, cond, noise.dream_detail_preservation, autocast)
    return drawn
