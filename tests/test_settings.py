"""One definition per setting: every config group and experiment composes, and every key reaches the object it
configures; an unknown key stops the run at start, naming it."""
from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from memfilter.launch.config_check import ConfigError, check_train_config, train_args
from tests.conftest import REPO, compose, required_overrides

FILTERS = sorted(p.stem for p in (REPO / "conf" / "filter").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))


def _same(a, b) -> bool:
    return list(a) == list(b) if isinstance(a, (list, tuple)) else a == b


def _reaches(cfg, args, optim) -> None:
    """Every top-level setting and optim.* key arrives in TrainArgs / OptimArgs with its composed value."""
    from memfilter.launch.schema import APP_KEYS, GROUPS
    for key, value in OmegaConf.to_container(cfg, resolve=True).items():
        if key in GROUPS or key in APP_KEYS:
            continue
        assert _same(getattr(args, key), value), key
    for key, value in OmegaConf.to_container(cfg.optim, resolve=True).items():
        assert _same(getattr(optim, key), value), f"optim.{key}"


@pytest.mark.parametrize("name", FILTERS)
def test_every_filter_key_reaches_its_policy(name, tmp_path):
    from memfilter.launch.builders import build_filter
    cfg = compose([f"filter={name}", *required_overrides(f"filter={name}", tmp_path)])
    check_train_config(cfg, cuda_available=False)
    policy = build_filter(cfg.filter, num_train_timesteps=1000)
    assert policy.name == name
    for key, value in OmegaConf.to_container(cfg.filter, resolve=True).items():
        if key not in ("name", "protect"):
            assert _same(getattr(policy, key), value), f"filter.{key}"
    if dataclasses.is_dataclass(policy):     # and the yaml holds no default of its own: the policy's are the config's
        composed = set(cfg.filter) - {"name", "protect"}
        assert composed == {f.name for f in dataclasses.fields(policy) if f.name != "num_train_timesteps"}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_its_values_reach_the_loop(experiment):
    cfg = compose([f"experiment={experiment}"])
    args, optim = train_args(cfg)
    _reaches(cfg, args, optim)
    assert args.lora_rank == cfg.model.lora.rank


@pytest.mark.parametrize("model", MODELS)
def test_every_model_option_composes(model):
    cfg = compose([f"model={model}", "data.any_model=true"])    # real models refuse the world's data otherwise
    check_train_config(cfg, cuda_available=False)
    if model.startswith("tiny"):        # built from config: every model.tiny key reaches the built model
        from memfilter.launch.builders import build_components
        c = build_components(compose([f"model={model}", "model.tiny.resolution=16",
                                      "model.tiny.block_out_channels=[32,32]", "model.tiny.latent_channels=8"]).model)
        assert c.family == cfg.model.tiny.family
        assert c.unet.config.in_channels == 8 and c.vae.config.latent_channels == 8
        assert list(c.unet.config.block_out_channels) == [32, 32] and c.unet.config.sample_size == 8


def test_defaults_are_the_dataclasses_and_the_yaml_only_overrides():
    from memfilter.train.loop import OptimArgs, TrainArgs
    cfg = compose(["train_batch_size=3"])
    args, optim = train_args(cfg)
    _reaches(cfg, args, optim)
    assert args.train_batch_size == 3
    # a value conf/train.yaml does not set is the dataclass default
    assert args.num_train_epochs == TrainArgs.__dataclass_fields__["num_train_epochs"].default
    assert optim.adam_beta2 == OptimArgs.__dataclass_fields__["adam_beta2"].default


def test_an_unknown_key_is_an_error_at_start(tmp_path):
    with pytest.raises(Exception, match="train_batchsize"):        # Hydra: not in the struct
        compose(["train_batchsize=8"])
    with pytest.raises(Exception, match="thresold"):
        compose(["filter=fixed", "filter.thresold=3"])
    # a key an experiment file adds, with no setting behind it, is refused when the run starts
    exp = REPO / "conf" / "experiment" / "_test_unknown_key.yaml"
    exp.write_text("# @package _global_\nlearning_rate_typo: 0.1\n")
    try:
        cfg = compose(["experiment=_test_unknown_key"])
        with pytest.raises(ConfigError, match="learning_rate_typo: no such setting"):
            check_train_config(cfg, cuda_available=False)
    finally:
        exp.unlink()


@pytest.mark.parametrize("override, message", [
    ("optim.lr_scheduler=cosin", r"optim\.lr_scheduler='cosin' is invalid: must be one of constant"),
    ("proportion_empty_prompts=1.5", r"proportion_empty_prompts=1\.5 is invalid: must be a number in \[0, 1\)"),
    ("filter.window=8", r"filter\.warmup=16 > filter\.window=8"),
    ("model.tiny.family=flux", r"model\.tiny\.family='flux' is invalid"),
])
def test_a_bad_value_names_the_key_and_a_valid_one(override, message):
    with pytest.raises(ConfigError, match=message):
        check_train_config(compose([override]), cuda_available=False)


