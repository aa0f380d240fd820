"""The distribution: one `memfilter` package (no top-level `train` to collide with a user's train.py), its configs
as package data, console scripts that work from any directory after a non-editable install."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_a_wheel_installed_in_a_fresh_environment_runs_from_another_directory(tmp_path):
    # built from a copy: setuptools writes build/ beside the sources, and the checkout must stay as it is
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "build", "outputs", "multirun", "wandb",
                                                             "__pycache__", "*.egg-info", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "whl"), str(src)],
                   check=True, capture_output=True, timeout=300, cwd=tmp_path)
    wheel = next((tmp_path / "whl").glob("memfilter-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "memfilter/conf/train.yaml" in names and "memfilter/launch/train.py" in names
    assert "memfilter/toyworld/assets/world-base/model_index.json" in names
    assert "memfilter/evaluation/prompt_sets/sdv1_500_memorized.jsonl" in names      # sets:<name> works installed
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for app in ("detect", "calibrate", "explain", "mitigate", "curate"):
        assert f"memfilter-{app} = memfilter.launch.{app}:" in entry_points
    assert not [n for n in names if n.split("/")[0] in ("train", "launch", "filtering", "evaluation", "tests")]
    # a fresh environment (dependencies from this one; the wheel itself installed, not this checkout)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp_path / "env")], check=True,
                   timeout=120)
    bin_dir = tmp_path / "env" / "bin"
    subprocess.run([str(bin_dir / "pip"), "install", "-q", "--no-deps", str(wheel)], check=True, timeout=300,
                   capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "train.py").write_text("raise SystemExit('the user train.py was imported')\n")   # a user's own
    for command in (["memfilter-train", "--help"], ["memfilter-train", "model=tiny_sdxl", "--cfg", "job"],
                    ["memfilter-demo", "--cfg", "job"]):
        proc = subprocess.run([str(bin_dir / command[0]), *command[1:]], cwd=elsewhere, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert "family: sdxl" in subprocess.run([str(bin_dir / "memfilter-train"), "model=tiny_sdxl", "--cfg", "job"],
                                             cwd=elsewhere, capture_output=True, text=True).stdout
