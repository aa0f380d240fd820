"""Experiment tracking: wandb (offline by default, a real run folder under the run directory), TensorBoard
(event files under <run_dir>/logs), both, or none, as diffusers' `--report_to` offers them.

Only the main process creates a tracker; the others get `NullTracker`. wandb's environment (WANDB_MODE,
WANDB_PROJECT, WANDB_ENTITY, WANDB_RUN_GROUP, WANDB_NAME) wins over memfilter's defaults; a value set in the config
wins over both. A resumed run continues the same wandb run: its id is kept in <run_dir>/tracker.json.
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

    def __init__(self, run_dir, project: str | None = None, config: dict | None = None, mode: str | None = None,
                 name: str | None = None, tags: list[str] | None = None, entity: str | None = None,
                 group: str | None = None):
        import json

        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        env = os.environ.get
        mode = mode or env("WANDB_MODE") or "offline"
        ids = Path(run_dir) / "tracker.json"
        saved = json.loads(ids.read_text()).get("wandb_id") if ids.is_file() else None
        self._wandb = wandb
        self.run = wandb.init(project=project or env("WANDB_PROJECT") or "memfilter", entity=entity or env("WANDB_ENTITY"),
                              group=group or env("WANDB_RUN_GROUP"), config=config, mode=mode, dir=str(run_dir),
                              name=name or env("WANDB_NAME") or Path(run_dir).name, tags=tags,
                              id=saved, resume="allow" if saved else None, reinit="finish_previous")
        if mode != "disabled" and saved is None:
            ids.write_text(json.dumps({"wandb_id": self.run.id}))
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


class TensorBoardTracker(NullTracker):
    """TensorBoard event files under <run_dir>/logs (`tensorboard --logdir <run_dir>/logs`); a resumed run appends."""

    def __init__(self, run_dir, config: dict | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "logs"))
        self.run_dir = Path(run_dir) / "logs"
        if config:
            import json
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```")

    def log(self, values, step):
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, step)

    def log_histogram(self, name, values, step):
        values = np.asarray(values, dtype=np.float64)
        if values.size:
            self.writer.add_histogram(name, values, step)

    def log_images(self, name, images, captions, step):
        for i, im in enumerate(images):
            self.writer.add_image(f"{name}/{i}", np.asarray(im), step, dataformats="HWC")

    def finish(self):
        self.writer.close()


class Trackers(NullTracker):
    """Several trackers as one (report_to=all)."""

    def __init__(self, trackers: list):
        self.trackers = trackers
        self.run_dir = next((t.run_dir for t in trackers if t.run_dir), None)

    def log(self, values, step):
        for t in self.trackers:
            t.log(values, step)

    def log_histogram(self, name, values, step):
        for t in self.trackers:
            t.log_histogram(name, values, step)

    def log_images(self, name, images, captions, step):
        for t in self.trackers:
            t.log_images(name, images, captions, step)

    def finish(self):
        for t in self.trackers:
            t.finish()
