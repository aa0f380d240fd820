"""Data accounting: every sample a source reads is either used or skipped with a reason.

Skips happen in dataloader workers; they travel to the training process inside the batch
(`batch["skipped"]`: (key, reason, detail) triples), where `DataReport` counts them. Logging of skips is
rate-limited; the full counts, with a few example keys per reason, go to <run_dir>/data_report.json.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path

log = logging.getLogger("memfilter.data")


class DataReport:
    """Counts of used and skipped samples (by reason) on one rank.

    Args:
        max_examples: example keys kept per reason. Default 5.
        log_interval_s: at most one skip warning per this many seconds. Default 30.
    """

    def __init__(self, max_examples: int = 5, log_interval_s: float = 30.0):
        self.used = 0
        self.skipped: Counter = Counter()
        self.examples: dict[str, list[str]] = {}
        self.max_examples, self.log_interval_s = max_examples, log_interval_s
        self._last_log, self._unlogged = 0.0, 0

    def add_used(self, n: int) -> None:
        self.used += n

    def add_skipped(self, events) -> None:
        for key, reason, detail in events:
            self.skipped[reason] += 1
            ex = self.examples.setdefault(reason, [])
            if len(ex) < self.max_examples:
                ex.append(f"{key}: {detail}" if detail else str(key))
            self._unlogged += 1
        now = time.monotonic()
        if self._unlogged and now - self._last_log >= self.log_interval_s:
            log.warning("skipped %d bad sample(s) since the last message (%s so far); see data_report.json",
                        self._unlogged, dict(self.skipped))
            self._last_log, self._unlogged = now, 0

    @property
    def seen(self) -> int:
        return self.used + sum(self.skipped.values())

    def state_dict(self) -> dict:
        return {"used": self.used, "skipped": dict(self.skipped), "examples": self.examples}

    def load_state_dict(self, state: dict) -> None:
        self.used = int(state["used"])
        self.skipped = Counter({k: int(v) for k, v in state["skipped"].items()})
        self.examples = {k: list(v) for k, v in state["examples"].items()}


def merge_reports(states: list[dict]) -> dict:
    """One summary from the state dicts of every rank (seen = used + skipped)."""
    skipped: Counter = Counter()
    examples: dict[str, list[str]] = {}
    for s in states:
        skipped.update(s["skipped"])
        for reason, ex in s["examples"].items():
            examples.setdefault(reason, []).extend(ex[: max(0, 5 - len(examples.get(reason, [])))])
    used = sum(s["used"] for s in states)
    return {"seen": used + sum(skipped.values()), "used": used, "skipped": dict(sorted(skipped.items())),
            "skipped_total": sum(skipped.values()), "examples": examples, "per_rank": states}


def write_report(path: str | Path, report: dict) -> None:
    Path(path).write_text(json.dumps(report, indent=1))
