"""A diffusers user's first command: train_text_to_image.py's flags, its output layout, and its loaders."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from memfilter.launch.diffusers_flags import FLAGS, FlagError, flag_table, translate
from tests.conftest import REPO, run_cmd


def _folder(root, n=8):
    root.mkdir()
    rows = []
    for i in range(n):
        Image.new("RGB", (20, 16), ((37 * i) % 255, 90, 200 - 20 * i)).save(root / f"img{i}.png")
        rows.append({"file_name": f"img{i}.png", "text": f"a plain image, number {i}"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def test_train_text_to_image_flags_run_and_the_output_loads_with_diffusers(tmp_path):
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    from memfilter.train.families import build_pipeline, build_tiny
    base = build_tiny(resolution=16, block_out_channels=(32, 32), vae_channels=(32, 32))
    build_pipeline(base).save_pretrained(tmp_path / "base")
    base.vae.register_to_config(scaling_factor=0.5)          # a separate VAE, told apart by its scaling factor
    base.vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "out"
    proc = run_cmd([sys.executable, str(REPO / "launch" / "train.py"),
                    f"--pretrained_model_name_or_path={tmp_path / 'base'}", "--train_data_dir", str(_folder(tmp_path / "data")),
                    "--resolution=16", "--train_batch_size=4", "--max_train_steps=2", "--checkpointing_steps=1",
                    "--learning_rate=1e-4", "--lr_scheduler", "constant", "--center_crop", "--report_to=none",
                    "--validation_prompts", "a plain image, number 1", "a red (bright) circle",
                    f"--output_dir={out}", "--max_train_samples=6", f"--pretrained_vae_model_name_or_path={tmp_path / 'vae'}",
                    "validation_inference_steps=2"], cwd=tmp_path)   # a Hydra override beside
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = DiffusionPipeline.from_pretrained(out)
    image = pipe("a plain image", num_inference_steps=2, height=16, width=16, output_type="np").images[0]
    assert image.shape == (16, 16, 3) and np.isfinite(image).all()
    unet = UNet2DConditionModel.from_pretrained(out / "checkpoint-1", subfolder="unet")
    assert unet.config.sample_size == 8
    assert pipe.vae.config.scaling_factor == 0.5                             # --pretrained_vae_model_name_or_path
    from memfilter.filtering.records import read_records
    keys = set(read_records(out / "records").to_pandas().key)               # --max_train_samples=6 of 8 images
    assert len(keys) <= 6 and keys <= {f"img{i}" for i in range(8)}
    assert (out / "samples" / "final" / "prompts.txt").read_text().splitlines() == \
        ["a plain image, number 1", "a red (bright) circle"]
    cfg = json.loads(json.dumps(__import__("yaml").safe_load((out / "config.yaml").read_text())))
    assert cfg["optim"]["learning_rate"] == 1e-4 and cfg["data"]["name"] == "imagefolder" and cfg["center_crop"]


def test_flags_translate_to_overrides_and_refusals_say_why():
    assert translate(["--train_batch_size", "8", "--use_ema", "--mixed_precision=bf16", "filter=fixed"]) == \
        ["train_batch_size=8", "use_ema=true", "mixed_precision=bf16", "filter=fixed"]
    assert translate(["--dataset_name=lambdalabs/naruto-blip-captions"]) == \
        ["data=hf", "data.path=lambdalabs/naruto-blip-captions"]
    assert translate(["--report_to", "wandb", "--local_rank=0", "--cfg", "job"]) == ["logger=wandb", "--cfg", "job"]
    with pytest.raises(FlagError, match="--push_to_hub: no hub access"):
        translate(["--push_to_hub"])
    assert translate(["--report_to=tensorboard"]) == ["logger=tensorboard"]
    with pytest.raises(FlagError, match="--report_to=comet_ml: choose one of wandb, tensorboard, all, none"):
        translate(["--report_to=comet_ml"])
    with pytest.raises(FlagError, match="--lerning_rate: not a flag"):
        translate(["--lerning_rate=1"])


def test_the_readme_maps_every_flag():
    readme = (REPO / "README.md").read_text()
    assert flag_table() in readme
    assert all(f"`--{name}`" in readme for name in FLAGS)
