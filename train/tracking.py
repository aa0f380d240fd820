"""Experiment tracking: wandb (offline by default, a real run folder under the run directory) or none.

Only the main process creates a tracker; the others get `NullTracker`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class NullTracker:
    """Tracks nothing (logger=none, and every rank but 0)."""

    run_dir: Path | None = None

    def log(self, values: dict, step: int) -> None:
        pass

    def log_histogram(self, name: str, values, step: int) -> None:
        pass

    def log_images(self, name: str, images: list, captions: list[str], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker(NullTracker):
    """A wandb run. mode="offline" (default) writes <run_dir>/wandb/offline-run-*; `wandb sync` uploads it.

    Args:
        run_dir: the memfilter run directory; wandb writes under it.
        project: wandb project. Default "memfilter".
        config: the resolved config, recorded with the run.
        mode: "offline", "online" or "disabled". Default "offline".
        name: run name. Default: the run directory's name.
        tags: run tags.
    """

    def __init__(self, run_dir, project: str = "memfilter", config: dict | None = None, mode: str = "offline",
                 name: str | None = None, tags: list[str] | None = None, entity: str | None = None):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self._wandb = wandb
        self.run = wandb.init(project=project, entity=entity, config=config, mode=mode, dir=str(run_dir),
                              name=name or Path(run_dir).name, tags=tags, reinit="finish_previous")
        self.run_dir = Path(self.run.dir).parent if mode != "disabled" else None

    def log(self, values, step):
        self.run.log(values, step=step)

    def log_histogram(self, name, values, step):
        values = np.asarray(values, dtype=np.float64)
        if values.size:
            self.run.log({name: self._wandb.Histogram(values)}, step=step)

    def log_images(self, name, images, captions, step):
        self.run.log({name: [self._wandb.Image(im, caption=c) for im, c in zip(images, captions)]}, step=step)

    def finish(self):
        self.run.finish()
