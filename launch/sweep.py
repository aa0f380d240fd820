"""Ablation sweeps: a Hydra multirun of the training app in which every job is its own `accelerate launch`, then its
evaluation, then one table for the whole sweep.

    python launch/train.py -m filter=none,item,timestep                 # locally, one job after another
    python launch/train.py -m experiment=world_sweep                     # the toy world's policy sweep (README)
    python launch/train.py -m hydra/launcher=submitit_slurm filter=none,item 'sweep.accelerate_args=[--multi_gpu,--num_processes,8]'
    python launch/sweep.py multirun/2026-12-03_10-00-00                # the table again (e.g. after SLURM jobs)

In a multirun, `launch/train.py` does not train in the Hydra job's process (accelerate's state cannot be created twice
in one process, and a job on many GPUs needs its own process group): each job (`run_job`) starts
`accelerate launch <sweep.accelerate_args> launch/train.py <the job's overrides>` with output_dir=<job dir>/run, its
tracker run named after its overrides in one group (the sweep directory's name), then `launch/evaluate.py` on the
run, and writes `<job dir>/sweep_job.json` (overrides, status, the phase that failed and the log's last lines,
wall time). A re-run of the same sweep into the same hydra.sweep.dir skips the finished jobs, resumes interrupted
runs from their latest checkpoint and evaluates what is not evaluated yet; a failed job is retried. The table
(`aggregate`: sweep.md, sweep.csv, tradeoff.png in the sweep directory) is written when the multirun ends (a
Hydra callback) and by this script. A failed job is a row with its error, never left out.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from dataclasses import dataclass  # noqa: E402

from hydra.experimental.callback import Callback  # noqa: E402

from memfilter.filtering.settings import setting  # noqa: E402

LAUNCH = Path(__file__).resolve().parent
JOB_FILE = "sweep_job.json"
TAIL_LINES = 25


@dataclass
class SweepArgs:
    """How each job of a multirun runs (`sweep.*` of the training config; used only with -m)."""

    accelerate_args: list = setting(must="a list of accelerate launch arguments, e.g. "
                                         "'sweep.accelerate_args=[--multi_gpu,--num_processes,8]'",
                                    check=lambda v: isinstance(v, (list, tuple)), factory=list,
                                    doc="arguments of each job's accelerate launch (default: accelerate's config)")
    evaluate: bool = setting(True, "true or false", lambda v: isinstance(v, bool),
                             "evaluate each finished run (launch/evaluate.py)")
    evaluate_overrides: list = setting(must="a list of launch/evaluate.py overrides, e.g. "
                                            "'sweep.evaluate_overrides=[evaluation.num_images_per_prompt=8]'",
                                       check=lambda v: isinstance(v, (list, tuple)), factory=list,
                                       doc="overrides of each job's evaluation")


def in_multirun() -> bool:
    """True inside a job of a Hydra multirun (python launch/train.py -m ...)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _is_world_run(cfg) -> bool:
    """The toy world on its own base model: its readers and copy detector measure the run (launch/evaluate.py
    toy_world=true); any other run is measured against its training images (SSCD or the named fallback)."""
    pretrained = str(cfg.model.get("pretrained") or "")
    world_shards = cfg.data.name == "webdataset" and (Path(str(cfg.data.shards)).parent / "world.json").is_file()
    return pretrained.startswith("builtin:world") and (cfg.data.name == "world" or world_shards)


def _commands(cfg, overrides: list[str], job_dir: Path, sweep_dir: Path) -> dict[str, list[str]]:
    """The job's training and evaluation command lines. Training always resumes the latest checkpoint of its run
    directory (which the job creates first): none there starts the run, so every node and every re-run agree."""
    from hydra.core.hydra_config import HydraConfig

    own = [o for o in overrides if not o.startswith(("output_dir=", "resume_from_checkpoint="))]
    run_dir = job_run_dir(cfg, overrides, job_dir)
    train = [sys.executable, "-m", "accelerate.commands.launch", *[str(a) for a in cfg.sweep.accelerate_args],
             *slurm_node_args(), str(LAUNCH / "train.py"), *own, f"output_dir={run_dir}",
             "resume_from_checkpoint=latest"]
    if cfg.logger.name in ("wandb", "all"):
        if cfg.logger.get("group") is None:
            train.append(f"logger.group={sweep_dir.name}")
        if cfg.logger.get("run_name") is None:
            name = HydraConfig.get().job.override_dirname or job_dir.name     # "filter=none,seed=1": quoted
            train.append("logger.run_name='" + name.replace("\\", "\\\\").replace("'", "\\'") + "'")
    evaluate = [sys.executable, str(LAUNCH / "evaluate.py"), f"run_dir={run_dir}",
                f"toy_world={str(_is_world_run(cfg)).lower()}", *[str(a) for a in cfg.sweep.evaluate_overrides]]
    return {"train": train, "evaluate": evaluate}


