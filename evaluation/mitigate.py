"""Mitigate at inference on a loaded pipeline: Wen et al.'s embedding optimisation or a baseline, then the pipeline's
own sampling from the same x_T as detection (filtering.mitigate does the math).

Per prompt i: its conditioning as the pipeline builds it (train.families), the changed conditioning (method), m at
the first step before and after at x_T seeded by (seed, i, j), then `pipe(prompt_embeds=..., latents=x_T)`: the
images come from the pipeline's full CFG trajectory, with negative embeddings of the empty prompt as it would build
them (SDXL: zeros under force_zeros_for_empty_prompt; pooled embeddings and time ids as the pipeline makes them).
"""
from __future__ import annotations

from typing import Iterator

import torch
from tqdm.auto import tqdm

from memfilter.evaluation.detect import pipeline_trajectory
from memfilter.filtering.conditioning import as_conditioning
from memfilter.filtering.mitigate import (DEFAULT_NUM_WORDS, DEFAULT_SIGMA, add_embedding_noise, add_random_numbers,
                                          add_random_tokens, baseline_generator, baseline_rng, first_step_magnitudes,
                                          initial_noise, optimize_prompt_embedding, repeat_words,
                                          token_vocabulary)

METHODS = ("embedding", "random_tokens", "random_numbers", "repeat_words", "embedding_noise", "none")
TEXT_METHODS = ("random_tokens", "random_numbers", "repeat_words")


def check_method(method: str, target: float | None) -> None:
    """A ValueError naming the valid methods for an unknown one, or the missing target of method=embedding."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a mitigation method; choose one of {', '.join(METHODS)}")
    if method == "embedding" and (target is None or not target > 0):
        raise ValueError(f"target={target!r}: method=embedding needs a per-generation magnitude target > 0 (m at the "
                         "first step, e.g. from detection's scores of non-memorized prompts)")


def iter_mitigate(pipe, prompts: list[str], method: str = "embedding", *, target: float | None = None,
                  lr: float = 0.05, max_iterations: int = 10, num_words: int = DEFAULT_NUM_WORDS,
                  sigma: float = DEFAULT_SIGMA, num_generations: int = 4, num_inference_steps: int = 50,
                  guidance_scale: float = 7.5, seed: int = 0, resolution: int | None = None,
                  index_offset: int = 0, progress: bool = True) -> Iterator[list[dict]]:
    """`mitigate` one prompt at a time: yields each prompt's rows as soon as its images exist (Args: as mitigate)."""
    check_method(method, target)
    family, scheduler, res, shape, uncond = pipeline_trajectory(pipe, resolution)
    vocabulary = token_vocabulary(pipe.tokenizer) if method == "random_tokens" else None
    steps = dict(num_generations=num_generations, num_inference_steps=num_inference_steps, seed=seed)
    for i, prompt in enumerate(tqdm(prompts, desc=f"mitigate ({method})", unit="prompt", disable=not progress)):
        index = index_offset + i
        cond = family.prompt_conditioning([prompt], res)
        used, info = prompt, None
        if method == "embedding":
            new_cond, info = optimize_prompt_embedding(pipe.unet, scheduler, cond, uncond, shape, target=target, lr=lr,
                                                       max_iterations=max_iterations, prompt_index=index, **steps)
            before, after = info["m_before"], info["m_after"]
        else:
            before = first_step_magnitudes(pipe.unet, scheduler, cond, uncond, shape, prompt_index=index, **steps)
            new_cond, used = _baseline(family, method, prompt, cond, index, res, seed=seed, num_words=num_words,
                                       sigma=sigma, vocabulary=vocabulary)
            after = before if method == "none" else first_step_magnitudes(
                pipe.unet, scheduler, new_cond, uncond, shape, prompt_index=index, **steps)
        images = _sample(pipe, new_cond, uncond, initial_noise(shape, num_generations, seed=seed, prompt_index=index),
                         res, num_inference_steps, guidance_scale)
        yield [{"prompt_index": index, "generation": j, "prompt": prompt, "prompt_used": used, "method": method,
                "image": image, "m_before": float(before[j]), "m_after": float(after[j]),
                "reached": None if info is None else info["reached"],
                "iterations": None if info is None else info["iterations"],
                "stop_reason": None if info is None else info["stop_reason"]}
               for j, image in enumerate(images)]


