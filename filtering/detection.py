"""Detection: a prompt's memorization score from its real sampling trajectory, with three published detectors.

Every detector is measured along the classifier-free-guidance DDIM trajectory a user would sample (guidance 7.5 in
the papers), for n generations (x_T of generation j of prompt i seeded by (seed, i, j), whatever the batching) and
the first k sampling steps; a prompt's score is the mean over generations and steps.

- `magnitude` (Wen et al., ICLR 2024): m = || eps(x_t, e_p) - eps(x_t, e_0) ||_2 over the whole latent.
- `sharpness` (Jeon et al., ICML 2025): with the score s(x) = -eps(x) / sigma_t and Ds = s(x, e_p) - s(x, e_0),
  || (dDs / dx_t) Ds ||_2: the Hessian of log p_c - log p_u applied to the score difference, one Jacobian-vector
  product (forward-mode AD) through the denoiser per step. A sharp conditional peak (memorization) has a large one.
- `bright_ending` (Chen et al., ICLR 2025): the magnitude restricted to where the end token's cross-attention is
  bright at the LAST sampling step: || (eps_p - eps_0) * M ||_2 / mean(M), with M the end token's attention map of
  the prompt's rows, averaged over heads and over every cross-attention layer (upsampled to the latent). It needs the
  whole trajectory (the mask comes from its last step), so it costs a full sampling run per generation.

v- and x0-predicting models are converted to the noise prediction (filtering.signal), as the papers define the
signals on it. The scores of one pass at (K, N) contain every smaller grid cell (k <= K, n <= N): the draws are
nested (`grid_scores`).
"""
from __future__ import annotations

import contextlib
import hashlib

import torch
import torch.nn.functional as F

from memfilter.filtering.conditioning import as_conditioning, cat, expand, leaves, num_rows, select
from memfilter.filtering.signal import eps_scale

DETECTORS = ("magnitude", "sharpness", "bright_ending")


def generation_seed(seed: int, prompt_index: int, generation: int) -> int:
    """The seed of x_T for generation `generation` of prompt `prompt_index` (independent of batching)."""
    return int(hashlib.sha256(f"{seed}/{prompt_index}/{generation}".encode()).hexdigest()[:15], 16)


def initial_latents(pairs: list[tuple[int, int]], latent_shape: tuple[int, int, int], *, seed: int = 0,
                    generator_device: str | torch.device = "cpu") -> torch.Tensor:
    """x_T for (prompt index, generation) pairs, [len(pairs), C, h, w] float32 on generator_device (unscaled: the
    scheduler's init_noise_sigma is applied by the caller)."""
    return torch.stack([torch.randn(latent_shape, generator=torch.Generator(generator_device).manual_seed(
        generation_seed(seed, i, j)), device=generator_device) for i, j in pairs])


@torch.no_grad()
def trajectory_scores(unet, scheduler, prompt_cond: torch.Tensor | dict, uncond: torch.Tensor | dict,
                      latent_shape: tuple[int, int, int], *, detectors: tuple[str, ...] = ("magnitude",),
                      end_positions: torch.Tensor | None = None, num_generations: int = 4, num_steps: int = 1,
                      num_inference_steps: int = 50, guidance_scale: float = 7.5, seed: int = 0,
                      batch_size: int = 16, generator_device: str | torch.device = "cpu",
                      index_offset: int = 0) -> dict[str, torch.Tensor]:
    """Per-detector scores along the CFG trajectory: {detector: [P, num_generations, num_steps] float32}.

    Args:
        unet: the denoiser (eval mode). scheduler: a diffusers scheduler with set_timesteps/step (DDIM).
        prompt_cond: the P prompts' conditioning, the denoiser's keyword arguments (filtering.conditioning;
            a bare [P, L, D] tensor is SD's encoder_hidden_states).
        uncond: the empty prompt's conditioning as the pipeline's CFG uses it, batch 1 (same forms).
        latent_shape: (C, h, w) of one latent.
        detectors: any of DETECTORS. Default ("magnitude",).
        end_positions: [P] token index of each prompt's end token; needed by bright_ending.
        num_generations: n initial noises per prompt. Default 4.
        num_steps: first k sampling steps measured. Default 1.
        num_inference_steps: length of the sampling schedule the steps belong to. Default 50.
        guidance_scale: classifier-free guidance of the trajectory. Default 7.5.
        seed: x_T of generation j of prompt i is seeded by (seed, i, j), whatever the batching. Default 0.
        batch_size: (prompt, generation) pairs per denoiser call. Default 16.
        generator_device: device of the noise generators. Default "cpu" (same noise on any device).
        index_offset: global index of prompt 0, when a long list is scored in chunks. Default 0.
    """
    detectors = tuple(detectors)
    _check(detectors, end_positions, num_steps, num_inference_steps)
    prompt_cond, uncond = as_conditioning(prompt_cond), as_conditioning(uncond)
    first = leaves(prompt_cond)[0]
    dev, dtype, num_prompts = first.device, first.dtype, num_rows(prompt_cond)
    pairs = [(i, j) for i in range(num_prompts) for j in range(num_generations)]
    out = {d: torch.zeros(num_prompts, num_generations, num_steps) for d in detectors}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        rows = [i for i, _ in chunk]
        x_T = initial_latents([(index_offset + i, j) for i, j in chunk], latent_shape, seed=seed,
                              generator_device=generator_device).to(dev, dtype)                      # [b, C, h, w]
        ends = end_positions[rows] if end_positions is not None else None
        scores = _score_chunk(unet, scheduler, select(prompt_cond, rows), expand(uncond, len(chunk)), x_T,
                              detectors, ends, num_steps, num_inference_steps, guidance_scale)
        for d, v in scores.items():                                                                  # v: [b, k]
            for (i, j), row in zip(chunk, v.cpu()):
                out[d][i, j] = row
    return out


