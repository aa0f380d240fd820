"""How often the item filter flags a repeated item the model does *not* treat differently from fresh ones (its
false-positive rate per item), on synthetic streams: 64 samples a step, 12 of them appearances of 6 ordinary
repeated images (2 a step each: a heavily repeated item), the rest unique; every sample's loss is drawn from
the same distribution, which drifts as a fine-tune would (`--drift`: the factor per step).

    python docs/scripts/item_false_flags.py [--z-crit 3 3.5 4] [--streams 24] [--steps 80] [--drift 0.96]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from memfilter.filtering.policies import ItemEvidence  # noqa: E402


def false_flags(seed: int, z_crit: float, steps: int, drift: float) -> int:
    """Ordinary repeated images flagged at least once in one stream (of 6)."""
    p = ItemEvidence(num_buckets=4, evidence=("loss",), z_crit=z_crit, null="population")   # streams carry no base
    g = torch.Generator().manual_seed(seed)
    flagged = set()
    for step in range(steps):
        image = 10_000 + step * 64 + torch.arange(64)
        image[:12] = torch.randint(1, 7, (12,), generator=g)
        t = torch.randint(0, 1000, (64,), generator=g)
        loss = drift ** step * (0.2 - 0.15 * t.float() / 1000) * torch.exp(0.3 * torch.randn(64, generator=g))
        keep = p.decide(torch.ones(64), t, groups=image[:, None], losses=loss)
        flagged |= set(image[:12][~keep[:12]].tolist())
    return len(flagged)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--z-crit", type=float, nargs="+", default=[3.0, 3.5, 4.0])
    ap.add_argument("--streams", type=int, default=24)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--drift", type=float, default=0.96)
    a = ap.parse_args()
    for z in a.z_crit:
        n = sum(false_flags(s, z, a.steps, a.drift) for s in range(a.streams))
        print(f"z_crit {z}: {n} of {6 * a.streams} ordinary repeated items flagged ({n / (6 * a.streams):.1%}), "
              f"{a.steps} steps, ~{2 * a.steps} appearances each")


if __name__ == "__main__":
    main()
