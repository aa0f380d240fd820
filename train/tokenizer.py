"""A CLIP tokenizer that needs no download, for the tiny default model.

It is a real `transformers.CLIPTokenizer` (byte-level BPE, the same pre-tokenizer, bos/eos/padding as
SD's), with a vocabulary of the 512 byte symbols plus whole-word merges for a word list, so that the
captions of the embedded data become one token per word and any other text still tokenizes.
`save_pretrained` writes it like any tokenizer and `CLIPTokenizer.from_pretrained` loads it back.
"""
from __future__ import annotations

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

# Words of the embedded data and of common caption vocabulary; anything else falls back to bytes.
DEFAULT_WORDS = """
a an the of on in at with and or to by from is photo picture image painting drawing render of
red green blue yellow orange purple pink white black gray grey brown cyan magenta teal
circle square triangle star cross ring diamond hexagon shape shapes
left right top bottom center centre middle upper lower corner
small large big tiny huge medium background foreground striped dotted plain textured pattern
dark light bright pale on a
""".split()


def build_tiny_tokenizer(words: list[str] | None = None, model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer whose vocabulary is the byte symbols plus one token per word of `words`.

    Args:
        words: whole words that get their own token (lower case). Default: DEFAULT_WORDS.
        model_max_length: sequence length the tokenizer pads/truncates to. Default 77 (SD's).
    """
    words = sorted(set(w.lower() for w in (words or DEFAULT_WORDS)))
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    merges: list[tuple[str, str]] = []
    seen = set()
    for w in words:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:                    # merge left to right: ((w o) r) d</w>
            pair = (parts[0], parts[1])
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
