"""Ablation sweeps (launch/sweep.py): a Hydra multirun of the training app whose every job is its own accelerate launch,
its evaluation, and one table; failed jobs shown, finished jobs skipped on a re-run."""
from __future__ import annotations

import csv
import json

from tests.conftest import app_cmd, run_cmd, _args

EVAL = ["evaluation.num_images_per_prompt=1", "evaluation.num_inference_steps=2", "evaluation.max_duplicated=2",
        "evaluation.max_unique=2", "evaluation.grid_rows=2", "evaluation.background_sample=20"]


def test_a_local_multirun_trains_evaluates_and_tabulates_every_job(tmp_path):
    sweep = tmp_path / "sweep"
    # three jobs; the third has a value its policy refuses, so that job fails at start
    cmd = app_cmd("train.py", ["-m", *_args(None, ["max_train_steps=2", "filter=batch_quantile",
                                                   "filter.drop_fraction=0.25,0.5,1.5"]),
                               f"hydra.sweep.dir={sweep}", "sweep.evaluate_overrides=[" + ",".join(f"'{e}'" for e in EVAL) + "]"])
    proc = run_cmd(cmd, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = {d.name: json.loads((d / "sweep_job.json").read_text()) for d in sweep.iterdir() if d.is_dir()}
    assert sorted(jobs) == ["0", "1", "2"]
    assert [jobs[j]["status"] for j in ("0", "1", "2")] == ["done", "done", "failed"]
    for j, frac in (("0", 0.75), ("1", 0.5)):
        run = sweep / j / "run"
        summary = json.loads((run / "train_summary.json").read_text())
        assert summary["kept_fraction"] == frac                       # each job trained with its own value
        assert (run / "model_index.json").is_file() and (run / "eval" / "report.json").is_file()
    failed = jobs["2"]
    assert failed["phase"] == "train" and failed["rc"] != 0 and "filter.drop_fraction" in failed["error"]
    assert "accelerate.commands.launch" in " ".join(failed["command"])       # its own accelerate launch

    rows = list(csv.DictReader(open(sweep / "sweep.csv")))
    assert [r["filter.drop_fraction"] for r in rows] == ["0.25", "0.5", "1.5"]
    assert [r["status"] for r in rows] == ["done", "done", "failed"]
    assert float(rows[0]["other kept"]) + float(rows[0]["dup kept"]) > 0 and rows[0]["duplicated replicated"] != ""
    assert "filter.drop_fraction" in rows[2]["error"]
    md = (sweep / "sweep.md").read_text()
    assert "3 jobs: 2 done, 1 failed" in md and (sweep / "tradeoff.png").stat().st_size > 0

    # the same sweep again: finished jobs are skipped (their files untouched), the failed one is retried
    before = {p: p.stat().st_mtime_ns for j in ("0", "1") for p in (sweep / j / "run").rglob("*") if p.is_file()}
    again = run_cmd(cmd, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier, skipped") == 2
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert json.loads((sweep / "2" / "sweep_job.json").read_text())["status"] == "failed"

    # a different sweep into the same directory is refused, nothing overwritten
    other = run_cmd([*cmd[:-2], "filter.drop_fraction=0.1,0.2", *cmd[-2:]], timeout=300)
    assert other.returncode != 0 and "another sweep" in other.stdout + other.stderr
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_the_table_again_from_the_command_line(tmp_path):
    job = tmp_path / "0"
    job.mkdir()
    (job / "sweep_job.json").write_text(json.dumps({"overrides": ["filter=none"], "status": "failed", "phase": "train",
                                                    "rc": 1, "error": "memfilter: boom", "run_dir": str(job / "run"),
                                                    "wall_seconds": {"train": 1.5}}))
    proc = run_cmd(app_cmd("sweep.py", [str(tmp_path)]))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    assert rows[0]["status"] == "failed" and rows[0]["error"] == "train: memfilter: boom"
    empty = run_cmd(app_cmd("sweep.py", [str(tmp_path / "nothing")]))
    assert empty.returncode == 2 and "no sweep jobs" in empty.stderr


def test_a_sweep_through_the_submitit_launcher(tmp_path):
    """hydra-submitit-launcher's local launcher (the SLURM launcher's twin, no cluster needed): the job runs in a
    submitit process, which starts its own accelerate launch; the table is written when the multirun ends."""
    sweep = tmp_path / "sweep"
    cmd = app_cmd("train.py", ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                               *_args(None, ["max_train_steps=1", "filter=none", "logger=wandb"]),
                               f"hydra.sweep.dir={sweep}", "sweep.evaluate=false"])
    proc = run_cmd(cmd, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(open(sweep / "sweep.csv")))
    assert [r["status"] for r in rows] == ["done"]
    assert all((sweep / r["job"] / "run" / "train_summary.json").is_file() for r in rows)
    # one tracker group for the sweep, each run named after its overrides
    cfg = __import__("yaml").safe_load((sweep / "0" / "run" / "config.yaml").read_text())
    assert cfg["logger"]["group"] == "sweep" and {"filter=none", "max_train_steps=1"} <= set(cfg["logger"]["run_name"].split(","))


def test_a_multi_node_job_starts_each_nodes_launcher_against_the_head_node(tmp_path, monkeypatch):
    from memfilter.launch.sweep import slurm_node_args
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/bash\nprintf "gpu-b03\\ngpu-b04\\ngpu-b05\\n"\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:" + __import__("os").environ["PATH"])
    assert slurm_node_args({"SLURM_NNODES": "1"}) == [] and slurm_node_args({}) == []
    args = slurm_node_args({"SLURM_NNODES": "3", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "gpu-b[03-05]"})
    assert args[args.index("--num_machines") + 1] == "3" and args[args.index("--machine_rank") + 1] == "2"
    assert args[args.index("--main_process_ip") + 1] == "gpu-b03" and "c10d" in args
