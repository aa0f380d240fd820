"""Conditioning as the denoiser takes it: a dict of its keyword arguments, nested one level at most.

    SD 1.x/2.x: {"encoder_hidden_states": [B, L, D]}
    SDXL:       {"encoder_hidden_states": [B, L, D], "added_cond_kwargs": {"text_embeds": [B, P], "time_ids": [B, 6]}}

so `unet(x_t, t, **cond)` works for every family and the signal, the training step and detection never ask which
family they hold (train.families builds these dicts). Every tensor has the batch on dim 0. A bare tensor is taken
as encoder_hidden_states, so SD-only callers may keep passing embeddings.
"""
from __future__ import annotations

from typing import Callable

import torch

Conditioning = dict


def as_conditioning(x: torch.Tensor | dict) -> dict:
    """A conditioning dict from a dict (returned as is) or a bare [B, L, D] prompt embedding."""
    return x if isinstance(x, dict) else {"encoder_hidden_states": x}


def tree_map(fn: Callable[..., torch.Tensor], cond: dict, *others: dict) -> dict:
    """fn applied to every tensor of `cond` (and the tensors at the same place in `others`)."""
    return {k: tree_map(fn, v, *(o[k] for o in others)) if isinstance(v, dict) else fn(v, *(o[k] for o in others))
            for k, v in cond.items()}


def leaves(cond: dict) -> list[torch.Tensor]:
    return [t for v in cond.values() for t in (leaves(v) if isinstance(v, dict) else [v])]


def num_rows(cond: dict) -> int:
    return int(leaves(cond)[0].shape[0])


def expand(cond: dict, b: int) -> dict:
    """A batch-1 conditioning broadcast to b rows (a view: no copy); a batch-b one as it is."""
    return tree_map(lambda t: t.expand(b, *t.shape[1:]) if t.shape[0] == 1 and b != 1 else t, cond)


def select(cond: dict, index) -> dict:
    """Rows `index` (a list, slice or index tensor) of every tensor."""
    return tree_map(lambda t: t[index], cond)


def cat(conds: list[dict]) -> dict:
    """Rows of several conditionings, in order (e.g. [prompts, empty prompt] for one CFG call)."""
    return tree_map(lambda *ts: torch.cat(ts), conds[0], *conds[1:])


def where(mask: torch.Tensor, cond_true: dict, cond_false: dict) -> dict:
    """Per row: `cond_true` where mask [B] holds, else `cond_false` (either may have batch 1)."""
    def pick(a, b):
        m = mask.to(a.device).reshape(-1, *([1] * (max(a.dim(), b.dim()) - 1)))
        return torch.where(m, a, b)
    return tree_map(pick, cond_true, cond_false)


def to(cond: dict, device=None, dtype: torch.dtype | None = None) -> dict:
    """Floating tensors cast to dtype, every tensor moved to device."""
    return tree_map(lambda t: t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point()
                                   else t.dtype), cond)
