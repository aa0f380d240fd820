"""Shared test helpers: compose the real Hydra config, run the real training app in-process or as processes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def compose(overrides: list[str], config_name: str = "train"):
    """The training config as `python launch/train.py <overrides>` would see it (another app's with
    config_name: "demo", "prepare", ...)."""
    from hydra import compose as hydra_compose

    import memfilter.launch.config_check  # noqa: F401  (registers the settings' defaults with Hydra's ConfigStore)
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


# Small and fast: 16 drawn images of the toy world at 16 px (2 items x 4 appearances, 8 items once), batch 4, a
# handful of steps.
TINY = ["model=tiny", "logger=none", "train_batch_size=4", "max_train_steps=4", "checkpointing_steps=0", "validation_prompts=[]", "logging_steps=1",
        "model.tiny.resolution=16", "model.tiny.block_out_channels=[32,32]", "model.tiny.vae_channels=[32,32]"]


def required_overrides(option: str, tmp_path: Path) -> list[str]:
    """What a config option needs besides its defaults to pass its checks (e.g. filter=precomputed: a pass's
    decisions), made in tmp_path."""
    if option == "filter=precomputed":
        (tmp_path / "drop.txt").write_text("world-000000-000\n")
        return [f"filter.decisions={tmp_path / 'drop.txt'}"]
    if option == "mitigation=multiple_captions":
        (tmp_path / "captions.jsonl").write_text('{"key": "world-000000-000", "captions": ["a red circle"]}\n')
        return [f"mitigation.caption_file={tmp_path / 'captions.jsonl'}"]
    return []


WORLD = ["data.num_unique=8", "data.num_duplicated=2", "data.repeats=4", "data.any_model=true"]


def _args(run_dir, overrides):
    """TINY, then a tiny toy world (data=world) unless another data source is chosen, then the test's own."""
    data = [] if any(o.startswith("data=") for o in overrides) else ["data=world", *WORLD]
    return TINY + data + ([f"output_dir={run_dir}"] if run_dir else []) + overrides


def train_in_process(tmp_path: Path, overrides: list[str]) -> tuple[Path, dict]:
    from memfilter.launch.train import run

    run_dir = tmp_path / "run"
    summary = run(compose(_args(run_dir, overrides)))
    return run_dir, summary


def launch_cmd(run_dir: Path | None, overrides: list[str], num_processes: int = 1) -> list[str]:
    """Command line of the training app; run_dir=None keeps the default (timestamped) output_dir."""
    return app_cmd("train.py", _args(run_dir, overrides), num_processes)


def app_cmd(script: str, args: list[str], num_processes: int = 1) -> list[str]:
    """Command line of an app of launch/: plain python for one process, `accelerate launch` for more."""
    path = str(REPO / "launch" / script)
    if num_processes == 1:
        return [sys.executable, path, *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", "0", path, *args]


def run_cmd(cmd: list[str], timeout: int = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensor ops: on a busy 2-core machine two threads are far slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def repo() -> Path:
    return REPO