def _check(detectors, end_positions, num_steps: int, num_inference_steps: int) -> None:
    unknown = [d for d in detectors if d not in DETECTORS]
    if unknown or not detectors:
        raise ValueError(f"detectors={list(detectors)}: expected one or more of {list(DETECTORS)}")
    if not 1 <= num_steps <= num_inference_steps:
        raise ValueError(f"num_steps={num_steps}: detection measures the first k of the num_inference_steps="
                         f"{num_inference_steps} sampling steps; choose 1 <= num_steps <= num_inference_steps")
    if "bright_ending" in detectors and end_positions is None:
        raise ValueError("the bright_ending detector needs end_positions (each prompt's end-token index)")


def _score_chunk(unet, scheduler, cond: dict, uncond: dict, x_T: torch.Tensor, detectors, ends, num_steps: int,
                 num_inference_steps: int, guidance_scale: float) -> dict[str, torch.Tensor]:
    """One batch of b (prompt, generation) pairs along its trajectory: {detector: [b, k]}."""
    b, dev = x_T.shape[0], x_T.device
    scheduler.set_timesteps(num_inference_steps, device=dev)    # before init_noise_sigma: it can depend on it
    latents = x_T * scheduler.init_noise_sigma
    context = cat([cond, uncond])                               # 2b rows: prompts first, then the empty prompt
    ptype = scheduler.config.get("prediction_type", "epsilon")
    alphas = getattr(scheduler, "alphas_cumprod", None)
    bright = "bright_ending" in detectors
    last = len(scheduler.timesteps) - 1 if bright else num_steps - 1    # without bright_ending: stop after step k
    out: dict[str, list] = {d: [] for d in detectors}
    diffs, maps = [], []
    for i, t in enumerate(scheduler.timesteps[:last + 1]):
        record = _end_token_attention(unet, ends, b, maps) if bright and i == last else contextlib.nullcontext()
        with record:
            pred = unet(scheduler.scale_model_input(torch.cat([latents, latents]), t), t, **context).sample
        pred_c, pred_u = pred.chunk(2)
        if i < num_steps:
            ts = torch.full((b,), int(t), device=dev, dtype=torch.long)
            scale = eps_scale(ptype, alphas, ts)                 # eps_c - eps_u = scale * (pred_c - pred_u)
            diff = (pred_c.float() - pred_u.float()) * (1.0 if scale is None else scale.view(-1, 1, 1, 1))
            if "magnitude" in detectors:
                out["magnitude"].append(diff.flatten(1).norm(dim=1))
            if "sharpness" in detectors:
                out["sharpness"].append(_sharpness(unet, scheduler, latents, t, context, scale, alphas, diff))
            if bright:
                diffs.append(diff)                                       # [b, C, h, w], masked once M is known
        guided = pred_u + guidance_scale * (pred_c - pred_u)
        latents = scheduler.step(guided, t, latents).prev_sample
    if bright:
        mask = end_token_mask(maps, x_T.shape[-2:])                      # [b, h, w]
        out["bright_ending"] = [masked_magnitude(d, mask) for d in diffs]
    return {d: torch.stack(v, dim=1) for d, v in out.items()}


