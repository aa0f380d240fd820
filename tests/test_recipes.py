"""diffusers' training recipes beyond the basic flags: timestep bias, DREAM, 8-bit Adam, non_ema_revision,
dataset_config_name; each against its definition, and each wired from its flag to the loop."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDPMScheduler

from memfilter.launch.config_check import ConfigError, check_model_settings, check_train_config
from memfilter.launch.diffusers_flags import translate
from memfilter.train.models import SD_SCHEDULER
from memfilter.train.noise import NoiseArgs, dream, noised_inputs, timestep_weights
from tests.conftest import compose, train_in_process

TINY_SD = dict(resolution=16, block_out_channels=(32, 32), vae_channels=(32, 32))


def _diffusers_weights(strategy, multiplier, begin, end, portion, n=1000):
    """diffusers' generate_timestep_weights (train_text_to_image_sdxl.py), written out as a reference."""
    weights = torch.ones(n)
    k = int(portion * n)
    idx = {"later": slice(-k, None), "earlier": slice(0, k), "range": slice(begin, end)}[strategy]
    weights[idx] *= multiplier
    return weights / weights.sum()


@pytest.mark.parametrize("strategy, multiplier, begin, end, portion", [
    ("later", 3.0, 0, 1000, 0.25), ("earlier", 0.5, 0, 1000, 0.4), ("range", 5.0, 200, 300, 0.25)])
def test_timestep_bias_weights_are_diffusers_and_the_draws_follow_them(strategy, multiplier, begin, end, portion):
    noise = NoiseArgs(timestep_bias_strategy=strategy, timestep_bias_multiplier=multiplier,
                      timestep_bias_begin=begin, timestep_bias_end=end, timestep_bias_portion=portion)
    w = timestep_weights(noise, 1000)
    torch.testing.assert_close(w, _diffusers_weights(strategy, multiplier, begin, end, portion))
    sched = DDPMScheduler(**SD_SCHEDULER)
    t = noised_inputs(sched, torch.zeros(4000, 1, 1, 1), torch.Generator().manual_seed(0), noise).timesteps
    biased = w > w.min() if multiplier > 1 else w < w.max()
    share = biased[t].float().mean().item()
    assert abs(share - w[biased].sum().item()) < 0.03


def test_no_recipe_draws_exactly_what_the_plain_step_drew():
    """A run without a recipe is unchanged: noise, then uniform timesteps, from the same generator."""
    sched = DDPMScheduler(**SD_SCHEDULER)
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    drawn = noised_inputs(sched, latents, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (5,), generator=g)
    assert torch.equal(drawn.timesteps, t) and torch.equal(drawn.noise, noise) and torch.equal(drawn.target, noise)
    torch.testing.assert_close(drawn.noisy, sched.add_noise(latents, noise, t))


def test_dream_rectifies_x_t_and_the_target_as_its_definition():
    from memfilter.train.models import tiny_unet
    unet = tiny_unet(latent_size=8, latent_channels=4, layers_per_block=1, block_out_channels=(32, 32),
                     cross_attention_dim=32, attention_head_dim=8, cross_attention_levels=1)
    sched = DDPMScheduler(**SD_SCHEDULER)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    text = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(2))
    drawn = noised_inputs(sched, latents, torch.Generator().manual_seed(0))
    out = dream(unet, sched, drawn, {"encoder_hidden_states": text}, detail_preservation=2.0)
    with torch.no_grad():
        eps_hat = unet(drawn.noisy, drawn.timesteps, encoder_hidden_states=text).sample
    s = (1 - sched.alphas_cumprod[drawn.timesteps]).sqrt()[:, None, None, None]
    delta = s ** 2.0 * (drawn.noise - eps_hat)
    torch.testing.assert_close(out.noisy, drawn.noisy + s * delta)
    torch.testing.assert_close(out.target, drawn.target + delta)
    assert torch.equal(out.timesteps, drawn.timesteps) and not out.noisy.requires_grad


@pytest.mark.parametrize("overrides, message", [
    (["timestep_bias_strategy=range", "timestep_bias_begin=500", "timestep_bias_end=400"],
     r"timestep_bias_begin=500 must be below timestep_bias_end=400"),
    (["timestep_bias_strategy=sooner"], r"timestep_bias_strategy='sooner' is invalid: must be one of none"),
    (["timestep_bias_strategy=range", "timestep_bias_end=2000"], r"timestep_bias_end=2000 is beyond the model's 1000"),
    (["dream_training=true", "model.prediction_type=v_prediction"], r"dream_training=true needs an epsilon"),
])
def test_a_recipe_that_cannot_work_stops_at_start(overrides, message):
    from memfilter.launch.builders import build_components
    cfg = compose(["model=tiny", "model.tiny.resolution=16", "model.tiny.block_out_channels=[32,32]",
                   "model.tiny.vae_channels=[32,32]", *overrides])
    with pytest.raises(ConfigError, match=message):
        check_train_config(cfg, cuda_available=False)
        check_model_settings(cfg, build_components(cfg.model))


