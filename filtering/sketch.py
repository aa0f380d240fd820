"""How many distinct items a run has seen, in 4 KiB: a HyperLogLog sketch (Flajolet et al. 2007).

The item policy measures time in *epochs of distinct items* (filtering.policies.ItemEvidence): an item's evidence
halves every `half_life_epochs` x (distinct items seen) samples, so the same exposures decide the same way at any
batch size, any number of GPUs and any dataset size. A set of every id would cost ~70 bytes per item (1M items:
70 MB in memory and 8 MB in every checkpoint); the sketch costs 2**p bytes whatever the data, is exact to save and
restore, and is within ~1.04/sqrt(2**p) (1.6% at p=12) of the true count. Item ids are 48-bit hashes (uniform
bits), so they index the registers directly.
"""
from __future__ import annotations

import math

import torch

ID_BITS = 48        # item ids are 48-bit hashes (filtering.policies._id48), never 0


class DistinctCount:
    """Estimated number of distinct non-zero 48-bit ids added.

    Args:
        p: log2 of the number of registers (2**p bytes of state; relative error ~1.04/sqrt(2**p)). Default 12.
    """

    def __init__(self, p: int = 12):
        if not 4 <= p <= 16:
            raise ValueError(f"DistinctCount p={p}: expected 4..16")
        self.p = p
        self.registers = torch.zeros(2 ** p, dtype=torch.uint8)

    def add(self, ids: torch.Tensor) -> None:
        """Add [N] int64 ids (0 = none, ignored)."""
        ids = ids.detach().long().cpu().reshape(-1)
        ids = ids[ids != 0]
        if ids.numel() == 0:
            return
        idx = ids & (2 ** self.p - 1)
        rest = ids >> self.p                                    # the other ID_BITS - p bits
        # rank = position of the leftmost 1 of `rest` as a (ID_BITS - p)-bit word, 1-based (all zeros: width + 1)
        width = ID_BITS - self.p
        bit_length = torch.where(rest > 0, torch.floor(torch.log2(rest.double().clamp_min(1))).long() + 1, 0)
        rank = (width - bit_length + 1).to(torch.uint8)
        self.registers = self.registers.scatter_reduce(0, idx, rank, reduce="amax")

    def estimate(self) -> float:
        """The estimated count (linear counting while many registers are empty, as HyperLogLog prescribes)."""
        m = self.registers.numel()
        zeros = int((self.registers == 0).sum())
        if zeros == m:
            return 0.0
        alpha = 0.7213 / (1.0 + 1.079 / m)
        raw = alpha * m * m / float(torch.pow(2.0, -self.registers.double()).sum())
        if raw <= 2.5 * m and zeros:
            return m * math.log(m / zeros)
        return raw

    def state_dict(self) -> dict:
        return {"registers": self.registers.clone()}

    def load_state_dict(self, state: dict) -> None:
        regs = state["registers"]
        if regs.numel() != self.registers.numel():
            raise ValueError(f"checkpoint's distinct-item sketch has {regs.numel()} registers, expected "
                             f"{self.registers.numel()}")
        self.registers = regs.clone().to(torch.uint8)
