"""How many distinct items a run has seen, in 4 KiB: a HyperLogLog sketch (Flajolet et al. 2007).

The item policy measures time in *epochs of distinct items* (filtering.policies.ItemEvidence): an item's evidence
halves every `half_life_epochs` x (distinct items seen) samples, so the same exposures decide the same way at any
batch size, any number of GPUs and any dataset size. A set of every id would cost ~70 bytes per item (1M items:
70 MB in memory and 8 MB in every checkpoint); the sketch costs 2**p bytes whatever the data, is exact to save and
restore, and is within ~1.04/sqrt(2**p) (1.6% at p=12) of the true count. Ids are mixed (`mix48`) before they
index the registers, so ids that are not hashes count as well as hashed ones.
"""
from __future__ import annotations

import math

import torch

ID_BITS = 48        # item ids are 48-bit hashes (filtering.items.id48), never 0


def mix48(x: int) -> int:
    """x's bits spread over 48 (splitmix64's finaliser): ids that are not hashes (0, 1, 2, ...) index the registers
    as uniformly as hashed ones. Never 0 for x != 0 (a bijection of 64-bit words, folded)."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return ((x >> 48) ^ x) & (2 ** ID_BITS - 1) or 1


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

    def add_one(self, gid: int) -> float:
        """Add one id (0 = none, ignored) and return the new estimate: O(1), for a per-sample clock."""
        if gid:
            gid = mix48(gid)
            reg, rest = gid & (2 ** self.p - 1), gid >> self.p
            rank = ID_BITS - self.p - rest.bit_length() + 1
            old = int(self.registers[reg])
            if rank > old:
                self._sums()                         # up to date before the register changes
                self.registers[reg] = rank
                self._sum += 2.0 ** -rank - 2.0 ** -old
                self._zeros -= old == 0
        return self._estimate_from(*self._sums())

    def _sums(self) -> tuple[float, int]:
        """(sum of 2**-register, empty registers), kept up to date by add_one, recomputed after add/load."""
        if getattr(self, "_cached", None) is not self.registers:
            self._sum = float(torch.pow(2.0, -self.registers.double()).sum())
            self._zeros = int((self.registers == 0).sum())
            self._cached = self.registers
        return self._sum, self._zeros

    def _estimate_from(self, total: float, zeros: int) -> float:
        m = self.registers.numel()
        if zeros == m:
            return 0.0
        raw = 0.7213 / (1.0 + 1.079 / m) * m * m / total
        if raw <= 2.5 * m and zeros:
            return m * math.log(m / zeros)
        return raw

    def estimate(self) -> float:
        """The estimated count (linear counting while many registers are empty, as HyperLogLog prescribes)."""
        return self._estimate_from(*self._sums())

    def state_dict(self) -> dict:
        return {"registers": self.registers.clone()}

    def load_state_dict(self, state: dict) -> None:
        regs = state["registers"]
        if regs.numel() != self.registers.numel():
            raise ValueError(f"checkpoint's distinct-item sketch has {regs.numel()} registers, expected "
                             f"{self.registers.numel()}")
        self.registers = regs.clone().to(torch.uint8)
