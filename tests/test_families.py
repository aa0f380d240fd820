"""The model-family seam (train/families): SD 1.x/2.x and SDXL through the same training step, magnitude,
detection and export, on tiny models built here."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from PIL import Image

from memfilter.filtering.records import read_records
from memfilter.filtering.signal import text_noise_magnitude
from memfilter.launch.config_check import ConfigError
from tests.conftest import train_in_process
from memfilter.train.data.collate import CollateForTraining
from memfilter.train.data.transforms import ImageTransform
from memfilter.train.families import build_tiny, build_tiny_sdxl, get_family, load_pretrained

SMALL = dict(resolution=16, block_out_channels=(32, 32), vae_channels=(32, 32))


def _sdxl():
    # 64 channels at the second level: with one channel per GroupNorm group (32 of 32) a per-channel shift from the
    # time embedding is normalised away, and the time ids could not change the prediction
    c = build_tiny_sdxl(**{**SMALL, "block_out_channels": (32, 64)})
    c.unet.eval()
    return c, get_family(c)


def test_the_family_is_read_from_model_index_and_an_unknown_one_is_named(tmp_path):
    for name, build in (("sd", build_tiny), ("sdxl", build_tiny_sdxl)):
        c = build(**SMALL)
        get_family(c).pipeline().save_pretrained(tmp_path / name)
        loaded = load_pretrained(str(tmp_path / name))
        assert loaded.family == name and type(loaded.unet).__name__ == "UNet2DConditionModel"
        assert (loaded.text_encoder_2 is not None) == (name == "sdxl")
    index = tmp_path / "sdxl" / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="'FluxPipeline' is not a model family"):
        load_pretrained(str(tmp_path / "sdxl"))
    from tests.conftest import compose
    from memfilter.launch.builders import build_components
    with pytest.raises(ConfigError, match="FluxPipeline"):
        build_components(compose(["model=tiny", f"model.pretrained={tmp_path / 'sdxl'}"]).model)


def test_sdxl_magnitude_equals_two_explicit_unet_calls_with_the_same_added_conditions():
    c, fam = _sdxl()
    tokens = fam.tokenize_fn()(["a red circle", "a blue square on the left"])
    with torch.no_grad():
        text = fam.encode_text(tokens)
    sizes = dict(resolution=16, original_sizes=torch.tensor([[40, 30], [16, 16]]),
                 crop_top_lefts=torch.tensor([[3, 0], [0, 0]]))
    cond, uncond = fam.unet_kwargs(text, **sizes), fam.uncond_like(fam.empty_text(), 2, **sizes)
    assert cond["added_cond_kwargs"]["time_ids"].tolist() == [[40, 30, 3, 0, 16, 16], [16, 16, 0, 0, 16, 16]]
    # the pipeline's unconditional (force_zeros_for_empty_prompt) with the batch's own time ids
    assert not uncond["encoder_hidden_states"].any() and not uncond["added_cond_kwargs"]["text_embeds"].any()
    assert torch.equal(uncond["added_cond_kwargs"]["time_ids"], cond["added_cond_kwargs"]["time_ids"])
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([900, 20])
    m = text_noise_magnitude(c.unet, x, t, uncond, cond=cond)
    with torch.no_grad():
        pc = c.unet(x, t, encoder_hidden_states=text["encoder_hidden_states"],
                    added_cond_kwargs={"text_embeds": text["text_embeds"],
                                       "time_ids": cond["added_cond_kwargs"]["time_ids"]}).sample
        pu = c.unet(x, t, encoder_hidden_states=torch.zeros_like(text["encoder_hidden_states"]),
                    added_cond_kwargs={"text_embeds": torch.zeros_like(text["text_embeds"]),
                                       "time_ids": cond["added_cond_kwargs"]["time_ids"]}).sample
    torch.testing.assert_close(m, (pc - pu).flatten(1).norm(dim=1), rtol=1e-5, atol=1e-6)
    # the time ids reach the UNet: other sizes give another magnitude
    other = fam.unet_kwargs(text, resolution=16)
    assert not torch.allclose(m, text_noise_magnitude(c.unet, x, t, fam.uncond_like(fam.empty_text(), 2, resolution=16),
                                                      cond=other))


def test_collate_gives_sdxl_original_size_crop_and_both_token_ids():
    c, fam = _sdxl()
    images = [Image.new("RGB", (40, 20), "red"), Image.new("RGB", (16, 32), "blue")]
    samples = [{"key": f"k{i}", "image": im, "caption": "a red circle", "meta": {}} for i, im in enumerate(images)]
    batch = CollateForTraining(fam.tokenize_fn(), ImageTransform(16, center_crop=True))(samples)
    assert batch["original_sizes"].tolist() == [[20, 40], [32, 16]]      # (height, width) before resizing
    assert batch["crop_top_lefts"].tolist() == [[0, 8], [8, 0]]          # the centre crop of 32x16 / 16x32
    assert batch["input_ids"].shape == batch["input_ids_2"].shape == (2, 77)


def test_sdxl_filtered_fine_tune_writes_records_and_a_pipeline_that_loads_generates_and_detects(tmp_path):
    run_dir, summary = train_in_process(tmp_path, [
        "model=tiny_sdxl", "filter=batch_quantile", "filter.drop_fraction=0.25", "max_train_steps=2",
        "proportion_empty_prompts=0.25", "validation_prompts=[a red circle]", "validation_inference_steps=2",
        "checkpointing_steps=2"])
    assert (run_dir / "samples" / "final" / "000-00.png").exists()          # validation through the seam
    assert (run_dir / "checkpoint-2" / "unet" / "config.json").exists()
    rec = read_records(run_dir / "records").to_pandas()
    assert len(rec) == 2 * 4 and sorted(rec.step.unique()) == [1, 2]
    assert np.isfinite(rec.magnitude[rec.eligible]).all() and (rec.magnitude[rec.eligible] > 0).all()
    assert summary["samples_seen"] == 8
    pipe = StableDiffusionXLPipeline.from_pretrained(run_dir)
    image = pipe("a red circle", num_inference_steps=2, height=16, width=16, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (16, 16, 3) and np.isfinite(image).all()

    from memfilter.evaluation.detect import score_prompts
    from memfilter.evaluation.generate import load_pipeline
    scores, mags = score_prompts(load_pipeline(run_dir), ["a red circle", "a blue square"],
                                 num_generations=2, num_steps=2, num_inference_steps=4)
    assert mags.shape == (2, 2, 2) and torch.isfinite(scores).all() and (scores > 0).all()


def test_the_exported_pipeline_keeps_the_base_models_scheduler(tmp_path):
    c = build_tiny(**SMALL)
    pipe = get_family(c).pipeline()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.save_pretrained(tmp_path / "base")
    run_dir, _ = train_in_process(tmp_path, [f"model.pretrained={tmp_path / 'base'}", "max_train_steps=1",
                                             "filter=none"])
    sched = json.loads((run_dir / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "EulerDiscreteScheduler" and sched["timestep_spacing"] == "trailing"
