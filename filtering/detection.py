"""Detection (Wen et al.): a prompt's memorization score from the first steps of its real sampling trajectory.

score(p) = mean over n generations (different x_T) and the first k DDIM steps of
           || eps(x_t, t, e_p) - eps(x_t, t, e_0) ||_2
along the classifier-free-guidance trajectory (guidance 7.5 in the paper). With k=1 the score needs one
batched UNet call per generation, before any image exists: cheap enough to screen every prompt.
"""
from __future__ import annotations

import hashlib

import torch

from memfilter.filtering.conditioning import as_conditioning, cat, expand, leaves, num_rows, select
from memfilter.filtering.signal import magnitude_from_predictions


def _seed(seed: int, prompt_index: int, generation: int) -> int:
    return int(hashlib.sha256(f"{seed}/{prompt_index}/{generation}".encode()).hexdigest()[:15], 16)


@torch.no_grad()
def trajectory_magnitudes(unet, scheduler, prompt_cond: torch.Tensor | dict, uncond: torch.Tensor | dict,
                          latent_shape: tuple[int, int, int], *, num_generations: int = 4, num_steps: int = 1,
                          num_inference_steps: int = 50, guidance_scale: float = 7.5, seed: int = 0,
                          batch_size: int = 16, generator_device: str | torch.device = "cpu",
                          index_offset: int = 0) -> torch.Tensor:
    """Magnitudes along the CFG trajectory: [P, num_generations, num_steps] float32.

    Args:
        unet: the UNet (eval mode). scheduler: a diffusers scheduler with set_timesteps/step (DDIM).
        prompt_cond: the P prompts' conditioning, the denoiser's keyword arguments (filtering.conditioning;
            a bare [P, L, D] tensor is SD's encoder_hidden_states).
        uncond: the empty prompt's conditioning as the pipeline's CFG uses it, batch 1 (same forms).
        latent_shape: (C, h, w) of one latent.
        num_generations: n initial noises per prompt. Default 4.
        num_steps: first k sampling steps measured. Default 1.
        num_inference_steps: length of the sampling schedule the steps belong to. Default 50.
        guidance_scale: classifier-free guidance of the trajectory. Default 7.5.
        seed: x_T of generation j of prompt i is seeded by (seed, i, j), whatever the batching. Default 0.
        batch_size: (prompt, generation) pairs per UNet call. Default 16.
        generator_device: device of the noise generators. Default "cpu" (same noise on any device).
        index_offset: global index of prompt 0, when a long list is scored in chunks. Default 0.
    """
    if not 1 <= num_steps <= num_inference_steps:
        raise ValueError(f"num_steps={num_steps}: detection measures the first k of the num_inference_steps="
                         f"{num_inference_steps} sampling steps; choose 1 <= num_steps <= num_inference_steps")
    prompt_cond, uncond = as_conditioning(prompt_cond), as_conditioning(uncond)
    first = leaves(prompt_cond)[0]
    dev, dtype, num_prompts = first.device, first.dtype, num_rows(prompt_cond)
    pairs = [(i, j) for i in range(num_prompts) for j in range(num_generations)]
    out = torch.zeros(num_prompts, num_generations, num_steps)
    ptype = scheduler.config.get("prediction_type", "epsilon")
    alphas = getattr(scheduler, "alphas_cumprod", None)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        b = len(chunk)
        latents = torch.stack([torch.randn(latent_shape, generator=torch.Generator(generator_device).manual_seed(
            _seed(seed, index_offset + i, j)), device=generator_device) for i, j in chunk]).to(dev, dtype)   # [b, C, h, w]
        scheduler.set_timesteps(num_inference_steps, device=dev)    # before init_noise_sigma: it can depend on it
        latents = latents * scheduler.init_noise_sigma
        cond = select(prompt_cond, [i for i, _ in chunk])                                     # b rows
        context = cat([cond, expand(uncond, b)])                                               # 2b rows
        for k, t in enumerate(scheduler.timesteps[:num_steps]):
            x_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            pred = unet(x_in, t, **context).sample
            pred_c, pred_u = pred.chunk(2)
            ts = torch.full((b,), int(t), device=dev, dtype=torch.long)
            m = magnitude_from_predictions(pred_c, pred_u, prediction_type=ptype, alphas_cumprod=alphas,
                                           timesteps=ts)
            for (i, j), v in zip(chunk, m.cpu()):
                out[i, j, k] = v
            guided = pred_u + guidance_scale * (pred_c - pred_u)
            latents = scheduler.step(guided, t, latents).prev_sample
    return out


def detection_scores(magnitudes: torch.Tensor) -> torch.Tensor:
    """[P] scores: the mean over generations and steps of `trajectory_magnitudes`."""
    return magnitudes.float().mean(dim=(1, 2))
