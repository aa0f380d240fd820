"""Peak resident set size of a block of code (the benchmarks' CPU memory measure)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil


class PeakRss:
    """Peak resident set size of this process inside a `with` block, in bytes.

    On Linux the kernel keeps the high-water mark (VmHWM) and lets a process reset it
    (/proc/self/clear_refs), which is exact; elsewhere a thread samples the RSS every millisecond.
    """

    def __init__(self):
        self.peak, self._proc, self._stop = 0, psutil.Process(), threading.Event()
        self._thread: threading.Thread | None = None

    def rss(self) -> int:
        return self._proc.memory_info().rss

    def __enter__(self) -> "PeakRss":
        try:
            Path("/proc/self/clear_refs").write_text("5")     # reset VmHWM to the current RSS
        except OSError:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            hwm = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM"))
            self.peak = int(hwm.split()[1]) * 1024
        else:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, self.rss())
