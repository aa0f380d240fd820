"""Explanation (Wen et al.): how much each token of a prompt drives the memorization signal.

    significance(token i) = mean over n generations and the first k CFG steps of || d m / d e_p[i] ||_2

where m = || eps(x_t, t, e_p) - eps(x_t, t, e_0) ||_2 (filtering.signal) and e_p[i] is row i of the prompt's own
encoder_hidden_states (the text encoder output, [L, D]); the norm is over the embedding dimension D.

The trajectory is the one detection follows (filtering.detection.trajectory_magnitudes): x_T seeded by
(seed, prompt index, generation), the scheduler's scale_model_input, guided = u + g (c - u) with u the empty
prompt's prediction, scheduler.step. It is followed without gradient: each step's gradient is taken at that
step's x_t, with respect to the prompt embedding used at that step only.

The official code exchanges the conditional and unconditional rows (its issues #7 and #9): its guidance is
inverted and its gradient is that of the empty prompt's rows. Here the prompt's rows are differentiated and
the guidance is u + g (c - u).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from memfilter.filtering.conditioning import as_conditioning, num_rows
from memfilter.filtering.detection import initial_latents
from memfilter.filtering.signal import magnitude_from_predictions


@dataclass
class StepGradient:
    """One (generation, step) of the trajectory: m there and dm/de_p, the gradient w.r.t. the prompt's rows."""
    generation: int
    step: int
    timestep: int
    magnitude: float          # m at this step (float32, as filtering.signal computes it)
    grad: torch.Tensor        # [L, D], in the conditioning's dtype, on its device


def _check(prompt_cond: dict, uncond: dict, num_generations: int, num_steps: int, num_inference_steps: int) -> None:
    if not 1 <= num_steps <= num_inference_steps:
        raise ValueError(f"num_steps={num_steps}: the explanation averages the first k of the num_inference_steps="
                         f"{num_inference_steps} sampling steps; choose 1 <= num_steps <= num_inference_steps")
    if num_generations < 1:
        raise ValueError(f"num_generations={num_generations}: need at least one initial noise")
    if num_rows(prompt_cond) != 1 or num_rows(uncond) != 1:
        raise ValueError(f"prompt_cond has {num_rows(prompt_cond)} rows and uncond {num_rows(uncond)}: "
                         "explain one prompt at a time (batch 1 each)")


