"""Launch recipes: every accelerate config is one accelerate itself reads, the backends the loop cannot serve yet are
refused naming the way out, and the SLURM scripts start one launcher per node against the head node and resume the
same run directory after a requeue."""
from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest
import torch

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
        assert str(cfg.distributed_type).endswith("DEEPSPEED")
        assert (REPO / cfg.deepspeed_config["deepspeed_config_file"]).is_file()


def test_the_zero2_recipe_is_one_the_loop_serves():
    """launch/accelerate/zero2.json as accelerate's DeepSpeed plugin reads it: ZeRO-2, fp32 weights with
    torch_autocast, and no setting check_backend refuses."""
    from accelerate.utils import DeepSpeedPlugin

    from memfilter.train.backends import _check_deepspeed
    from memfilter.train.loop import TrainArgs

    ds = DeepSpeedPlugin(hf_ds_config=str(REPO / "launch" / "accelerate" / "zero2.json")).deepspeed_config
    assert ds["zero_optimization"]["stage"] == 2 and ds["torch_autocast"]["enabled"]
    _check_deepspeed(ds, TrainArgs(output_dir="x"))


def test_backends_the_loop_cannot_serve_are_refused_naming_the_way_out():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from memfilter.train.backends import check_backend
    from memfilter.train.loop import TrainArgs

    def acc(kind, version=2, **ds):         # only what check_backend reads of an Accelerator
        ds = {"zero_optimization": {"stage": 2}, **ds}
        return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(
            fsdp_plugin=SimpleNamespace(fsdp_version=version), deepspeed_plugin=SimpleNamespace(deepspeed_config=ds)))

    plain = TrainArgs(output_dir="x")
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        check_backend(acc(DistributedType.FSDP, version=1), plain)
    for bad in (TrainArgs(output_dir="x", use_ema=True), TrainArgs(output_dir="x", lora_rank=4)):
        with pytest.raises(ValueError, match="not supported under FSDP"):
            check_backend(acc(DistributedType.FSDP), bad)
    deepspeed = DistributedType.DEEPSPEED
    for ds, args, named in [
            ({"zero_optimization": {"stage": 3}}, plain, "zero_stage 3.*zero_stage: 2"),
            ({"bf16": {"enabled": True}}, plain, "bf16 mode.*torch_autocast"),
            ({"fp16": {"enabled": "auto"}}, plain, "fp16 mode"),
            ({"gradient_accumulation_steps": 4}, plain, "gradient_accumulation_steps>1"),
            ({}, TrainArgs(output_dir="x", gradient_accumulation_steps=2), "gradient_accumulation_steps>1"),
            ({}, TrainArgs(output_dir="x", lora_rank=4), "lora.rank>0 is not supported under DeepSpeed"),
            ({"gradient_clipping": 0.5}, plain, "gradient_clipping=0.5 disagrees with max_grad_norm")]:
        with pytest.raises(ValueError, match=named):
            check_backend(acc(deepspeed, **ds), args)
    check_backend(acc(deepspeed, bf16={"enabled": False}, gradient_clipping=plain.max_grad_norm), plain)
    check_backend(acc(deepspeed), TrainArgs(output_dir="x", use_ema=True))
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


def _deepspeed_cmd(run_dir, overrides, recipe: bool = False):
    """The training app on 2 CPU processes under DeepSpeed ZeRO-2 (DeepSpeed's CPU accelerator over gloo):
    `recipe` runs launch/accelerate/zero2.yaml as the README gives it (bf16 torch_autocast), otherwise accelerate's
    flags for plain fp32 ZeRO-2, comparable bit for bit with DDP's fp32 run."""
    from tests.conftest import launch_cmd

    cmd = launch_cmd(run_dir, overrides, num_processes=2)
    i = cmd.index("--multi_gpu")
    rest = cmd[i + 1:]
    j = rest.index("--mixed_precision")
    rest = rest[:j] + rest[j + 2:]                      # the recipe's JSON decides the precision
    flags = (["--config_file", str(REPO / "launch" / "accelerate" / "zero2.yaml")] if recipe else
             ["--use_deepspeed", "--zero_stage", "2", "--gradient_accumulation_steps", "1", "--mixed_precision", "no"])
    return cmd[:i] + flags + rest


