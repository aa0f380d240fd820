"""Intended memorization the filter must keep (Naseh et al. 2023).

Reproducing what a prompt explicitly names (a logo, a character, a product a user fine-tunes on) is
intended; the harm a filter removes is reproduction of what the prompt does not name. A `Protect` names
the intended items: their samples are never judged by the filter policy (they are kept, and their
magnitudes enter no statistic, so a heavily repeated concept cannot shift the population reference).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Protect:
    """Which samples the filter exempts.

    Args:
        captions: regular expressions; a sample whose caption matches one (re.search, case-insensitive)
            is protected. Default none.
        keys: sample keys to protect. Default none.
        keep_list: a text file with one key per line (blank lines and lines starting with # ignored),
            or a Parquet file with a `key` column (e.g. a curation pass's keep-list). Default None.
    """

    captions: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    keep_list: str | None = None

    def __post_init__(self):
        try:
            self._patterns = [re.compile(p, re.IGNORECASE) for p in self.captions]
        except re.error as e:
            raise ValueError(f"filter.protect.captions: {e.pattern!r} is not a regular expression ({e})") from None
        self._keys = {str(k) for k in self.keys}
        if self.keep_list:
            self._keys |= read_key_list(self.keep_list)

    def __bool__(self) -> bool:
        return bool(self._patterns or self._keys)

    def mask(self, keys, captions) -> torch.Tensor:
        """[B] bool: True for the samples that are protected."""
        return torch.tensor([str(k) in self._keys or any(p.search(c or "") for p in self._patterns)
                             for k, c in zip(keys, captions)], dtype=torch.bool)


def read_key_list(path: str | os.PathLike, field: str = "filter.protect.keep_list") -> set[str]:
    """Keys from a text file (one per line) or a Parquet file with a `key` column; errors name `field`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{field}={str(path)!r}: no such file (one key per line, or "
                                "Parquet with a `key` column)")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        if "key" not in table.column_names:
            raise ValueError(f"{field}={str(path)!r}: no `key` column (has {table.column_names})")
        return {str(k) for k in table.column("key").to_pylist()}
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return {line for line in lines if line and not line.startswith("#")}
