"""The memorization signal of Wen et al. (ICLR 2024).

    m = || eps(x_t, t, e_p) - eps(x_t, t, e_0) ||_2

over every element of the latent, one float32 number per sample. Training, curation and detection
all call `text_noise_magnitude`; the conversions below make the same number come out whatever the
UNet predicts (epsilon, v or x0), because the paper's signal is defined on the noise prediction.
"""
from __future__ import annotations

import contextlib

import torch

from memfilter.filtering.conditioning import as_conditioning, expand

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def eps_scale(prediction_type: str, alphas_cumprod: torch.Tensor | None,
                      timesteps: torch.Tensor | None) -> torch.Tensor | None:
    """Factor c_t with eps_c - eps_u = c_t * (pred_c - pred_u), shape [B] (None means 1).

    With x_t = a x0 + s eps (a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t)):
      v-prediction: eps = a v + s x_t      -> c_t = a
      sample:       eps = (x_t - a x0) / s -> c_t = -a / s
    x_t is the same for both predictions, so it cancels in the difference.
    """
    if prediction_type == "epsilon":
        return None
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}: expected one of {PREDICTION_TYPES}")
    if alphas_cumprod is None or timesteps is None:
        raise ValueError(f"prediction_type={prediction_type!r} needs alphas_cumprod and timesteps "
                         "to convert the prediction to a noise prediction")
    abar = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps.long()]
    a = abar.sqrt()
    return a if prediction_type == "v_prediction" else -a / (1.0 - abar).clamp_min(1e-12).sqrt()


def magnitude_from_predictions(cond_pred: torch.Tensor, uncond_pred: torch.Tensor, *,
                               prediction_type: str = "epsilon",
                               alphas_cumprod: torch.Tensor | None = None,
                               timesteps: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample L2 norm of the text-conditional part of the noise prediction.

    Args:
        cond_pred: UNet output for the prompt embedding, [B, C, H, W] (any float dtype).
        uncond_pred: UNet output for the empty-prompt embedding, same shape.
        prediction_type: "epsilon" (default), "v_prediction" or "sample".
        alphas_cumprod: the noise scheduler's alphas_cumprod [T]; needed unless epsilon.
        timesteps: [B] integer timesteps; needed unless epsilon.
    Returns:
        [B] float32 magnitudes.
    """
    diff = cond_pred.detach().float() - uncond_pred.detach().float()   # [B, C, H, W]
    m = diff.flatten(1).norm(dim=1)                                      # [B]
    scale = eps_scale(prediction_type, alphas_cumprod, timesteps)
    return m if scale is None else m * scale.abs()


@torch.no_grad()
def text_noise_magnitude(unet: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                         uncond: torch.Tensor | dict, *, cond_pred: torch.Tensor | None = None,
                         cond: torch.Tensor | dict | None = None, prediction_type: str = "epsilon",
                         alphas_cumprod: torch.Tensor | None = None,
                         autocast: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """Magnitude m for a batch: the one function training, curation and detection call.

    Training passes the conditional prediction of its own forward (`cond_pred`), so the signal costs
    one extra no-grad forward with the empty prompt at the same x_t and t. Detection passes
    `cond` instead and pays two forwards.

    Args:
        unet: a diffusers UNet2DConditionModel (or anything called the same way).
        noisy_latents: x_t, [B, C, H, W].
        timesteps: [B] integer timesteps.
        uncond: the empty-prompt conditioning e_0: the denoiser's keyword arguments
            (filtering.conditioning; SDXL's carry the same time_ids as the prompts') or a bare [1|B, L, D]
            embedding; batch 1 is broadcast over the batch.
        cond_pred: the UNet output for the prompts at (x_t, t), if the caller has it.
        cond: the prompts' conditioning e_p (same forms, batch B); used only when cond_pred is None.
        prediction_type: what the UNet predicts (its scheduler's prediction_type).
        alphas_cumprod: scheduler.alphas_cumprod, needed for v_prediction and sample.
        autocast: context for the extra forwards (e.g. accelerator.autocast()); default none.
    Returns:
        [B] float32 magnitudes, detached.
    """
    uncond = expand(as_conditioning(uncond), noisy_latents.shape[0])
    ctx = autocast if autocast is not None else contextlib.nullcontext()
    with ctx:
        if cond_pred is None:
            if cond is None:
                raise ValueError("text_noise_magnitude needs cond_pred or cond")
            cond_pred = unet(noisy_latents, timesteps, **as_conditioning(cond)).sample
        uncond_pred = unet(noisy_latents, timesteps, **uncond).sample
    return magnitude_from_predictions(cond_pred, uncond_pred, prediction_type=prediction_type,
                                      alphas_cumprod=alphas_cumprod, timesteps=timesteps)