def test_recipes_and_8bit_adam_train_from_their_flags(tmp_path):
    """--timestep_bias_*, --dream_training, --use_8bit_adam through the flag table into a run: every recorded
    timestep is in the biased range, and the optimizer's saved moments are bitsandbytes' 8-bit states."""
    pytest.importorskip("bitsandbytes", reason="memfilter[8bit] (installed by the dev extra)")
    flags = translate(["--timestep_bias_strategy=range", "--timestep_bias_begin=600", "--timestep_bias_end=700",
                       "--timestep_bias_multiplier=1e9", "--dream_training", "--use_8bit_adam",
                       "--max_train_steps=2", "--checkpointing_steps=2"])
    run_dir, summary = train_in_process(tmp_path, flags)
    from memfilter.filtering.records import read_records
    t = read_records(run_dir / "records").to_pandas().timestep
    assert len(t) == 8 and t.between(600, 699).all()
    state = torch.load(run_dir / "checkpoint-2" / "optimizer.bin", weights_only=True)["state"]
    # bitsandbytes keeps tensors of >= 4096 elements in 8 bits (its min_8bit_size), smaller ones in fp32
    dtypes = {s["__bnb_optimizer_quant_state__"]["state1"].dtype for s in state.values()}
    assert dtypes == {torch.uint8, torch.float32}
    assert summary["steps"] == 2


def _hub_cache(root, repo_id: str, revisions: dict[str, object]) -> None:
    """A Hugging Face hub cache (as `huggingface_hub` lays it out) holding pipelines under named revisions."""
    base = root / f"models--{repo_id.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    for i, (name, pipe) in enumerate(revisions.items()):
        commit = f"{i + 1:040x}"
        pipe.save_pretrained(base / "snapshots" / commit)
        (base / "refs" / name).write_text(commit)


def test_non_ema_revision_trains_one_revision_and_starts_the_ema_from_the_other(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from memfilter.launch.builders import build_components
    from memfilter.train.families import build_pipeline, build_tiny
    _hub_cache(tmp_path / "hub", "memfilter-test/tiny", {"main": build_pipeline(build_tiny(**TINY_SD, seed=0)),
                                                          "raw": build_pipeline(build_tiny(**TINY_SD, seed=1))})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = compose(["model.pretrained=memfilter-test/tiny", "data.any_model=true"])
    plain = build_components(cfg.model)
    assert plain.ema_start is None
    cfg = compose(translate(["--pretrained_model_name_or_path=memfilter-test/tiny", "--non_ema_revision=raw",
                             "--use_ema"]) + ["data.any_model=true"])
    c = build_components(cfg.model)
    raw = build_tiny(**TINY_SD, seed=1).unet.state_dict()
    assert all(torch.equal(v, raw[k]) for k, v in c.unet.state_dict().items())
    assert all(torch.equal(v, plain.unet.state_dict()[k]) for k, v in c.ema_start.state_dict().items())
    assert not torch.equal(c.unet.conv_in.weight, c.ema_start.conv_in.weight)


def test_dataset_config_name_picks_the_configuration(tmp_path):
    import datasets
    from PIL import Image

    from memfilter.launch.builders import build_dataset
    root = tmp_path / "ds"
    for name in ("plain", "styled"):
        (root / name).mkdir(parents=True)
        rows = {"image": [Image.new("RGB", (16, 16), (40 * i, 80, 120)) for i in range(3)],
                "text": [f"{name} image {i}" for i in range(3)]}
        datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).to_parquet(
            root / name / "train.parquet")
    configs = "".join(f"- config_name: {n}\n  data_files:\n  - split: train\n    path: {n}/*.parquet\n"
                      for n in ("plain", "styled"))
    (root / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    cfg = compose(translate([f"--dataset_name={root}", "--dataset_config_name=styled"]))
    src = build_dataset(cfg.data, 16)
    assert [src.caption_of(i) for i in range(len(src))] == [f"styled image {i}" for i in range(3)]
    with pytest.raises(ConfigError, match=r"data\.config_name='styled': a configuration is chosen only"):
        build_dataset(compose(["data=hf", f"data.path={root / 'styled' / 'train.parquet'}",
                               "data.config_name=styled"]).data, 16)