def test_deepspeed_zero2_takes_ddps_filtered_steps_resumes_exactly_and_skips_an_all_dropped_step(tmp_path):
    """ZeRO-2 on 2 CPU processes: the loop's prescaled loss (sum of kept losses x world / global kept) gives the
    same decisions, losses and (EMA) weights as DDP's divided gradient, with a warm-up schedule driving DeepSpeed's
    optimizer and the optimizer state partitioned over both ranks; a run stopped at step 2 and resumed equals the
    uninterrupted one bit for bit; and under the README's recipe (zero2.yaml, torch_autocast) a step whose samples
    were all dropped is not taken."""
    pytest.importorskip("deepspeed")
    from memfilter.filtering.records import read_records
    from memfilter.launch.builders import build_components
    from tests.conftest import TINY, compose, launch_cmd, run_cmd
    from tests.test_processes import _unet_weights

    common = ["filter=batch_quantile", "filter.drop_fraction=0.25", "dropped_samples=drop", "max_train_steps=4",
              "checkpointing_steps=2", "proportion_empty_prompts=0", "optim.lr_scheduler=constant_with_warmup",
              "optim.lr_warmup_steps=3",
              # eps >> |g|: AdamW's step is ~lr x g, linear in the gradient's scale (a wrong kept-count divisor
              # shows), and free of the near-zero-gradient sign flips that amplify summation-order rounding
              "optim.adam_epsilon=1.0", "optim.learning_rate=0.1", "max_grad_norm=1000",     # (clipping would too)
              "use_ema=true", "ema_decay=0.5"]                 # the export is the EMA, restored on resume
    runs = {"ddp": launch_cmd(tmp_path / "ddp", common, num_processes=2),
            "zero2": _deepspeed_cmd(tmp_path / "zero2", common),
            "stopped": _deepspeed_cmd(tmp_path / "stopped", [*common, "max_train_steps=2"]),
            "resumed": _deepspeed_cmd(tmp_path / "stopped", [*common, "resume_from_checkpoint=latest"]),
            "all_dropped": _deepspeed_cmd(tmp_path / "all_dropped", ["filter=fixed", "filter.threshold=1e-9",
                                                                    "dropped_samples=drop", "max_train_steps=2",
                                                                    "proportion_empty_prompts=0"], recipe=True)}
    for name, cmd in runs.items():
        proc = run_cmd(cmd, timeout=600)
        assert proc.returncode == 0, name + ": " + proc.stdout[-2000:] + proc.stderr[-3000:]
    a, b = _unet_weights(tmp_path / "ddp"), _unet_weights(tmp_path / "zero2")
    ra, rb = (read_records(tmp_path / n / "records").to_pandas().sort_values(["step", "key"]) for n in ("ddp", "zero2"))
    assert len(ra) == len(rb) == 4 * 8 and (ra.kept.to_numpy() == rb.kept.to_numpy()).all() and not ra.kept.all()
    assert rb.loss.to_numpy() == pytest.approx(ra.loss.to_numpy(), rel=1e-5)
    base = build_components(compose(TINY).model).unet.state_dict()
    change = torch.cat([(a[k] - base[k]).flatten() for k in a]).norm()
    gap = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
    assert change > 1e-3 and gap < 1e-4 * change, (float(change), float(gap))
    partitions = sorted(p.name for p in (tmp_path / "zero2" / "checkpoint-2").rglob("zero_pp_rank_*_optim_states.pt"))
    assert len(partitions) == 2                            # ZeRO: each rank holds its part of the AdamW state
    c = _unet_weights(tmp_path / "stopped")
    assert all(torch.equal(b[k], c[k]) for k in b), "the resumed ZeRO-2 run differs from the uninterrupted one"
    summary = json.loads((tmp_path / "all_dropped" / "train_summary.json").read_text())
    assert summary["samples_kept"] == 0 and summary["skipped_steps"] == summary["steps"] == 2
    d = _unet_weights(tmp_path / "all_dropped")
    assert all(torch.equal(d[k], base[k]) for k in d), "a step that kept nothing moved the weights"


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
