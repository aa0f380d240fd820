"""A CLIP tokenizer that needs no download, for the tiny default model.

It is a real `transformers.CLIPTokenizer` (byte-level BPE, the same pre-tokenizer, bos/eos/padding as
SD's), with a vocabulary of the 512 byte symbols plus whole-word merges for a word list, so that the
captions of the embedded data become one token per word (merges learned by BPE on that list) and any other text still tokenizes.
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


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges learned on `words` (each once) until every word is one symbol.

    Learned, not written word by word: BPE applies merges by rank, so merges made per word conflict
    (a pair "r i" from "right" ranked before "t r" would split "triangle" into bytes). Merges learned
    on the whole list re-segment every listed word into itself. Ties go to the smallest pair, so the
    result is deterministic.
    """
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs:
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for k, seq in enumerate(seqs):
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[k] = out


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
    merges = _learn_merges(words)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
