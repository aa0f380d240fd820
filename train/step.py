"""One micro-batch of filtered diffusion training: noise, predict, measure, decide, weigh.

The function is the training step's hot path, kept free of logging and I/O so that the loop and the
benchmark call the same code. It returns the *sum* of the kept per-sample losses; the loop divides
the accumulated gradient by the number of kept samples of the whole global batch (all ranks, all
accumulation steps), which is only known after the last micro-batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F

from memfilter.filtering.conditioning import as_conditioning, expand, select
from memfilter.filtering.policies import FilterPolicy
from memfilter.filtering.signal import magnitude_from_predictions, text_noise_magnitude
from memfilter.train.noise import NoiseArgs, training_inputs


@dataclass
class StepStats:
    """The per-sample values of a micro-batch that the decision and the logs need, by name. `gather` turns one
    rank's into the global micro-batch's, the same on every rank (the one place that packs them)."""

    magnitude: torch.Tensor        # [N] float32, NaN where not measured
    timestep: torch.Tensor         # [N] long
    eligible: torch.Tensor         # [N] bool: the policy may judge it (False where the caption was dropped for CFG)
    duplicate: torch.Tensor        # [N] bool duplication ground truth (logging only)
    loss: torch.Tensor             # [N] float32 per-sample training loss, detached
    valid: torch.Tensor            # [N] bool: a real sample, not a filler row
    groups: torch.Tensor           # [N, G] int64 item ids (< 2**48; 0 = none)
    base_loss: torch.Tensor        # [N] float32 the base model's loss at the same x_t and t, NaN where not measured
    base_magnitude: torch.Tensor   # [N] float32 the base model's magnitude there, NaN where not measured
    keep: torch.Tensor | None = None   # [N] bool: the decision, once made

    def gather(self, gather: Callable[[torch.Tensor], torch.Tensor], width: int) -> "StepStats":
        """Every rank's rows in one float32 collective. Each rank's rows are padded to `width` (ranks may hold
        fewer samples: bad ones were skipped) and marked invalid; a 48-bit id travels as two exact 24-bit halves."""
        g = self.groups.long()
        cols = torch.stack([self.magnitude.float(), self.timestep.float(), self.eligible.float(),
                            self.duplicate.float(), self.loss.detach().float(), self.valid.float(),
                            self.base_loss.float(), self.base_magnitude.float()], dim=1)
        local = torch.cat([cols, (g >> 24).float(), (g & 0xFFFFFF).float()], dim=1)        # [B, 8 + 2G]
        local = torch.cat([local, local.new_zeros(width - local.shape[0], local.shape[1])])
        out = gather(local)
        n = g.shape[1]
        valid = out[:, 5].bool()
        return StepStats(magnitude=torch.where(valid, out[:, 0], 0.0),    # NaN-free padding
                         timestep=out[:, 1].long(), eligible=out[:, 2].bool(), duplicate=out[:, 3].bool(),
                         loss=out[:, 4], valid=valid, base_loss=out[:, 6], base_magnitude=out[:, 7],
                         groups=(out[:, 8:8 + n].long() << 24) | out[:, 8 + n:].long())

    def select(self, mask: torch.Tensor) -> "StepStats":
        """The rows where `mask` holds."""
        return StepStats(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[mask]
                            for f in fields(self)})

    @staticmethod
    def cat(parts: list["StepStats"]) -> "StepStats":
        """Rows of several micro-batches, on the CPU (the loop's log window)."""
        return StepStats(**{f.name: torch.cat([getattr(p, f.name).detach().cpu() for p in parts])
                            for f in fields(StepStats)})


@dataclass
class StepOutput:
    loss_sum: torch.Tensor        # scalar with graph: sum of kept per-sample losses on this rank
    per_sample_loss: torch.Tensor  # [B] float32, detached
    magnitudes: torch.Tensor       # [B] float32
    timesteps: torch.Tensor        # [B] long
    keep: torch.Tensor             # [B] bool, this rank's slice of the global decision
    eligible: torch.Tensor         # [B] bool, False where the caption was dropped for CFG
    stats: StepStats               # the valid rows of all ranks, with the decision
    kept_global: int               # kept samples in the global micro-batch
    anchored_global: int = 0       # dropped samples trained toward the reference instead (`reference`)
    base_loss: torch.Tensor | None = None        # [B] the base's loss at the same x_t and t (NaN: not measured)
    base_magnitude: torch.Tensor | None = None   # [B] and its magnitude


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
    cond: torch.Tensor | dict,
    uncond: torch.Tensor | dict,
    policy: FilterPolicy,
    generator: torch.Generator,
    *,
    eligible: torch.Tensor | None = None,
    is_duplicate: torch.Tensor | None = None,
    magnitude_unet: torch.nn.Module | None = None,
    snr_gamma: float | None = None,
    noise: NoiseArgs | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    rank: int = 0,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    compute_magnitude: bool = True,
    valid: torch.Tensor | None = None,
    pad_to: int | None = None,
    groups: torch.Tensor | None = None,
    reference: Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor] | None = None,
    anchor: bool = True,
    anchor_weight: float = 1.0,
    base_rows: torch.Tensor | None = None,
) -> StepOutput:
    """Loss of one micro-batch with the magnitude filter applied.

    Args:
        unet: the trainable UNet as the loop calls it (possibly DDP-wrapped).
        noise_scheduler: training noise scheduler (DDPMScheduler); its prediction_type sets the target.
        latents: VAE latents times scaling factor, [B, C, h, w].
        cond: the prompts' conditioning, the UNet's keyword arguments (a bare [B, L, D] tensor: SD's states).
        uncond: the empty prompt's conditioning, batch 1 or B (SDXL: with the batch's own time ids).
        policy: decides the keep mask from the gathered magnitudes.
        generator: RNG for noise and timesteps (the loop seeds it per rank and step).
        eligible: [B] bool, samples the policy may judge; default all. is_duplicate: [B] bool ground truth, gathered
            for logging only; default all False.
        magnitude_unet: the unwrapped UNet for the extra no-grad forward (no DDP bookkeeping); default `unet`.
        snr_gamma: Min-SNR gamma; None for the plain MSE. Default None.
        noise: diffusers' noise and timestep recipes (train.noise.NoiseArgs; the loop's TrainArgs). Default none.
        gather: concatenates a [B, ...] tensor over ranks (accelerator.gather); default identity.
        rank: this rank's index in the gathered tensors. Default 0.
        autocast: makes the autocast context of each extra forward (the prepared model autocasts itself).
        compute_magnitude: False skips the extra forward (a plain fine-tune: policy `none`, m recorded as NaN).
        valid: [B] bool, False for filler rows (a rank whose batch lost every sample still joins the all-reduce);
            never kept, never judged. Default all True.
        pad_to: the full per-rank batch size; smaller batches are padded in the gather. Default B.
        groups: [B] or [B, G] int64 item ids (filtering.policies.item_groups; < 2**48, 0 = none). Default all 0.
        reference: `reference(x_t, t, cond)`, the base model's prediction (no grad): a policy with `uses_base` gets
            the base's loss and magnitude on the judged rows (`base_rows` of them, default all) from it, two forwards.
        anchor: with `reference`, a dropped sample is *anchored*: its loss is anchor_weight x ||pred - reference||^2
            (what its caption names, never its image). False: it leaves the loss. Default True.
    """
    b, dev = latents.shape[0], latents.device
    drawn = training_inputs(magnitude_unet or unet, noise_scheduler, latents, generator, noise or NoiseArgs(),
                            as_conditioning(cond), autocast and autocast())
    timesteps = drawn.timesteps
    pred = unet(drawn.noisy, timesteps, **as_conditioning(cond)).sample  # [B,C,h,w], grad
    m = (_magnitude(magnitude_unet or unet, noise_scheduler, drawn.noisy, timesteps, uncond, pred, autocast)
         if compute_magnitude else torch.full((b,), float("nan"), device=dev))   # NaN: not measured (policy none)
    per_sample = _weighted_mse(pred, drawn.target, timesteps, noise_scheduler, snr_gamma)   # [B]
    eligible, is_duplicate, valid, base_rows = (torch.full((b,), fill, dtype=torch.bool, device=dev) if x is None
                                                else x.to(dev) for x, fill in ((eligible, True), (is_duplicate, False),
                                                                               (valid, True), (base_rows, True)))
    measured = valid & eligible & base_rows
    base = _base_signals(policy, reference, drawn, cond, uncond, measured, noise_scheduler, snr_gamma)
    groups = torch.zeros(b, 1, dtype=torch.long, device=dev) if groups is None else groups.to(dev).long().reshape(b, -1)
    local = StepStats(magnitude=m, timestep=timesteps, eligible=eligible, duplicate=is_duplicate, loss=per_sample,
                      valid=valid, groups=groups, base_loss=base.loss, base_magnitude=base.magnitude)
    g, keep = _global_decision(local, policy, gather, rank, max(b, pad_to or b))
    # where() rather than a multiply: a dropped sample's NaN/inf loss cannot leak into the forward sum
    loss_sum = torch.where(keep, per_sample, torch.zeros_like(per_sample)).sum()
    anchored_global = 0
    if reference is not None and anchor:                 # a dropped row trains toward the base instead
        anchored_global, anchored = _anchored(g, pred, drawn, cond, reference, valid & eligible & ~keep,
                                              noise_scheduler, snr_gamma, base, measured)
        loss_sum = loss_sum + anchor_weight * anchored
    return StepOutput(loss_sum=loss_sum, per_sample_loss=per_sample.detach(), magnitudes=m, timesteps=timesteps,
                      keep=keep, eligible=eligible, stats=g.select(g.valid), kept_global=int(g.keep.sum()),
                      anchored_global=anchored_global, base_loss=base.loss, base_magnitude=base.magnitude)