def test_the_settings_module_checks_and_documents_fields():
    from memfilter.filtering.settings import check_settings, defaults, int_at_least, setting

    @dataclasses.dataclass
    class Demo:
        n: int = setting(3, "an integer >= 1, e.g. n=3", int_at_least(1), "how many")
        names: tuple = setting(("a",), "a tuple", lambda v: True)

    assert defaults(Demo) == {"n": 3, "names": ["a"]}
    check_settings(Demo())
    with pytest.raises(ValueError, match=r"x\.n=0 is invalid: must be an integer >= 1, e.g\. n=3"):
        check_settings(Demo(n=0), "x.")


def test_a_real_model_without_data_stops_naming_data():
    from memfilter.launch.config_check import check_train_config
    for overrides in (["model=sd15", "filter=fixed"], ["experiment=wen2024"]):
        with pytest.raises(ConfigError, match=r"^data: model\.pretrained="):
            check_train_config(compose(overrides), cuda_available=True)
    assert compose(["experiment=wen2024"]).use_ema is True
    # the world's own base and models built from config train on the world as before
    check_train_config(compose([]), cuda_available=False)
    check_train_config(compose(["model=tiny"]), cuda_available=False)


def test_a_fixed_threshold_may_be_infinite_but_not_nan_or_negative():
    from memfilter.filtering.policies import FixedThreshold
    assert FixedThreshold(float("inf")).threshold == float("inf")       # keeps everything (the benchmark's)
    for bad in (float("nan"), -1.0, 0):
        with pytest.raises(ValueError, match=r"filter\.threshold="):
            FixedThreshold(bad)


def test_every_data_key_reaches_its_source(tmp_path):
    import json

    from PIL import Image

    from memfilter.launch.builders import build_dataset
    from tests.test_wds import write_shards
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (20, 20), (90 * i, 0, 0)).save(folder / f"i{i}.png")
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"i{i}.png", "caption": f"c {i}"})
                                                     for i in range(2)))
    cfg = compose(["data=imagefolder", f"data.path={folder}", "data.min_size=3", "data.max_pixels=100000",
                   "data.caption_column=caption", "seed=5"])
    src = build_dataset(cfg.data, 16, seed=5)
    assert (src.min_size, src.max_pixels, src.seed) == (3, 100000, 5) and src[0]["caption"] == "c 0"
    pattern = write_shards(tmp_path / "shards", n_shards=2, per_shard=4)
    cfg = compose(["data=webdataset", f"data.shards='{pattern}'", "data.shuffle_buffer=7", "data.min_size=2",
                   "data.max_pixels=12345", "data.samples_per_epoch=8"])
    src = build_dataset(cfg.data, 16)
    assert (src.shuffle_buffer, src.min_size, src.max_pixels, src.samples_per_epoch) == (7, 2, 12345, 8)
    with pytest.raises(Exception, match="shufle_buffer"):
        compose(["data=webdataset", "data.shufle_buffer=3"])


def test_foreach_and_offloaded_ema_train_as_the_plain_ema(tmp_path):
    """diffusers' --foreach_ema and --offload_ema: the same EMA weights as the plain update (on CPU the offload is a
    round trip through the same device; the code path is the one CUDA runs)."""
    import torch
    from diffusers import UNet2DConditionModel

    from tests.conftest import train_in_process
    runs = {}
    for name, extra in (("plain", []), ("foreach_offload", ["foreach_ema=true", "offload_ema=true"])):
        run_dir, _ = train_in_process(tmp_path / name, ["use_ema=true", "ema_decay=0.5", "max_train_steps=2",
                                                        "checkpointing_steps=2", *extra])
        runs[name] = UNet2DConditionModel.from_pretrained(run_dir, subfolder="unet").state_dict()
        assert (run_dir / "checkpoint-2" / "unet_ema").is_dir()
    for k, v in runs["plain"].items():
        torch.testing.assert_close(runs["foreach_offload"][k], v, rtol=1e-6, atol=1e-7)


def test_input_perturbation_moves_x_t_and_keeps_the_target():
    """diffusers' --input_perturbation: x_t from noise + gamma * fresh noise, the target still the noise."""
    import torch
    from diffusers import DDPMScheduler

    from memfilter.train.models import SD_SCHEDULER
    from memfilter.train.noise import NoiseArgs, noised_inputs
    sched = DDPMScheduler(**SD_SCHEDULER)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    a = noised_inputs(sched, latents, torch.Generator().manual_seed(0))
    b = noised_inputs(sched, latents, torch.Generator().manual_seed(0), NoiseArgs(input_perturbation=0.1))
    (x0, t0, y0), (x1, t1, y1) = (a.noisy, a.timesteps, a.target), (b.noisy, b.timesteps, b.target)
    assert torch.equal(t0, t1) and torch.equal(y0, y1) and not torch.allclose(x0, x1)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=g)
    torch.randint(0, 1000, (3,), generator=g)
    extra = torch.randn(latents.shape, generator=g)
    torch.testing.assert_close(x1, sched.add_noise(latents, noise + 0.1 * extra, t1))


def test_validation_epochs_validates_after_every_nth_epoch(tmp_path):
    """diffusers' --validation_epochs: 16 samples in batches of 4 are 4 steps an epoch; 9 steps end 2 epochs."""
    from tests.conftest import train_in_process
    run_dir, _ = train_in_process(tmp_path, ["max_train_steps=9", "validation_epochs=1", "validation_inference_steps=2",
                                             "validation_prompts=[a red circle]"])
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["epoch-0001", "epoch-0002", "final"]
