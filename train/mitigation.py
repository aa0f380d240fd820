"""Training-time mitigation baselines: the caption and embedding perturbations the literature compares the magnitude
filter with (Somepalli et al., "Understanding and Mitigating Copying in Diffusion Models", NeurIPS 2023, as Wen et al.,
ICLR 2024, compare them).

    mitigation=random_caption      the caption replaced by random vocabulary words (as many as it has)
    mitigation=random_tokens       num_words random vocabulary tokens inserted at random word positions
    mitigation=random_numbers      num_words random integers inserted
    mitigation=repeat_words        num_words of the caption's own words repeated at random positions
    mitigation=multiple_captions   one of the sample's alternative captions, from mitigation.caption_file (e.g. BLIP
                                   captions made offline: JSONL {"key", "captions"} or Parquet key/captions)
    mitigation=embedding_noise     N(0, sigma^2) on the text embedding (every row but the start token)

Each applies to a sample with `probability`, drawn per (seed, key, step), so a resumed run perturbs exactly as the
uninterrupted one and the same sample is perturbed differently at each appearance. A baseline combines with any
filter (`filter=item mitigation=random_numbers`) or replaces it (`filter=none mitigation=...`); the filter then
judges the perturbed sample. The text perturbations are the inference-time ones of filtering.mitigate, applied to
training captions.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import torch

from memfilter.filtering.mitigate import (DEFAULT_NUM_WORDS, DEFAULT_SIGMA, add_embedding_noise, add_random_numbers,
                                          add_random_tokens, repeat_words)
from memfilter.filtering.settings import check_settings, int_at_least, num_in, setting

METHODS = ("none", "random_caption", "random_tokens", "random_numbers", "repeat_words", "multiple_captions",
           "embedding_noise")
CAPTION_METHODS = METHODS[1:6]


@dataclass
class MitigationArgs:
    """A training-time baseline (module docstring); each field holds its default, check and doc."""

    name: str = setting("none", f"one of {', '.join(METHODS)}", lambda v: v in METHODS, "the baseline")
    probability: float = setting(1.0, "a number in [0, 1], e.g. mitigation.probability=0.3", num_in(0, 1),
                                 "share of samples perturbed, drawn per (seed, key, step)")
    num_words: int = setting(DEFAULT_NUM_WORDS, "an integer >= 1", int_at_least(1),
                             "words inserted by random_tokens, random_numbers and repeat_words")
    sigma: float = setting(DEFAULT_SIGMA, "a number > 0", num_in(0, float("inf"), lo_open=True),
                           "std of embedding_noise")
    caption_file: str | None = setting(None, "null or a .jsonl/.parquet file of key -> captions",
                                       lambda v: v is None or isinstance(v, str),
                                       "multiple_captions: each sample's alternative captions")

    def __post_init__(self):
        check_settings(self, "mitigation.")
        if self.name == "multiple_captions" and not self.caption_file:
            raise ValueError("mitigation=multiple_captions needs mitigation.caption_file=<file>: a JSONL of "
                             '{"key": ..., "captions": [...]} or a Parquet file with key and captions columns')


def sample_rng(seed: int, key: str, step: int) -> random.Random:
    """The perturbation's random.Random for one appearance of a sample: a pure function of (seed, key, step)."""
    return random.Random(int(hashlib.sha256(f"{seed}/{key}/{step}/mitigation".encode()).hexdigest()[:15], 16))


class Mitigation:
    """Applies `args` to a micro-batch's captions (`captions`) and text embeddings (`embeddings`).

    Args:
        args: the baseline's settings.
        vocabulary: words for random_caption and random_tokens (filtering.mitigate.token_vocabulary).
        seed: the run's seed.
    """

    def __init__(self, args: MitigationArgs, vocabulary: list[str], seed: int):
        if args.name in ("random_caption", "random_tokens") and not vocabulary:
            raise ValueError(f"mitigation={args.name} needs a vocabulary: the tokenizer gave no whole-word token")
        self.args, self.vocabulary, self.seed = args, vocabulary, seed
        self.alternatives = read_caption_file(args.caption_file) if args.name == "multiple_captions" else {}

    @property
    def active(self) -> bool:
        return self.args.name != "none"

    def _chosen(self, key: str, step: int) -> tuple[bool, random.Random]:
        rng = sample_rng(self.seed, key, step)
        return rng.random() < self.args.probability, rng

    def captions(self, captions: list[str], keys: list[str], step: int) -> list[str]:
        """The micro-batch's captions after a caption baseline (unchanged for the others; multiple_captions leaves a
        sample without alternatives in the caption file as it is)."""
        if self.args.name not in CAPTION_METHODS:
            return list(captions)
        out = []
        for caption, key in zip(captions, keys):
            chosen, rng = self._chosen(key, step)
            out.append(self._caption(caption, rng, self.alternatives.get(key)) if chosen else caption)
        return out

    def _caption(self, caption: str, rng: random.Random, options: list[str] | None) -> str:
        a, name = self.args, self.args.name
        if name == "random_caption":
            return " ".join(rng.choice(self.vocabulary) for _ in range(max(1, len(caption.split()))))
        if name == "random_tokens":
            return add_random_tokens(caption, rng, self.vocabulary, a.num_words)
        if name == "random_numbers":
            return add_random_numbers(caption, rng, a.num_words)
        if name == "repeat_words":
            return repeat_words(caption, rng, a.num_words)
        return rng.choice(options) if options else caption         # multiple_captions

    def embeddings(self, text: dict, keys: list[str], step: int) -> dict:
        """The family's text conditioning after embedding_noise on the chosen rows of encoder_hidden_states
        (a copy; unchanged for the other baselines)."""
        if self.args.name != "embedding_noise" or not keys:
            return text
        hidden = text["encoder_hidden_states"]                         # [B, L, D]
        rows = []
        for i, key in enumerate(keys):
            chosen, rng = self._chosen(key, step)
            if chosen:
                gen = torch.Generator().manual_seed(rng.getrandbits(63))
                rows.append((i, add_embedding_noise(hidden[i:i + 1].cpu(), gen, self.args.sigma)))
        if not rows:
            return text
        hidden = hidden.clone()
        for i, noisy in rows:
            hidden[i:i + 1] = noisy.to(hidden.device)
        return {**text, "encoder_hidden_states": hidden}


def read_caption_file(path: str) -> dict[str, list[str]]:
    """key -> alternative captions from JSONL ({"key": ..., "captions": [...]}) or Parquet (key, captions)."""
    import json
    from pathlib import Path

    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"mitigation.caption_file={path}: no such file")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq
        rows = pq.read_table(p, columns=["key", "captions"]).to_pylist()
    else:
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    out = {}
    for n, row in enumerate(rows):
        caps = row.get("captions") if isinstance(row, dict) else None
        if "key" not in row or not isinstance(caps, list):
            raise ValueError(f"mitigation.caption_file={path}: row {n + 1} needs a key and a list of captions")
        out[str(row["key"])] = [c for c in caps if isinstance(c, str) and c.strip()]
    return out