def _magnitude(unet, noise_scheduler, noisy, timesteps, uncond, pred, autocast) -> torch.Tensor:
    """m of every sample at its training x_t and t, reusing the training forward's conditional prediction."""
    return text_noise_magnitude(unet, noisy, timesteps, uncond, cond_pred=pred,
                                prediction_type=noise_scheduler.config.prediction_type,
                                alphas_cumprod=noise_scheduler.alphas_cumprod, autocast=autocast and autocast())


def _global_decision(local: StepStats, policy: FilterPolicy, gather, rank: int, width: int):
    """One collective for everything the decision and the logs need (the same global rows on every rank), the
    policy's decision on them, and this rank's slice of it. Returns (global stats with keep, this rank's keep [B])."""
    b = local.magnitude.shape[0]
    g = local.gather(gather, width)
    g.keep = policy.decide(g.magnitude, g.timestep, g.eligible & g.valid, groups=g.groups, losses=g.loss,
                           base_losses=g.base_loss, base_magnitudes=g.base_magnitude) & g.valid
    return g, g.keep[rank * width:rank * width + b].to(local.magnitude.device)


def _anchored(g: StepStats, pred, drawn, cond, reference, rows: torch.Tensor, noise_scheduler,
              snr_gamma: float | None, base: "BaseSignals", measured: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(the global count of anchored rows, the same on every rank: valid, judged rows the decision did not keep;
    this rank's anchor loss over `rows`, reusing the base's predictions where it measured them)."""
    return (int((g.valid & g.eligible & ~g.keep).sum()),
            _anchor_loss(pred, drawn, cond, reference, rows, noise_scheduler, snr_gamma, base.pred, measured))


def _anchor_loss(pred, drawn, cond, reference, rows: torch.Tensor, noise_scheduler,
                 snr_gamma: float | None, known: torch.Tensor | None = None,
                 known_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over `rows` [B] of ||pred - reference(x_t, t, cond)||^2 (mean over elements): zero with a graph when
    no row is anchored, so every rank's backward covers the same parameters. `known` [B, C, h, w]: the base's
    predictions already made for the rows `known_rows` [B] (BaseSignals), reused instead of a new forward when they
    cover every anchored row."""
    idx, noisy, timesteps = rows.nonzero().squeeze(1), drawn.noisy, drawn.timesteps
    if idx.numel() == 0:
        return pred.sum() * 0.0
    if known is not None and bool(known_rows[idx].all()):
        ref = known[idx]
    else:
        with torch.no_grad():
            ref = reference(noisy[idx], timesteps[idx], select(as_conditioning(cond), idx))
    return _weighted_mse(pred[idx], ref, timesteps[idx], noise_scheduler, snr_gamma).sum()


@dataclass
class BaseSignals:
    """The frozen base model at each judged sample's x_t and t (NaN / None where not measured)."""

    loss: torch.Tensor                 # [B] its training loss
    magnitude: torch.Tensor            # [B] its text-conditional magnitude
    pred: torch.Tensor | None = None   # [B, C, h, w] its prediction with the prompt (zero on rows not measured)


def _base_signals(policy, reference, drawn, cond, uncond, rows: torch.Tensor, noise_scheduler,
                  snr_gamma: float | None) -> BaseSignals:
    """The base model's loss and magnitude on `rows` [B] for a policy that takes them (policy.uses_base): two
    no-grad forwards, with the prompts and with the empty prompt, at the same x_t and t as the training loss."""
    nan = torch.full((rows.shape[0],), float("nan"), device=rows.device)
    if not policy.uses_base:
        return BaseSignals(nan, nan.clone())
    if reference is None:
        raise ValueError(f"the {policy.name} policy with filter.null=base needs the base model's prediction "
                         "(`reference`); use filter.null=population for none")
    idx = rows.nonzero().squeeze(1)
    out = BaseSignals(nan, nan.clone(), torch.zeros_like(drawn.noisy))
    if idx.numel() == 0:
        return out
    noisy, t = drawn.noisy[idx], drawn.timesteps[idx]
    with torch.no_grad():
        with_prompt = reference(noisy, t, select(as_conditioning(cond), idx))
        empty = reference(noisy, t, select(expand(as_conditioning(uncond), rows.shape[0]), idx))
    out.pred = out.pred.to(with_prompt.dtype)
    out.pred[idx] = with_prompt
    out.loss[idx] = _weighted_mse(with_prompt, drawn.target[idx], t, noise_scheduler, snr_gamma)
    out.magnitude[idx] = magnitude_from_predictions(with_prompt, empty,
                                                    prediction_type=noise_scheduler.config.prediction_type,
                                                    alphas_cumprod=noise_scheduler.alphas_cumprod, timesteps=t)
    return out


def _weighted_mse(pred, target, timesteps, noise_scheduler, snr_gamma: float | None) -> torch.Tensor:
    """Per-sample MSE (mean over elements, in fp32), Min-SNR weighted when snr_gamma is set; [B]."""
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return loss * snr_weights(noise_scheduler, timesteps, snr_gamma) if snr_gamma else loss
