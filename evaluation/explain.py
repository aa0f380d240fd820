"""Explain prompts with a pipeline: per-token significance (Wen et al.; filtering.explain does the math), named by
the pipeline's tokenizer, and a PNG of each prompt with its tokens shaded by significance."""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from memfilter.evaluation.detect import pipeline_trajectory
from memfilter.filtering.explain import significance_and_magnitudes

END_OF_WORD = "</w>"        # CLIP's BPE marks a word's last piece; shown as a plain word in the image


def _tokens(tokenizer, prompt: str) -> list[str]:
    """The prompt's token strings as the conditioning sees them: start token, the prompt's tokens, end token
    (truncated to model_max_length as the pipeline truncates), without padding."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return tokenizer.convert_ids_to_tokens(ids)


def explain_prompts(pipe, prompts: list[str], *, num_generations: int = 4, num_steps: int = 1,
                    num_inference_steps: int = 50, guidance_scale: float = 7.5, seed: int = 0,
                    resolution: int | None = None, index_offset: int = 0) -> list[dict]:
    """Per-token significance of each prompt: a list of records, one per prompt.

    Each record holds `prompt`; `tokens` (the tokenizer's strings: start token, the prompt's tokens, end token);
    `scores` (their significance, mean over generations and steps of ||dm/de_token||_2); `positions` (the rows
    of encoder_hidden_states they are, 0..len(tokens)-1); `sequence_length` L. Padding positions (len(tokens)..L-1)
    are left out of tokens and scores; their mean score is kept as `padding_mean_score` (None without padding).
    `magnitudes` [n][k] are m along the same trajectory and `magnitude` their mean, the prompt's detection score.

    SDXL: both encoders' states share one row per token position (concatenated features), so the first tokenizer
    names the rows; the pooled embedding and the time ids stay fixed (not differentiated).

    Args:
        pipe: a text-to-image pipeline of a known family (evaluation.generate.load_pipeline).
        prompts: the prompts (at least one).
        num_generations: n initial noises per prompt. Default 4.
        num_steps: first k sampling steps averaged. Default 1.
        num_inference_steps: the schedule the steps belong to. Default 50.
        guidance_scale: classifier-free guidance of the trajectory. Default 7.5.
        seed: x_T of generation j of prompt i is seeded by (seed, index_offset + i, j), as detection seeds it, so
            a file explained in the order it was scored follows the same trajectories. Default 0.
        resolution: image size in pixels. Default None: the pipeline's native resolution.
        index_offset: index of prompts[0] in a longer list. Default 0.
    Raises:
        ValueError: no prompts, or num_steps outside 1..num_inference_steps (names the setting).
    """
    if not prompts:
        raise ValueError("prompts: the list is empty; give at least one prompt to explain")
    family, scheduler, res, shape, uncond = pipeline_trajectory(pipe, resolution)
    records = []
    for i, prompt in enumerate(tqdm(prompts, desc="explain", unit="prompt")):
        cond = family.prompt_conditioning([prompt], res)                     # encoder_hidden_states [1, L, D]
        sig, mags = significance_and_magnitudes(
            pipe.unet, scheduler, cond, uncond, shape, num_generations=num_generations, num_steps=num_steps,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed,
            prompt_index=index_offset + i)                                   # [L], [n, k]
        tokens = _tokens(pipe.tokenizer, prompt)
        kept = len(tokens)
        records.append({"prompt": prompt, "tokens": tokens, "scores": sig[:kept].tolist(),
                        "positions": list(range(kept)), "sequence_length": int(sig.shape[0]),
                        "padding_mean_score": float(sig[kept:].mean()) if kept < sig.shape[0] else None,
                        "magnitude": float(mags.mean()), "magnitudes": mags.tolist()})
    return records


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)      # Pillow's bundled scalable font (needs FreeType)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()               # the bitmap fallback: fixed size


def render_tokens(tokens: list[str], scores: list[float] | torch.Tensor, path: str | Path, *,
                  scale: float | None = None, width: int = 900) -> Path:
    """A PNG of the prompt, each token on a box shaded white (0) to red (>= scale), its score printed below.

    Args:
        tokens: token strings (CLIP's end-of-word mark is dropped for display).
        scores: one significance per token.
        path: the PNG to write (its folder must exist).
        scale: the score drawn at full shade. Default None: the largest score of the prompt's own tokens
            (between the start and the end token; all tokens if there are none): the start token's row is the
            same for every prompt of a causal text encoder and can draw a large gradient that would wash out the
            rest. Larger scores are drawn at full shade; every number is printed.
        width: image width in pixels; tokens wrap onto new lines. Default 900.
    Returns:
        path.
    """
    from PIL import Image, ImageDraw

    scores = [float(s) for s in scores]
    if len(scores) != len(tokens):
        raise ValueError(f"render_tokens: {len(tokens)} tokens but {len(scores)} scores")
    inner = scores[1:-1] if len(scores) > 2 else scores
    scale = scale if scale is not None else max(inner, default=0.0)
    font, small = _font(18), _font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = lambda s, fnt: probe.textbbox((0, 0), s, font=fnt)[2]   # noqa: E731
    pad, gap, line_h, header_h = 6, 4, 50, 30
    boxes, x, y = [], pad, header_h
    for tok, s in zip(tokens, scores):
        label, number = tok.replace(END_OF_WORD, ""), f"{s:.3g}"
        w = max(text_w(label, font), text_w(number, small)) + 2 * pad
        if x + w > width - pad and x > pad:                 # wrap before a token that would not fit
            x, y = pad, y + line_h
        boxes.append((x, y, w, label, number, s))
        x += w + gap
    image = Image.new("RGB", (width, y + line_h + pad), "white")
    draw = ImageDraw.Draw(image)
    draw.text((pad, pad), f"token significance ||dm/de_token||, full shade = {scale:.3g}", fill=(60, 60, 60),
              font=small)
    for bx, by, w, label, number, s in boxes:
        shade = min(max(s / scale, 0.0), 1.0) if scale > 0 else 0.0
        fill = (255, int(255 - 215 * shade), int(255 - 215 * shade))          # white -> red
        draw.rectangle((bx, by, bx + w, by + line_h - 8), fill=fill, outline=(200, 200, 200))
        draw.text((bx + pad, by + 3), label, fill="black", font=font)
        draw.text((bx + pad, by + 26), number, fill=(70, 70, 70), font=small)
    path = Path(path)
    image.save(path)
    return path
