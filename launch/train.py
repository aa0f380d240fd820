"""Fine-tune Stable Diffusion with the memorization filter.

    python launch/train.py                                   # the embedded default: tiny model, drawn data
    accelerate launch launch/train.py filter=fixed filter.threshold=2.0 model.pretrained=<dir or hub id>
    python launch/train.py output_dir=<run dir> resume_from_checkpoint=latest
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from memfilter.launch.config_check import (ConfigError, check_model_settings, check_train_config,  # noqa: E402
                                           run_or_exit, train_args)

log = logging.getLogger("memfilter")


def run(cfg: DictConfig) -> dict:
    """Compose the objects of a training run from `cfg` and train. Returns the run summary."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, broadcast_object_list

    from memfilter.launch.builders import (build_components, build_dataset, build_filter, build_mitigation,
                                          build_protect, native_resolution)
    from memfilter.train.backends import accelerator_kwargs
    from memfilter.train.loop import train
    from memfilter.train.tracking import NullTracker

    check_train_config(cfg, torch.cuda.is_available())
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, **accelerator_kwargs(torch.cuda.is_available()),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed))
    # Every rank resolved output_dir (with its own clock); rank 0's value wins.
    out = [str(cfg.output_dir)]
    broadcast_object_list(out, from_process=0)
    run_dir = Path(out[0]).resolve()
    check_run_dir(run_dir, cfg.resume_from_checkpoint)      # every rank, before any rank writes
    accelerator.wait_for_everyone()
    accelerator.project_configuration = ProjectConfiguration(project_dir=str(run_dir))
    logging.getLogger("accelerate").setLevel(logging.WARNING)   # its per-file checkpoint lines
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)

    dataset = build_dataset(cfg.data, cfg.resolution or 0, cfg.seed)   # fail on a bad path before loading models
    components = build_components(cfg.model)
    check_model_settings(cfg, components)
    resolution = cfg.resolution or native_resolution(components)
    if getattr(dataset, "resolution", resolution) != resolution:      # drawn data: draw at the model's size
        dataset = build_dataset(cfg.data, resolution, cfg.seed)
    OmegaConf.set_struct(cfg, False)
    cfg.output_dir, cfg.resolution = str(run_dir), resolution
    OmegaConf.set_struct(cfg, True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, new_config_path(run_dir), resolve=True)
    accelerator.wait_for_everyone()

    policy = build_filter(cfg.filter, components.noise_scheduler.config.num_train_timesteps)
    protect = build_protect(cfg.filter)
    mitigation = build_mitigation(cfg.mitigation, components, cfg.seed)
    args, optim = train_args(cfg)
    tracker = build_tracker(cfg.logger, run_dir, resolved) if accelerator.is_main_process else NullTracker()
    log.info("run directory: %s (%d process(es), %s, filter=%s)", run_dir, accelerator.num_processes,
             accelerator.device, policy.name)
    try:
        summary = train(accelerator, components, dataset, policy, args, optim, tracker, config=resolved,
                        protect=protect, mitigation=mitigation)
    finally:
        tracker.finish()
    if accelerator.is_main_process:
        _print_summary(summary, run_dir)
    return summary


def build_tracker(logger: DictConfig, run_dir: Path, config: dict):
    """logger=wandb | tensorboard | all | none (diffusers' --report_to)."""
    from memfilter.train.tracking import NullTracker, TensorBoardTracker, Trackers, WandbTracker

    trackers = []
    if logger.name in ("wandb", "all"):
        name = logger.run_name or os.environ.get("WANDB_NAME") or f"{config['filter']['name']}-{run_dir.name}"
        trackers.append(WandbTracker(run_dir, project=logger.project, entity=logger.entity, config=config,
                                     mode=logger.mode, name=name, tags=list(logger.tags), group=logger.group))
    if logger.name in ("tensorboard", "all"):
        trackers.append(TensorBoardTracker(run_dir, config))
    return Trackers(trackers) if len(trackers) > 1 else (trackers[0] if trackers else NullTracker())


def check_run_dir(run_dir: Path, resume: str | None) -> None:
    """Nothing an earlier run wrote is lost: a fresh run needs an empty or new output_dir; a resume needs the
    directory it resumes (the default output_dir is a new timestamped one, which holds nothing to resume)."""
    entries = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if resume is None and entries:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ConfigError(f"output_dir={run_dir} already holds a run ({shown}); memfilter never overwrites one: "
                          "continue it with resume_from_checkpoint=latest, or choose another output_dir")
    if resume is not None and not run_dir.is_dir():
        raise ConfigError(f"resume_from_checkpoint={resume}: output_dir={run_dir} does not exist; name the run "
                          "directory to resume, e.g. output_dir=outputs/train/<run> resume_from_checkpoint=latest")


def new_config_path(run_dir: Path, again: str = "resume") -> Path:
    """config.yaml for a new run; a resumed (continued) run's config goes beside it (config-<again>-<n>.yaml),
    never over it."""
    path, n = run_dir / "config.yaml", 1
    while path.exists():
        path, n = run_dir / f"config-{again}-{n}.yaml", n + 1
    return path


def _print_summary(summary: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"memfilter run: {run_dir}", show_header=False)
    for k, v in summary.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console().print(table)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from memfilter.launch.sweep import in_multirun, run_job

    if in_multirun():            # -m: every job is its own accelerate launch, then its evaluation (launch/sweep.py)
        run_job(cfg)
        return
    run_or_exit(run, cfg)


def cli() -> None:
    """The command line: diffusers' flags (launch/diffusers_flags.py) beside Hydra overrides."""
    from memfilter.launch.diffusers_flags import FlagError, translate

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        sys.argv[1:] = translate(sys.argv[1:])
    except FlagError as err:
        print(f"memfilter: {err}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