def slurm_node_args(env=os.environ) -> list[str]:
    """accelerate launch's multi-node arguments when the job holds several SLURM nodes (submitit with nodes > 1 and
    one task per node runs the job on every node): this node's rank and the head node, c10d rendezvous; none on one
    node. sweep.accelerate_args gives the rest (--multi_gpu, --num_processes for all nodes' GPUs)."""
    nodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")))
    if nodes <= 1:
        return []
    hosts = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True,
                           text=True, check=True).stdout.split()
    return ["--num_machines", str(nodes), "--machine_rank", env.get("SLURM_NODEID", "0"), "--main_process_ip",
            hosts[0], "--main_process_port", env.get("MASTER_PORT", "29500"), "--rdzv_backend", "c10d"]


def job_run_dir(cfg, overrides: list[str], job_dir: Path) -> Path:
    """<job dir>/run, or the output_dir the sweep's overrides name (e.g. 'output_dir=outputs/sweep-k/${filter.k}')."""
    if any(o.startswith("output_dir=") for o in overrides):
        return Path(str(cfg.output_dir)).resolve()
    return job_dir / "run"


def run_job(cfg) -> dict:
    """One job of the multirun (module docstring). Returns its sweep_job.json content."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    job_dir, sweep_dir = Path(hc.runtime.output_dir), Path(hc.sweep.dir)
    overrides = list(hc.overrides.task)
    path = job_dir / JOB_FILE
    job = json.loads(path.read_text()) if path.is_file() else {}
    if job and job.get("overrides") != overrides:
        raise RuntimeError(f"{job_dir} holds job {job.get('overrides')} of another sweep, not {overrides}; a sweep "
                           "never overwrites one: choose another hydra.sweep.dir")
    if job.get("status") == "done":
        print(f"sweep job {job_dir.name}: finished earlier, skipped ({' '.join(overrides)})")
        return job
    job_dir.mkdir(parents=True, exist_ok=True)
    run_dir = job_run_dir(cfg, overrides, job_dir)
    node = os.environ.get("SLURM_NODEID", "0") if slurm_node_args() else "0"
    run_dir.mkdir(parents=True, exist_ok=True)
    if node != "0":            # another node of a multi-node job: its share of the training, nothing else
        cmd = _commands(cfg, overrides, job_dir, sweep_dir)["train"]
        return {"overrides": overrides, "node": node, "rc": _run_logged(cmd, job_dir / f"train-node{node}.log")}
    job = {"overrides": overrides, "status": "running", "run_dir": str(run_dir), "started": time.time(),
           "wall_seconds": job.get("wall_seconds", {})}
    trained = (run_dir / "train_summary.json").is_file()
    commands = _commands(cfg, overrides, job_dir, sweep_dir)
    phases = [] if trained else ["train"]
    if cfg.sweep.evaluate and not (run_dir / "eval" / "report.json").is_file():
        phases.append("evaluate")
    for phase in phases:
        job.update(phase=phase, command=commands[phase])
        path.write_text(json.dumps(job, indent=1))
        t0 = time.time()
        rc = _run_logged(commands[phase], job_dir / f"{phase}.log")
        job["wall_seconds"][phase] = round(time.time() - t0, 1)
        if rc != 0:
            job.update(status="failed", rc=rc, error=_tail(job_dir / f"{phase}.log"))
            path.write_text(json.dumps(job, indent=1))
            print(f"sweep job {job_dir.name}: {phase} failed (rc {rc}); see {job_dir / (phase + '.log')}")
            return job
    job.update(status="done", phase=None, rc=0)
    job.pop("error", None)
    path.write_text(json.dumps(job, indent=1))
    return job


def _run_logged(cmd: list[str], log: Path) -> int:
    """Run cmd with its output appended to `log` (a resumed job keeps its earlier attempts' lines)."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode


def _tail(log: Path, n: int = TAIL_LINES) -> str:
    lines = [ln for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("memfilter:") or "Error" in ln]
    return "\n".join((errors[-3:] if errors else []) + ["..."] + lines[-n:])


class AggregateOnEnd(Callback):
    """Writes the sweep's table when a multirun of the training app ends (hydra.callbacks in conf/train.yaml)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir() and any(sweep_dir.glob(f"*/{JOB_FILE}")):
            print(f"sweep table: {aggregate(sweep_dir)}")


def _numbers(report: dict) -> dict:
    """Replication and quality of one evaluation report, the world's (toy_world=true) or the general one."""
    rep = {k: v for k, v in report.get("replication", {}).items() if isinstance(v, dict) and k != "bar"}
    out = {}
    for name in ("duplicated", "unique"):
        r = rep.get(name) or {}
        frac = r.get("replicated_fraction", r.get("frac_above"))
        out[f"{name} replicated"] = frac
        out[f"{name} p95 sim"] = r.get("similarity_p95", r.get("p95"))
    if "fidelity" in report:                                    # the world: named attributes read from pixels
        out["quality"] = (report["fidelity"].get("duplicated") or {}).get("all")
        out["unique quality"] = (report["fidelity"].get("unique") or {}).get("all")
        out["quality metric"] = "prompt fidelity"
    else:
        from memfilter.evaluation.report import _quality_value
        out["quality metric"], out["quality"] = _quality_value(report)
    return out


def _rows(sweep_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(sweep_dir.glob(f"*/{JOB_FILE}"), key=lambda p: (len(p.parent.name), p.parent.name)):
        job = json.loads(path.read_text())
        run_dir = Path(job["run_dir"])
        row = {"job": path.parent.name, "status": job["status"],
               "overrides": dict(o.split("=", 1) for o in job["overrides"] if "=" in o),
               "wall s": int(round(sum(job.get("wall_seconds", {}).values()))),
               "error": (job.get("error") or "").splitlines()[0] if job.get("status") == "failed" else ""}
        if job.get("status") == "failed":
            row["error"] = f"{job.get('phase')}: {row['error'] or 'rc ' + str(job.get('rc'))}"
        summary = run_dir / "train_summary.json"
        if summary.is_file():
            s = json.loads(summary.read_text())
            row.update({"dup kept": s.get("dup_kept_fraction"), "other kept": s.get("nondup_kept_fraction")})
        report = run_dir / "eval" / "report.json"
        if report.is_file():
            row.update(_numbers(json.loads(report.read_text())))
        rows.append(row)
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def aggregate(sweep_dir: str | Path) -> Path:
    """sweep.md and sweep.csv (one row per job: the swept values, kept fractions of duplicated and other samples,
    replication and quality, wall time, status and error) and tradeoff.png in `sweep_dir`. Returns sweep.md."""
    sweep_dir = Path(sweep_dir)
    rows = _rows(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"{sweep_dir}: no sweep jobs ({JOB_FILE}) found")
    keys = sorted({k for r in rows for k in r["overrides"]})
    swept = [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1] or keys
    metrics = ["dup kept", "other kept", "duplicated replicated", "unique replicated", "duplicated p95 sim",
               "quality", "unique quality"]
    header = ["job", *swept, *metrics, "quality metric", "wall s", "status", "error"]
    table = [[r["job"], *[r["overrides"].get(k, "") for k in swept], *[r.get(m) for m in metrics],
              r.get("quality metric", ""), r["wall s"], r["status"], r["error"]] for r in rows]
    with open(sweep_dir / "sweep.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([["" if v is None else v for v in row] for row in table])
    done = sum(r["status"] == "done" for r in rows)
    lines = [f"# memfilter sweep: {sweep_dir}", "", f"{len(rows)} jobs: {done} done, "
             f"{sum(r['status'] == 'failed' for r in rows)} failed, {len(rows) - done - sum(r['status'] == 'failed' for r in rows)} "
             "not finished. Kept: share of duplicated / other training samples the filter kept. Replicated: share of "
             "generations above the replication bar, for duplicated and unique training prompts.", "",
             "| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(_fmt(v).replace("|", "/") for v in row) + " |" for row in table]
    _tradeoff(rows, sweep_dir / "tradeoff.png")
    lines += ["", "![replication vs quality](tradeoff.png)", ""]
    (sweep_dir / "sweep.md").write_text("\n".join(lines))
    return sweep_dir / "sweep.md"


def _tradeoff(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in rows:
        x, y = r.get("duplicated replicated"), r.get("quality")
        if x is None or y is None:
            continue
        ax.scatter([x], [y], s=40)
        ax.annotate(" ".join(f"{v}" for v in r["overrides"].values()) or r["job"], (x, y), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    metric = next((r["quality metric"] for r in rows if r.get("quality metric")), "quality")
    ax.set_xlabel("duplicated prompts: share of generations replicated")
    ax.set_ylabel(metric)
    ax.set_title("replication vs quality, one point per job")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        print("usage: python launch/sweep.py <sweep directory>   (the hydra.sweep.dir of a training multirun)",
              file=sys.stderr)
        sys.exit(2)
    try:
        print(aggregate(sys.argv[1]))
    except FileNotFoundError as e:
        print(f"memfilter: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
