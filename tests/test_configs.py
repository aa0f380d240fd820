"""Every config composes and passes the checks; every runnable experiment trains a step; the knobs act."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from memfilter.filtering.records import read_records
from memfilter.launch.config_check import ConfigError, check_train_config
from tests.conftest import REPO, compose, launch_cmd, required_overrides, run_cmd, train_in_process

GROUPS = {g: sorted(p.stem for p in (REPO / "conf" / g).glob("*.yaml"))
          for g in ("model", "data", "filter", "mitigation", "optim", "logger", "experiment")}
NEEDS_WEIGHTS = {"wen2024", "somepalli_laion10k", "sdxl"}   # real weights and a GPU: run with the model swapped
# the tiny model of the experiment's family, at 16 px on CPU, in place of the real one
SWAP = ["model.pretrained=null", "model.vae=null", "resolution=16", "mixed_precision=no", "train_batch_size=2",
        "gradient_accumulation_steps=1"]


@pytest.mark.parametrize("group, option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_config_composes_and_checks(group, option, tmp_path):
    required = required_overrides(f"{group}={option}", tmp_path)
    cfg = compose([f"{group}={option}", *required])
    if cfg.data.name == "world" and str(cfg.model.pretrained or "builtin:").split(":")[0] != "builtin":
        # a real model on the default data (the toy world) is refused, naming data; on purpose it composes
        with pytest.raises(ConfigError, match=r"^data: model\.pretrained="):
            check_train_config(cfg, cuda_available=True)
        cfg = compose([f"{group}={option}", "data.any_model=true", *required])
    check_train_config(cfg, cuda_available=True)


def test_the_world_is_defined_once():
    """conf/world/default.yaml is the world of every app: the demo and the prep app (world.*) and training in
    memory (data=world: data.*) compose it, command-line overrides act on it, and ToyWorld's own defaults are
    its values."""
    import dataclasses

    from omegaconf import OmegaConf

    from memfilter.launch.builders import WORLD_KEYS, build_world
    from memfilter.toyworld.world import ToyWorld, world_to_dict

    group = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "world" / "default.yaml"))
    defaults = {f.name: f.default for f in dataclasses.fields(ToyWorld) if f.name != "spec"}
    assert group == defaults and set(group) == set(WORLD_KEYS)
    assert (group["num_unique"], group["num_duplicated"], group["repeats"]) == (1200, 8, 75)   # the README's world
    for app, node in (("demo", "world"), ("prepare", "world"), ("train", "data")):
        base = [] if app != "train" else ["data=world"]
        cfg = compose(base, config_name=app)
        assert {k: cfg[node][k] for k in WORLD_KEYS} == group, app
        assert world_to_dict(build_world(cfg[node])) == world_to_dict(ToyWorld()), app
        cfg = compose(base + [f"{node}.repeats=80", f"{node}.variant=near"], config_name=app)
        world = build_world(cfg[node])
        assert (world.repeats, world.variant, world.num_unique) == (80, "near", 1200), app
    assert compose([], config_name="demo").world.shard_size == 250          # the demo's own, beside the group


@pytest.mark.parametrize("experiment", [e for e in GROUPS["experiment"] if e not in NEEDS_WEIGHTS])
def test_every_experiment_runs_one_step(tmp_path, experiment):
    run_dir, summary = train_in_process(tmp_path, [f"experiment={experiment}", "max_train_steps=1",
                                                   "logger=none", "validation_prompts=[]"])
    assert summary["steps"] == 1
    assert (run_dir / "model_index.json").exists()


@pytest.mark.parametrize("experiment", sorted(NEEDS_WEIGHTS))
def test_every_real_model_experiment_runs_one_step_with_the_model_swapped(tmp_path, experiment):
    """The experiment's recipe (filter, optimiser, EMA, duplication, caption dropout...) on the tiny model of its
    family: only the model, its size and precision are swapped."""
    import json

    from PIL import Image
    root = tmp_path / "images"
    root.mkdir()
    for i in range(8):
        Image.new("RGB", (16, 16), (30 * i, 90, 200 - 20 * i)).save(root / f"{i}.png")
    (root / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"{i}.png", "text": f"a thing {i}"})
                                                  for i in range(8)))
    family = "tiny_sdxl" if experiment == "sdxl" else "tiny"
    cfg = compose([f"experiment={experiment}"])
    run_dir, summary = train_in_process(tmp_path, [f"experiment={experiment}", f"model={family}", *SWAP,
                                                   "data=imagefolder", f"data.path={root}", "max_train_steps=1",
                                                   "logger=none", "validation_prompts=[]", "checkpointing_steps=0"])
    assert summary["steps"] == 1 and summary["policy"] == cfg.filter.name
    assert (run_dir / "model_index.json").exists()
    saved = json.loads(json.dumps(__import__("yaml").safe_load((run_dir / "config.yaml").read_text())))
    assert saved["optim"]["learning_rate"] == cfg.optim.learning_rate and saved["use_ema"] == cfg.use_ema


def _unet(run_dir):
    return UNet2DConditionModel.from_pretrained(run_dir / "unet").state_dict()


def test_knobs_change_or_keep_the_result(tmp_path):
    """snr_gamma and noise_offset change the update; gradient checkpointing and workers do not."""
    base = ["max_train_steps=2", "proportion_empty_prompts=0", "filter=none"]
    ref, _ = train_in_process(tmp_path / "ref", base)
    w = _unet(ref)
    for override in ("snr_gamma=1.0", "noise_offset=0.1"):
        d, _ = train_in_process(tmp_path / override.split("=")[0], base + [override])
        assert any(not torch.equal(w[k], v) for k, v in _unet(d).items()), override
    for override in ("gradient_checkpointing=true", "dataloader_num_workers=2"):
        d, _ = train_in_process(tmp_path / override.split("=")[0], base + [override])
        other = _unet(d)
        assert all(torch.allclose(w[k], other[k], atol=1e-6) for k in w), override
    ra = read_records(ref / "records").to_pandas()
    assert np.isfinite(ra.loss).all()


def test_caption_dropout_samples_are_kept_and_have_zero_magnitude(tmp_path):
    run_dir, _ = train_in_process(tmp_path, ["proportion_empty_prompts=0.5", "filter=fixed",
                                             "filter.threshold=1e-12", "max_train_steps=3"])
    rec = read_records(run_dir / "records").to_pandas()
    dropped_caption = rec.magnitude == 0
    assert 0 < dropped_caption.sum() < len(rec)
    assert rec[dropped_caption].kept.all() and not rec[~dropped_caption].kept.any()


@pytest.mark.slow
def test_bf16_mixed_precision_runs(tmp_path):
    proc = run_cmd(launch_cmd(tmp_path / "run", ["mixed_precision=bf16", "max_train_steps=2",
                                                 "validation_prompts=[a red circle]", "validation_inference_steps=2"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = read_records(tmp_path / "run" / "records").to_pandas()
    assert len(rec) == 8 and np.isfinite(rec.magnitude).all() and np.isfinite(rec.loss).all()
    assert (tmp_path / "run" / "samples" / "final" / "000-00.png").exists()      # validation under autocast
    # the exported pipeline is all fp32 and samples as loaded, without a dtype argument
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "run")
    assert {p.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()} == {torch.float32}
    image = pipe("a red circle", num_inference_steps=2, height=16, width=16, output_type="np").images[0]
    assert np.isfinite(image).all()
