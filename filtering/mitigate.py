"""Inference-time mitigation (Wen et al., ICLR 2024) and the baselines it is compared with.

Method. At the FIRST sampling step, with x_T of generation j of prompt i seeded by (seed, i, j) exactly as detection
seeds it (filtering.detection.initial_latents), optimise the prompt's embedding e_p (the text encoder output, the
encoder_hidden_states rows; row 0, the start token, frozen) with Adam so that every generation's

    m_j = || eps(x_T, t_1, e_p) - eps(x_T, t_1, e_0) ||_2

falls below `target`, then sample the whole trajectory normally with the optimised e_p. The loss is the mean over
generations of each generation's m_j and the stopping rule "every m_j < target", so the target is a per-generation
magnitude: the official code takes one norm over the batch of n generations (sqrt(sum_j m_j^2)), which makes its
target depend on n (its target_loss 3 at n=4 is about 1.5 per generation). One embedding is shared by the n
generations of a prompt, as in the official code. For SDXL only encoder_hidden_states rows move: the pooled text
embedding and the time ids stay as they are.

Baselines (Somepalli et al. 2023, as Wen et al. compare them; the official prompt_augmentation): insert k random
vocabulary tokens / k random numbers / k repeats of the prompt's own words at random word positions, or add
N(0, sigma^2) to the prompt's embedding rows except row 0. Each is seeded per (seed, prompt index).

Everything here takes tensors, modules, strings and random generators; evaluation/mitigate.py runs it on a pipeline.
"""
from __future__ import annotations

import hashlib
import random
from typing import Sequence

import torch

from memfilter.filtering.conditioning import as_conditioning, expand
from memfilter.filtering.detection import initial_latents, trajectory_magnitudes
from memfilter.filtering.signal import eps_scale

DEFAULT_NUM_WORDS = 4        # k of the text baselines (the official prompt_augmentation's default repeat_num)
DEFAULT_SIGMA = 0.1          # std of the embedding noise (Somepalli et al.'s / the official rand_noise_lam)
NUMBER_RANGE = 100_000       # random numbers are drawn from [0, 100000), as the official rand_numb_add


def initial_noise(latent_shape: tuple[int, int, int], num_generations: int, *, seed: int = 0, prompt_index: int = 0,
                  generator_device: str | torch.device = "cpu") -> torch.Tensor:
    """x_T of a prompt's generations, [n, C, h, w] float32 on generator_device, unscaled (as `latents=` of a pipeline).

    Generation j of prompt `prompt_index` is drawn from a generator seeded by (seed, prompt_index, j), as detection
    (filtering.detection.trajectory_magnitudes) draws it, so magnitudes here and there are at the same x_T.

    Args:
        latent_shape: (C, h, w) of one latent.
        num_generations: n. seed: base seed. Default 0. prompt_index: the prompt's global index. Default 0.
        generator_device: device of the generators. Default "cpu" (the same noise on any device).
    """
    return initial_latents([(prompt_index, j) for j in range(num_generations)], latent_shape, seed=seed,
                           generator_device=generator_device)


def first_step_magnitudes(unet, scheduler, prompt_cond: torch.Tensor | dict, uncond: torch.Tensor | dict,
                          latent_shape: tuple[int, int, int], *, num_generations: int = 4,
                          num_inference_steps: int = 50, seed: int = 0, prompt_index: int = 0) -> torch.Tensor:
    """[n] float32: m of one prompt (batch-1 conditioning) at the first sampling step of each generation's x_T;
    detection's step-1 magnitudes of that prompt (the same function, index_offset=prompt_index).

    Args: as optimize_prompt_embedding (defaults n=4, 50 steps, seed 0, prompt_index 0).
    """
    return trajectory_magnitudes(unet, scheduler, prompt_cond, uncond, latent_shape, num_generations=num_generations,
                                 num_steps=1, num_inference_steps=num_inference_steps, seed=seed,
                                 index_offset=prompt_index)[0, :, 0]