def _sharpness(unet, scheduler, latents, t, context: dict, scale, alphas, diff: torch.Tensor) -> torch.Tensor:
    """|| J Ds ||_2 per row [b], J = dDs/dx_t, Ds = -(eps_c - eps_u) / sigma_t, by one forward-mode JVP.

    The math attention kernel: fused attention kernels have no forward-mode derivative."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sigma = (1.0 - alphas.to(latents.device, torch.float32)[int(t)]).sqrt()

    def delta_score(x):                                                  # [b, C, h, w] -> [b, C, h, w] float32
        pred = unet(scheduler.scale_model_input(torch.cat([x, x]), t), t, **context).sample.float()
        pc, pu = pred.chunk(2)
        d = pc - pu if scale is None else (pc - pu) * scale.view(-1, 1, 1, 1)
        return -d / sigma

    tangent = (-diff / sigma).to(latents.dtype)                          # Ds at x_t, from the step's own forward
    with sdpa_kernel(SDPBackend.MATH):
        _, jv = torch.func.jvp(delta_score, (latents,), (tangent,))
    return jv.float().flatten(1).norm(dim=1)


class _EndTokenRecorder:
    """Wraps a cross-attention processor: besides the layer's usual output, keeps the attention of the first `rows`
    batch rows (the prompts' half of the CFG batch) to their end token, averaged over heads: [rows, Q]."""

    def __init__(self, inner, ends: torch.Tensor, rows: int, maps: list):
        self.inner, self.ends, self.rows, self.maps = inner, ends, rows, maps

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        if encoder_hidden_states is not None and hidden_states.ndim == 3:
            ehs = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
            q = attn.head_to_batch_dim(attn.to_q(hidden_states[:self.rows]))       # [rows*heads, Q, d]
            k = attn.head_to_batch_dim(attn.to_k(ehs[:self.rows]))                 # [rows*heads, L, d]
            probs = attn.get_attention_scores(q, k, None).float()                  # [rows*heads, Q, L]
            probs = probs.view(self.rows, -1, *probs.shape[1:]).mean(1)            # [rows, Q, L]
            self.maps.append(probs[torch.arange(self.rows), :, self.ends.to(probs.device)])   # [rows, Q]
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kw)


@contextlib.contextmanager
def _end_token_attention(unet, ends: torch.Tensor, rows: int, maps: list):
    """Within the block, every cross-attention layer of `unet` appends its end-token map to `maps`."""
    original = unet.attn_processors
    unet.set_attn_processor({name: _EndTokenRecorder(p, ends, rows, maps) for name, p in original.items()})
    try:
        yield maps
    finally:
        unet.set_attn_processor(original)


def end_token_mask(maps: list[torch.Tensor], latent_hw: tuple[int, int]) -> torch.Tensor:
    """[rows, h, w]: the layers' end-token maps ([rows, Q_l] each, Q_l = h_l * w_l) upsampled to the latent and
    averaged over layers."""
    h, w = int(latent_hw[0]), int(latent_hw[1])
    if not maps:
        raise ValueError("bright_ending: the denoiser has no cross-attention layer to take the end-token map from")
    ups = []
    for m in maps:
        f = round((h * w / m.shape[1]) ** 0.5)                                     # the layer's downsampling
        grid = m.reshape(m.shape[0], 1, h // f, w // f)
        ups.append(F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)[:, 0])
    return torch.stack(ups).mean(0)


def masked_magnitude(diff: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """|| diff * M ||_2 / mean(M) per row: diff [b, C, h, w], mask [b, h, w] -> [b] (scale-free in M)."""
    masked = diff.float() * mask[:, None].to(diff.device)
    return masked.flatten(1).norm(dim=1) / mask.flatten(1).mean(1).to(diff.device).clamp_min(1e-12)


def trajectory_magnitudes(unet, scheduler, prompt_cond, uncond, latent_shape, **kw) -> torch.Tensor:
    """Wen et al.'s magnitudes along the CFG trajectory, [P, num_generations, num_steps] (trajectory_scores'
    arguments)."""
    return trajectory_scores(unet, scheduler, prompt_cond, uncond, latent_shape, detectors=("magnitude",),
                             **kw)["magnitude"]


def detection_scores(per_step: torch.Tensor) -> torch.Tensor:
    """[P] scores: the mean over generations and steps of a [P, n, k] detector output."""
    return per_step.float().mean(dim=(1, 2))


def grid_scores(per_step: torch.Tensor, steps: list[int], generations: list[int]) -> dict[tuple[int, int], torch.Tensor]:
    """{(k, n): [P]} for every grid cell: the mean over the first n generations and first k steps of one pass at the
    largest (K, N). Equal to a pass run at (k, n) itself, since x_T is seeded per (prompt, generation) and the
    steps are the trajectory's first ones.

    Args:
        per_step: [P, N, K] scores of one detector (trajectory_scores).
        steps: the k values (each <= K). generations: the n values (each <= N).
    """
    _, big_n, big_k = per_step.shape
    bad = [k for k in steps if not 1 <= k <= big_k] + [n for n in generations if not 1 <= n <= big_n]
    if bad:
        raise ValueError(f"grid values {bad} outside the pass's {big_k} steps x {big_n} generations")
    return {(k, n): per_step[:, :n, :k].float().mean(dim=(1, 2)) for k in steps for n in generations}