def _step_gradient(unet, x_in: torch.Tensor, t, cond: dict, uncond: dict, *, prediction_type: str,
                   alphas_cumprod) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m [1] float32, dm/de_p [L, D], conditional and unconditional predictions, detached) at one x_t.

    The unconditional prediction is a constant here (no gradient); the gradient flows only through the
    conditional prediction into a fresh leaf copy of the prompt's encoder_hidden_states. The pooled
    embedding and time ids (SDXL's added_cond_kwargs) are passed as they are and not differentiated.
    """
    with torch.no_grad():
        pred_u = unet(x_in, t, **uncond).sample                                  # [1, C, h, w]
    e = cond["encoder_hidden_states"].detach().clone().requires_grad_(True)     # [1, L, D], the leaf
    with torch.enable_grad():
        pred_c = unet(x_in, t, **{**cond, "encoder_hidden_states": e}).sample     # [1, C, h, w]
        ts = torch.full((1,), int(t), device=x_in.device, dtype=torch.long)
        # m's value from the signal's own function (v-prediction and sample converted to the noise scale there);
        # it is detached, so the gradient goes through ||c - u|| times the factor m / ||c - u|| (1 for epsilon,
        # the conversion's |c_t| otherwise): the same m, differentiated
        m = magnitude_from_predictions(pred_c, pred_u, prediction_type=prediction_type,
                                       alphas_cumprod=alphas_cumprod, timesteps=ts)      # [1] float32
        wide = torch.promote_types(pred_c.dtype, torch.float32)     # float32 as the signal (float64 kept as is)
        diff_norm = (pred_c.to(wide) - pred_u.to(wide)).flatten(1).norm(dim=1)              # [1]
        factor = m.to(diff_norm) / diff_norm.detach().clamp_min(torch.finfo(diff_norm.dtype).tiny)
        (grad,) = torch.autograd.grad((diff_norm * factor).sum(), e)                      # [1, L, D]
    return m, grad[0], pred_c.detach(), pred_u


def step_gradients(unet, scheduler, prompt_cond: torch.Tensor | dict, uncond: torch.Tensor | dict,
                   latent_shape: tuple[int, int, int], *, num_generations: int = 4, num_steps: int = 1,
                   num_inference_steps: int = 50, guidance_scale: float = 7.5, seed: int = 0, prompt_index: int = 0,
                   first_generation: int = 0, generator_device: str | torch.device = "cpu") -> Iterator[StepGradient]:
    """m and dm/de_p at each of the first k steps of each generation's CFG trajectory, in order.

    Args: as `token_significance`.
    Yields:
        StepGradient(generation j, step k, timestep, m, grad [L, D]) for first_generation <= j <
        first_generation + num_generations and k < num_steps.
    """
    prompt_cond, uncond = as_conditioning(prompt_cond), as_conditioning(uncond)
    _check(prompt_cond, uncond, num_generations, num_steps, num_inference_steps)
    e = prompt_cond["encoder_hidden_states"]
    dev, dtype = e.device, e.dtype
    ptype = scheduler.config.get("prediction_type", "epsilon")
    alphas = getattr(scheduler, "alphas_cumprod", None)
    for j in range(first_generation, first_generation + num_generations):
        # the same x_T as detection gives generation j of prompt `prompt_index`
        latents = initial_latents([(prompt_index, j)], latent_shape, seed=seed,
                                  generator_device=generator_device).to(dev, dtype)                  # [1,C,h,w]
        scheduler.set_timesteps(num_inference_steps, device=dev)    # before init_noise_sigma: it can depend on it
        latents = latents * scheduler.init_noise_sigma
        for k, t in enumerate(scheduler.timesteps[:num_steps]):
            x_in = scheduler.scale_model_input(latents, t).detach()
            m, grad, pred_c, pred_u = _step_gradient(unet, x_in, t, prompt_cond, uncond, prediction_type=ptype,
                                                     alphas_cumprod=alphas)
            yield StepGradient(j, k, int(t), float(m[0]), grad)
            if k + 1 == num_steps:
                break                                   # the next x_t is not measured: spare the extra forward
            with torch.no_grad():
                guided = pred_u + guidance_scale * (pred_c - pred_u)                # true CFG: u + g (c - u)
                latents = scheduler.step(guided, t, latents).prev_sample


def significance_and_magnitudes(unet, scheduler, prompt_cond: torch.Tensor | dict, uncond: torch.Tensor | dict,
                                latent_shape: tuple[int, int, int], **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(significance [L] float32, magnitudes [n, k] float32), both on the CPU, from one pass over the trajectory.

    The magnitudes are m along the same trajectory: their mean is the prompt's detection score (with the same
    seed and prompt index, the same number as filtering.detection gives, up to float rounding).

    Args: as `token_significance` (keyword arguments passed on).
    """
    total, mags, k = None, [], 0
    for s in step_gradients(unet, scheduler, prompt_cond, uncond, latent_shape, **kw):   # generation-major order
        norms = s.grad.float().norm(dim=-1).cpu()                        # [L]: L2 over the embedding dimension
        total = norms if total is None else total + norms
        mags.append(s.magnitude)
        k = max(k, s.step + 1)
    return total / len(mags), torch.tensor(mags, dtype=torch.float32).reshape(-1, k)      # [L], [n, k]


def token_significance(unet, scheduler, prompt_cond: torch.Tensor | dict, uncond: torch.Tensor | dict,
                       latent_shape: tuple[int, int, int], *, num_generations: int = 4, num_steps: int = 1,
                       num_inference_steps: int = 50, guidance_scale: float = 7.5, seed: int = 0,
                       prompt_index: int = 0, first_generation: int = 0,
                       generator_device: str | torch.device = "cpu") -> torch.Tensor:
    """Per-token significance of one prompt: [L] float32 (CPU), one number per row of its encoder_hidden_states.

    The mean over n generations and the first k steps of the CFG trajectory of || dm / de_p[i] ||_2 (norm over
    the embedding dimension), e_p the prompt's own encoder_hidden_states rows. Every position is scored,
    padding included; callers pick the positions they show (evaluation.explain keeps start, prompt and end).

    Args:
        unet: the UNet (eval mode; its parameters are not updated, their gradients are not computed).
        scheduler: a diffusers scheduler with set_timesteps/scale_model_input/step (DDIM in the paper); mutated by
            set_timesteps: pass a copy if the pipeline's own must stay as it is.
        prompt_cond: one prompt's conditioning, batch 1 (filtering.conditioning): SD {"encoder_hidden_states":
            [1, L, D]} or a bare [1, L, D] tensor; SDXL adds "added_cond_kwargs" (pooled text_embeds, time_ids),
            which stay fixed: the pooled embedding is not differentiated, only the encoder_hidden_states rows.
        uncond: the empty prompt's conditioning as the pipeline's CFG uses it, batch 1 (same forms).
        latent_shape: (C, h, w) of one latent.
        num_generations: n initial noises. Default 4.
        num_steps: first k sampling steps averaged. Default 1.
        num_inference_steps: length of the sampling schedule the steps belong to. Default 50.
        guidance_scale: classifier-free guidance g of the trajectory, u + g (c - u). Default 7.5.
        seed: x_T of generation j is seeded by (seed, prompt_index, j) as in detection. Default 0.
        prompt_index: the prompt's index in its list, for the seed. Default 0.
        first_generation: index j of the first generation, so that generations can be split over calls (or
            devices): n=2 equals the mean of the n=1 calls with first_generation 0 and 1. Default 0.
        generator_device: device of the noise generators. Default "cpu" (same noise on any device).
    Raises:
        ValueError: num_steps outside 1..num_inference_steps, num_generations < 1, or a batch other than 1.
    """
    return significance_and_magnitudes(
        unet, scheduler, prompt_cond, uncond, latent_shape, num_generations=num_generations, num_steps=num_steps,
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed,
        prompt_index=prompt_index, first_generation=first_generation, generator_device=generator_device)[0]