def _magnitudes(pred_c: torch.Tensor, pred_u: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """[n] float32 m with its graph (filtering.signal's magnitude detaches; the optimisation needs the gradient)."""
    m = (pred_c.float() - pred_u.float()).flatten(1).norm(dim=1)       # [n]
    return m if scale is None else m * scale.abs()


def optimize_prompt_embedding(unet, scheduler, prompt_cond: torch.Tensor | dict, uncond: torch.Tensor | dict,
                              latent_shape: tuple[int, int, int], *, target: float, lr: float = 0.05,
                              max_iterations: int = 10, num_generations: int = 4, num_inference_steps: int = 50,
                              seed: int = 0, prompt_index: int = 0,
                              generator_device: str | torch.device = "cpu") -> tuple[torch.Tensor | dict, dict]:
    """Wen et al.'s mitigation: the prompt embedding optimised at the first step until every generation's m < target.

    Each iteration measures m_j of the n generations at (x_T_j, t_1); when every m_j < target it stops (reached),
    else when `max_iterations` Adam steps are spent it stops (not reached), else it takes one Adam step on the mean
    of the m_j. The guidance scale plays no part: at the first step x_T does not depend on it.

    Args:
        unet: the denoiser (eval mode; its weights are not changed and get no .grad).
        scheduler: a diffusers scheduler (its set_timesteps is called: pass a copy of the pipeline's).
        prompt_cond: ONE prompt's conditioning, batch 1 (filtering.conditioning; a bare [1, L, D] tensor is SD's
            encoder_hidden_states; SDXL's added_cond_kwargs are used as they are).
        uncond: the empty prompt's conditioning, batch 1, as the pipeline's CFG uses it.
        latent_shape: (C, h, w) of one latent.
        target: per-generation magnitude to get below (> 0; the scale of m depends on the model and resolution).
        lr: Adam learning rate. Default 0.05 (the paper's).
        max_iterations: at most this many Adam steps. Default 10 (the paper's).
        num_generations: n x_T's the embedding is optimised over. Default 4.
        num_inference_steps: the sampling schedule whose first timestep is used. Default 50.
        seed: x_T of generation j is seeded by (seed, prompt_index, j), as detection does. Default 0.
        prompt_index: the prompt's global index (the seed's second part). Default 0.
        generator_device: device of the noise generators. Default "cpu".
    Returns:
        (new_cond, info): new_cond in prompt_cond's form with the optimised encoder_hidden_states (row 0 bit for bit
        the input's); info: m_before / m_after ([n] float32, m at the input / returned embedding), iterations (Adam
        steps taken), reached (every m_after < target; False: stopped at the iteration limit), stop_reason (says
        which, in words), history ([iterations + 1, n] m per iteration), target.
    """
    if not target > 0:
        raise ValueError(f"target={target}: the per-generation magnitude target must be > 0")
    if max_iterations < 0:
        raise ValueError(f"max_iterations={max_iterations}: must be >= 0")
    cond, uncond = as_conditioning(prompt_cond), as_conditioning(uncond)
    emb = cond["encoder_hidden_states"]                                           # [1, L, D]
    if emb.shape[0] != 1:
        raise ValueError(f"optimize_prompt_embedding takes one prompt (batch 1); got {emb.shape[0]} rows")
    n, dev, dtype = num_generations, emb.device, emb.dtype
    x_in, t = _first_step_input(scheduler, initial_noise(latent_shape, n, seed=seed, prompt_index=prompt_index,
                                                         generator_device=generator_device),
                                num_inference_steps, dev, dtype)
    scale = eps_scale(scheduler.config.get("prediction_type", "epsilon"),
                              getattr(scheduler, "alphas_cumprod", None),
                              torch.full((n,), int(t), device=dev, dtype=torch.long))
    with torch.no_grad():      # e_0 does not move: its prediction is computed once
        pred_u = unet(x_in, t, **expand(uncond, n)).sample                        # [n, C, h, w]
    head = emb[:, :1].detach()                                                     # [1, 1, D] start token, frozen
    # optimised in float32 whatever the model's dtype (Adam's moments in fp16 underflow); rows 1..L-1 only, so
    # row 0 cannot move (the official code zeroes its gradient under AdamW, whose weight decay still moves it)
    tail = emb[:, 1:].detach().float().clone().requires_grad_(True)                # [1, L-1, D]
    optimizer = torch.optim.Adam([tail], lr=lr)
    history = []
    with torch.enable_grad():            # callers may sit under no_grad (pipelines' __call__ do)
        for it in range(max_iterations + 1):
            e = torch.cat([head, tail.to(dtype)], dim=1)                           # [1, L, D]
            pred_c = unet(x_in, t, **expand({**cond, "encoder_hidden_states": e}, n)).sample
            m = _magnitudes(pred_c, pred_u, scale)                                 # [n]
            history.append(m.detach().float().cpu())
            if bool((history[-1] < target).all()) or it == max_iterations:
                break
            # autograd.grad, not backward: the UNet's parameters may require grad and must not collect any
            (tail.grad,) = torch.autograd.grad(m.mean(), [tail])
            optimizer.step()
    new_emb = torch.cat([head, tail.detach().to(dtype)], dim=1)
    hist = torch.stack(history)                                                    # [iterations + 1, n]
    reached = bool((hist[-1] < target).all())
    iterations = len(history) - 1
    reason = (f"reached: every generation's m < target={target:g} after {iterations} iteration(s)" if reached else
              f"not reached: stopped at the iteration limit max_iterations={max_iterations} with max m "
              f"{float(hist[-1].max()):.4g} >= target={target:g}")
    out = {**cond, "encoder_hidden_states": new_emb} if isinstance(prompt_cond, dict) else new_emb
    return out, {"m_before": hist[0], "m_after": hist[-1], "iterations": iterations, "reached": reached,
                 "stop_reason": reason, "history": hist, "target": float(target)}


def _first_step_input(scheduler, x_T: torch.Tensor, num_inference_steps: int, device, dtype):
    """(the UNet input at the first step [n, C, h, w], its timestep), as the pipeline and detection build them."""
    scheduler.set_timesteps(num_inference_steps, device=device)    # before init_noise_sigma: it can depend on it
    t = scheduler.timesteps[0]
    latents = x_T.to(device, dtype) * scheduler.init_noise_sigma
    return scheduler.scale_model_input(latents, t), t


# --- baselines -----------------------------------------------------------------------------------------------------
def _baseline_seed(seed: int, prompt_index: int) -> int:
    # a namespace of its own: the perturbation's randomness is independent of the x_T seeds (seed, i, j)
    return int(hashlib.sha256(f"{seed}/{prompt_index}/baseline".encode()).hexdigest()[:15], 16)


def baseline_rng(seed: int, prompt_index: int) -> random.Random:
    """The text baselines' random.Random for prompt `prompt_index`: one changed prompt per (seed, prompt index)."""
    return random.Random(_baseline_seed(seed, prompt_index))


def baseline_generator(seed: int, prompt_index: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The embedding-noise baseline's torch.Generator for prompt `prompt_index`, seeded per (seed, prompt index)."""
    return torch.Generator(device).manual_seed(_baseline_seed(seed, prompt_index))


def _insert_words(prompt: str, draw, k: int, rng: random.Random) -> str:
    """k words from draw() each inserted at a random word boundary (start and end included) of the prompt so far,
    as the official insert_rand_word; the prompt's words keep their order."""
    if k < 0:
        raise ValueError(f"k={k}: the number of inserted words must be >= 0")
    words = prompt.split()
    for _ in range(k):
        word = draw()
        words.insert(rng.randint(0, len(words)), word)
    return " ".join(words)


def token_vocabulary(tokenizer) -> list[str]:
    """The tokenizer's tokens as words: what random token addition draws from (the official code decodes random
    token ids). Special tokens are left out, and tokens that decode to nothing, to whitespace inside, or to a
    partial UTF-8 byte (U+FFFD) are not words."""
    special = set(tokenizer.all_special_ids)
    words = (tokenizer.decode([i]).strip() for i in range(len(tokenizer)) if i not in special)
    return [w for w in words if w and w.isprintable() and "\ufffd" not in w and not any(ch.isspace() for ch in w)]


def add_random_tokens(prompt: str, rng: random.Random, vocabulary: Sequence[str], k: int = DEFAULT_NUM_WORDS) -> str:
    """Random token addition: k tokens drawn uniformly from `vocabulary` (e.g. the tokenizer's decoded tokens),
    inserted at random word positions.

    Args:
        prompt: the caption. rng: its random.Random (baseline_rng). vocabulary: the words to draw from (non-empty,
            no whitespace inside a word). k: tokens inserted. Default 4.
    """
    if not len(vocabulary):
        raise ValueError("add_random_tokens needs a non-empty vocabulary")
    return _insert_words(prompt, lambda: rng.choice(vocabulary), k, rng)


def add_random_numbers(prompt: str, rng: random.Random, k: int = DEFAULT_NUM_WORDS) -> str:
    """Random number addition: k integers from [0, 100000) inserted as words at random word positions.

    Args:
        prompt: the caption. rng: its random.Random (baseline_rng). k: numbers inserted. Default 4.
    """
    return _insert_words(prompt, lambda: str(rng.randrange(NUMBER_RANGE)), k, rng)


def repeat_words(prompt: str, rng: random.Random, k: int = DEFAULT_NUM_WORDS) -> str:
    """Random word repetition: k words drawn (with replacement) from the prompt's own words, each inserted again at a
    random word position. An empty prompt is returned as it is (nothing to repeat).

    Args:
        prompt: the caption. rng: its random.Random (baseline_rng). k: repeats inserted. Default 4.
    """
    original = prompt.split()
    if not original:
        return prompt
    return _insert_words(prompt, lambda: rng.choice(original), k, rng)


def add_embedding_noise(embedding: torch.Tensor, generator: torch.Generator,
                        sigma: float = DEFAULT_SIGMA) -> torch.Tensor:
    """Gaussian noise on the text embedding: N(0, sigma^2) added to every row except row 0 (the start token).

    Args:
        embedding: [B, L, D] prompt embedding (encoder_hidden_states).
        generator: its torch.Generator (baseline_generator); the noise is drawn on the generator's device.
        sigma: the noise's standard deviation (>= 0). Default 0.1.
    Returns:
        [B, L, D] in embedding's dtype and device; row 0 is the input's.
    """
    if sigma < 0:
        raise ValueError(f"sigma={sigma}: the noise's standard deviation must be >= 0")
    noise = torch.randn(embedding.shape, generator=generator, device=generator.device) * sigma   # [B, L, D]
    noise[:, 0] = 0
    return (embedding.float() + noise.to(embedding.device)).to(embedding.dtype)