def mitigate(pipe, prompts: list[str], method: str = "embedding", **kw) -> list[dict]:
    """Generate with mitigation: per prompt and generation the image and m at the first step before and after.

    Args:
        pipe: a diffusers pipeline of a known family (evaluation.generate.load_pipeline; SD 1.x/2.x or SDXL).
        prompts: the prompts; prompt i is index index_offset + i of the seeds.
        method: "embedding" (Wen et al.), "random_tokens", "random_numbers", "repeat_words", "embedding_noise" or
            "none" (the prompt as it is, the reference). Default "embedding".
        target: per-generation m to get below; required for method=embedding. Default None.
        lr: Adam learning rate. Default 0.05. max_iterations: at most this many Adam steps. Default 10.
        num_words: k of the text baselines (tokens, numbers or repeats inserted). Default 4.
        sigma: std of the embedding noise. Default 0.1.
        num_generations: n images per prompt. Default 4.
        num_inference_steps, guidance_scale: the sampler's. Defaults 50, 7.5 (the paper's).
        seed: x_T of generation j of prompt i is seeded by (seed, i, j), as detection; the baselines' randomness by
            (seed, i). Default 0.
        resolution: image size. Default: the pipeline's.
        index_offset: global index of prompt 0 (for a long list done in parts). Default 0.
        progress: show a progress bar. Default True.
    Returns:
        One dict per (prompt, generation): prompt_index, generation, prompt, prompt_used (the changed prompt of a
        text baseline, else the prompt), method, image (PIL), m_before, m_after (m at the first step with the
        original / the used conditioning at the same x_T; for text baselines m of the changed prompt), reached,
        iterations and stop_reason (method=embedding; None otherwise).
    """
    return [row for rows in iter_mitigate(pipe, prompts, method, **kw) for row in rows]


def _baseline(family, method: str, prompt: str, cond: dict, index: int, res: int, *, seed: int, num_words: int,
              sigma: float, vocabulary: list[str] | None) -> tuple[dict, str]:
    """(conditioning, prompt used) of a baseline: the text ones re-encode the changed prompt; the noise one changes
    encoder_hidden_states only (SDXL's pooled embedding and time ids stay)."""
    if method == "none":
        return cond, prompt
    if method == "embedding_noise":
        g = baseline_generator(seed, index)
        return {**cond, "encoder_hidden_states": add_embedding_noise(cond["encoder_hidden_states"], g, sigma)}, prompt
    rng = baseline_rng(seed, index)
    if method == "random_tokens":
        used = add_random_tokens(prompt, rng, vocabulary, num_words)
    elif method == "random_numbers":
        used = add_random_numbers(prompt, rng, num_words)
    else:
        used = repeat_words(prompt, rng, num_words)
    return family.prompt_conditioning([used], res), used


@torch.no_grad()
def _sample(pipe, cond: dict, uncond: dict, x_T: torch.Tensor, res: int, num_inference_steps: int,
            guidance_scale: float) -> list:
    """The pipeline's own sampling of n images from x_T [n, C, h, w] with the conditioning's embeddings."""
    n = x_T.shape[0]
    cond, uncond = as_conditioning(cond), as_conditioning(uncond)
    rows = lambda t: t.expand(n, *t.shape[1:]).contiguous()            # noqa: E731  (batch 1 -> n rows)
    kw = {"prompt_embeds": rows(cond["encoder_hidden_states"]),
          "negative_prompt_embeds": rows(uncond["encoder_hidden_states"])}
    if "added_cond_kwargs" in cond:                                    # SDXL: pooled embeddings; time ids from size
        kw["pooled_prompt_embeds"] = rows(cond["added_cond_kwargs"]["text_embeds"])
        kw["negative_pooled_prompt_embeds"] = rows(uncond["added_cond_kwargs"]["text_embeds"])
    # the pipeline scales latents by init_noise_sigma itself and does not cast them: give them in the UNet's dtype
    return pipe(latents=x_T.to(pipe.device, pipe.unet.dtype), num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, height=res, width=res, **kw).images
