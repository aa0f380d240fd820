"""One micro-batch of filtered diffusion training: noise, predict, measure, decide, weigh.

The function is the training step's hot path, kept free of logging and I/O so that the loop and the
benchmark call the same code. It returns the *sum* of the kept per-sample losses; the loop divides
the accumulated gradient by the number of kept samples of the whole global batch (all ranks, all
accumulation steps), which is only known after the last micro-batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from filtering.policies import FilterPolicy
from filtering.signal import text_noise_magnitude


@dataclass
class StepOutput:
    loss_sum: torch.Tensor        # scalar with graph: sum of kept per-sample losses on this rank
    per_sample_loss: torch.Tensor  # [B] float32, detached
    magnitudes: torch.Tensor       # [B] float32
    timesteps: torch.Tensor        # [B] long
    keep: torch.Tensor             # [B] bool, this rank's slice of the global decision
    eligible: torch.Tensor         # [B] bool, False where the caption was dropped for CFG
    global_stats: torch.Tensor     # [N, 6] valid rows of all ranks: magnitude, timestep, eligible, is_duplicate,
    #                                loss, keep
    kept_global: int               # kept samples in the global micro-batch


def snr_weights(noise_scheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Min-SNR loss weights (Hang et al. 2023) as diffusers' train_text_to_image.py computes them, [B]."""
    abar = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = abar / (1.0 - abar)
    w = torch.clamp(snr, max=snr_gamma) / snr
    if noise_scheduler.config.prediction_type == "v_prediction":
        w = torch.clamp(snr, max=snr_gamma) / (snr + 1.0)
    return w


def filtered_diffusion_step(
    unet: torch.nn.Module,
    noise_scheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    uncond_embeds: torch.Tensor,
    policy: FilterPolicy,
    generator: torch.Generator,
    *,
    eligible: torch.Tensor | None = None,
    is_duplicate: torch.Tensor | None = None,
    magnitude_unet: torch.nn.Module | None = None,
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    rank: int = 0,
    autocast: contextlib.AbstractContextManager | None = None,
    compute_magnitude: bool = True,
    valid: torch.Tensor | None = None,
    pad_to: int | None = None,
    groups: torch.Tensor | None = None,
) -> StepOutput:
    """Loss of one micro-batch with the magnitude filter applied.

    Args:
        unet: the trainable UNet as the loop calls it (possibly DDP-wrapped).
        noise_scheduler: training noise scheduler (DDPMScheduler); its prediction_type sets the target.
        latents: VAE latents times scaling factor, [B, C, h, w].
        encoder_hidden_states: prompt embeddings, [B, L, D].
        uncond_embeds: empty-prompt embedding, [1, L, D].
        policy: decides the keep mask from the gathered magnitudes.
        generator: RNG for noise and timesteps (the loop seeds it per rank and step).
        eligible: [B] bool, samples the policy may judge; default all.
        is_duplicate: [B] bool duplication ground truth, only gathered for logging; default all False.
        magnitude_unet: the unwrapped UNet for the extra no-grad forward (avoids DDP bookkeeping);
            default `unet`.
        snr_gamma: Min-SNR gamma; None for the plain MSE. Default None.
        noise_offset: diffusers' noise offset. Default 0.
        gather: concatenates a [B, ...] tensor over ranks (accelerator.gather); default identity.
        rank: this rank's index in the gathered tensors. Default 0.
        autocast: autocast context for the extra forward (the prepared model autocasts itself).
        compute_magnitude: False skips the extra forward (a plain fine-tune: policy `none`, m recorded as NaN).
        valid: [B] bool, False for filler rows (a rank whose batch lost every sample to bad input runs one
            filler so that it still joins the all-reduce); never kept, never judged. Default all True.
        pad_to: the full per-rank batch size; smaller batches are padded in the gather. Default B.
        groups: [B] or [B, G] int64 item ids (filtering.policies.item_groups: caption and image hashes,
            < 2**48; 0 = none) for policies that gather evidence per item; gathered with the rest. Default all 0.
    """
    b = latents.shape[0]
    dev = latents.device
    noise = torch.randn(latents.shape, generator=generator, device=dev, dtype=latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=generator,
                                                   device=dev, dtype=latents.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=generator,
                              device=dev).long()
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    ptype = noise_scheduler.config.prediction_type
    if ptype not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type={ptype!r}: training supports epsilon and v_prediction "
                         "(set model.prediction_type)")
    target = noise if ptype == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)

    pred = unet(noisy, timesteps, encoder_hidden_states=encoder_hidden_states).sample  # [B,C,h,w], grad

    if compute_magnitude:
        m = text_noise_magnitude(magnitude_unet or unet, noisy, timesteps, uncond_embeds, cond_pred=pred,
                                 prediction_type=ptype, alphas_cumprod=noise_scheduler.alphas_cumprod,
                                 autocast=autocast)
    else:
        m = torch.full((b,), float("nan"), device=dev)   # not measured: the policy must be `none`
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # [B]
    if snr_gamma:
        per_sample = per_sample * snr_weights(noise_scheduler, timesteps, snr_gamma)

    eligible = torch.ones(b, dtype=torch.bool, device=dev) if eligible is None else eligible.to(dev)
    is_duplicate = torch.zeros(b, dtype=torch.bool, device=dev) if is_duplicate is None else is_duplicate.to(dev)
    valid = torch.ones(b, dtype=torch.bool, device=dev) if valid is None else valid.to(dev)
    # One collective for everything the decision and the logs need. Ranks may hold fewer than pad_to
    # samples (bad ones were skipped), so rows are padded to pad_to and marked invalid: [W*pad_to, 6]
    gid = torch.zeros(b, 1, dtype=torch.long, device=dev) if groups is None else groups.to(dev).long().reshape(b, -1)
    # each 48-bit group id travels as two exact 24-bit halves in the float32 gather: [B, 6 + 2G]
    local = torch.cat([torch.stack([m, timesteps.float(), eligible.float(), is_duplicate.float(), per_sample.detach(),
                                    valid.float()], dim=1), (gid >> 24).float(), (gid & 0xFFFFFF).float()], dim=1)
    width = max(b, pad_to or b)
    local = torch.cat([local, local.new_zeros(width - b, local.shape[1])])
    g = gather(local)
    g_valid = g[:, 5].bool()
    g[~g_valid, 0] = 0.0                                   # NaN-free padding (m is NaN when not measured)
    n_groups = gid.shape[1]
    g_groups = (g[:, 6:6 + n_groups].long() << 24) | g[:, 6 + n_groups:].long()          # [N, G]
    keep_global = policy.decide(g[:, 0], g[:, 1].long(), g[:, 2].bool() & g_valid, groups=g_groups,
                                losses=g[:, 4]) & g_valid
    # (the same decision on every rank)
    g = g[:, :5]
    keep = keep_global[rank * width:rank * width + b].to(dev)
    # where() rather than a multiply: a dropped sample's NaN/inf loss cannot leak into the forward sum
    loss_sum = torch.where(keep, per_sample, torch.zeros_like(per_sample)).sum()
    return StepOutput(loss_sum=loss_sum, per_sample_loss=per_sample.detach(), magnitudes=m, timesteps=timesteps,
                      keep=keep, eligible=eligible,
                      global_stats=torch.cat([g, keep_global.float().unsqueeze(1).to(g.device)], dim=1)[g_valid],
                      kept_global=int(keep_global.sum()))
