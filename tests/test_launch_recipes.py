"""Launch recipes: every accelerate config is one accelerate itself reads, the backends the loop cannot serve yet are
refused naming the way out, and the SLURM scripts start one launcher per node against the head node and resume the
same run directory after a requeue."""
from __future__ import annotations

import os
import stat
import subprocess

import pytest

from tests.conftest import REPO

CONFIGS = sorted((REPO / "launch" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_accelerate_config_is_read_by_accelerate(path):
    from accelerate.commands.config.config_args import load_config_from_file
    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 1 and cfg.distributed_type is not None
    if path.stem.startswith("multi_node"):
        assert cfg.num_machines > 1 and cfg.rdzv_backend in ("static", "c10d")
    if path.stem == "fsdp":
        assert str(cfg.distributed_type).endswith("FSDP") and cfg.fsdp_config
    if path.stem == "zero2":
        assert str(cfg.distributed_type).endswith("DEEPSPEED") and cfg.deepspeed_config["zero_stage"] == 2


def test_backends_the_loop_cannot_serve_are_refused_naming_the_way_out():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from memfilter.train.loop import TrainArgs, check_backend

    def acc(kind, version=2):         # only what check_backend reads of an Accelerator
        return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(fsdp_plugin=SimpleNamespace(
            fsdp_version=version)))

    plain = TrainArgs(output_dir="x")
    with pytest.raises(ValueError, match="DeepSpeed is not supported.*use FSDP"):
        check_backend(acc(DistributedType.DEEPSPEED), plain)
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        check_backend(acc(DistributedType.FSDP, version=1), plain)
    for bad in (TrainArgs(output_dir="x", use_ema=True), TrainArgs(output_dir="x", lora_rank=4)):
        with pytest.raises(ValueError, match="not supported under FSDP"):
            check_backend(acc(DistributedType.FSDP), bad)
    for kind in (DistributedType.FSDP, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, DistributedType.NO):
        check_backend(acc(kind), plain)                  # served: no error


def test_fsdp2_update_and_export_match_ddp_on_two_cpu_processes(tmp_path):
    """The loop's filtered update (sum of kept losses x world, divided by the global kept count, clipped) on a UNet
    sharded with FSDP2 takes the same steps as under DDP, and the gathered weights export a pipeline that loads
    back with them. accelerate selects FSDP only on GPU backends, so the UNet is sharded with torch's fully_shard
    here, as accelerate's FSDP2 prepare shards it (tests/fsdp_worker.py)."""
    import json

    from tests.conftest import run_cmd

    out = tmp_path / "fsdp.json"
    cmd = ["accelerate", "launch", "--config_file", str(REPO / "launch" / "accelerate" / "cpu_2proc.yaml"),
           str(REPO / "tests" / "fsdp_worker.py"), str(out), str(tmp_path / "export")]
    proc = run_cmd(cmd, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["world"] == 2 and got["sharded"] and got["gathered_class"] == "UNet2DConditionModel"
    assert got["ddp_kept"] == got["fsdp_kept"] and all(k < 8 for k in got["ddp_kept"])     # samples were dropped
    assert got["fsdp_losses"] == pytest.approx(got["ddp_losses"], rel=1e-5)
    assert got["max_weight_change"] > 1e-4 and got["max_weight_gap"] < 1e-6 * got["max_weight_change"] + 1e-7
    assert got["exported_equal"]


def _fake_bin(tmp_path):
    """scontrol, srun and accelerate stand-ins that record what the script asks of them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "scontrol": '#!/bin/bash\nif [ "$1" = show ]; then printf "gpu-a17\\ngpu-a18\\n"; else echo "$@" >> "$LOG/scontrol"; fi\n',
        # srun: run the node command once per node, as SLURM would (SLURM_NODEID set per node)
        "srun": '#!/bin/bash\nfor n in 0 1; do SLURM_NODEID=$n bash -c "${@: -1}"; done\n',
        "accelerate": '#!/bin/bash\necho "$@" >> "$LOG/accelerate"\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    return bin_dir


@pytest.mark.parametrize("script, app", [("train.sbatch", "launch/train.py"), ("curate.sbatch", "launch/curate.py")])
def test_slurm_scripts_start_one_launcher_per_node_on_the_same_run(tmp_path, script, app):
    bin_dir = _fake_bin(tmp_path)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(tmp_path), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu-a[17-18]", "SLURM_NNODES": "2", "GPUS_PER_NODE": "4"}
    for attempt in range(2):          # a requeued job runs the script again: the same run directory
        proc = subprocess.run(["bash", str(REPO / "launch" / "slurm" / script), "filter=item"], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "accelerate").read_text().splitlines()
    assert len(calls) == 4                                           # 2 nodes x 2 starts
    for rank, call in zip([0, 1, 0, 1], calls):
        args = call.split()
        assert args[args.index("--machine_rank") + 1] == str(rank)
        assert args[args.index("--main_process_ip") + 1] == "gpu-a17"
        assert args[args.index("--num_processes") + 1] == "8" and args[args.index("--num_machines") + 1] == "2"
        assert app in call and "filter=item" in call
        assert f"output_dir={tmp_path}/outputs/{'train' if 'train' in script else 'curate'}/slurm-4242" in call
        if script == "train.sbatch":
            assert "resume_from_checkpoint=latest" in call
    if script == "train.sbatch":
        assert (tmp_path / "outputs" / "train" / "slurm-4242").is_dir()    # resume=latest finds it and starts
