"""The training app end to end, in-process, on the tiny model and drawn data."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from memfilter.filtering.records import read_records
from memfilter.launch.config_check import ConfigError
from tests.conftest import compose, launch_cmd, run_cmd, train_in_process


def test_run_directory_is_complete_and_pipeline_loads(tmp_path):
    run_dir, summary = train_in_process(tmp_path, [
        "logger=wandb", "checkpointing_steps=2", "validation_prompts=[a red circle on the left]",
        "validation_steps=2", "validation_inference_steps=2", "filter=batch_quantile",
        "filter.drop_fraction=0.25", "proportion_empty_prompts=0"])
    assert (run_dir / "config.yaml").exists()
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (run_dir / "latest").read_text().strip() == "checkpoint-4"
    assert not list(run_dir.glob(".checkpoint-*"))                 # no half-written checkpoint left
    assert (run_dir / "samples" / "step-000002" / "000-00.png").exists()
    assert (run_dir / "samples" / "final" / "000-00.png").exists()
    # wandb wrote a real offline run
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))

    # every sample of every step has one record; the filter dropped exactly a quarter of each batch
    rec = read_records(run_dir / "records").to_pandas()
    assert len(rec) == 4 * 4 and sorted(rec.step.unique()) == [1, 2, 3, 4]
    assert rec.groupby("step").kept.sum().tolist() == [3, 3, 3, 3]
    assert summary["samples_seen"] == 16 and summary["samples_kept"] == 12
    dropped = rec[~rec.kept]
    for step, group in rec.groupby("step"):        # the dropped sample is the batch's largest magnitude
        assert group.magnitude.idxmax() == dropped[dropped.step == step].index[0]
    assert json.loads((run_dir / "train_summary.json").read_text())["steps"] == 4

    pipe = StableDiffusionPipeline.from_pretrained(run_dir)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    image = pipe("a red circle", num_inference_steps=2, height=16, width=16, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (16, 16, 3) and np.isfinite(image).all()
    # diffusers' layout: the pipeline at the run's root, the checkpoint's UNet loadable by diffusers; the exported
    # UNet is the trained one (the last checkpoint's), not the initial one
    ckpt = UNet2DConditionModel.from_pretrained(run_dir / "checkpoint-4", subfolder="unet")
    assert torch.equal(pipe.unet.state_dict()["conv_in.weight"], ckpt.state_dict()["conv_in.weight"])
    assert not (run_dir / "checkpoint-4" / "model.safetensors").exists()     # no second, flat copy
    card = (run_dir / "README.md").read_text()                 # the model card, as diffusers' scripts write one
    assert "filter=batch_quantile" in card and "75.0%" in card and "![000-00](samples/final/000-00.png)" in card


def test_every_sample_dropped_is_safe(tmp_path):
    """dropped_samples=drop and a threshold below every magnitude: no optimizer step, no NaN, steps and lr still
    counted."""
    run_dir, summary = train_in_process(tmp_path, [
        "filter=fixed", "filter.threshold=1e-12", "proportion_empty_prompts=0", "max_train_steps=3",
        "optim.lr_warmup_steps=0", "dropped_samples=drop"])
    assert summary["steps"] == 3 and summary["skipped_steps"] == 3 and summary["samples_kept"] == 0
    rec = read_records(run_dir / "records").to_pandas()
    assert not rec.kept.any() and np.isfinite(rec.magnitude).all() and np.isfinite(rec.loss).all()
    # the exported UNet equals the initial one: nothing was stepped
    cfg = compose(["model=tiny", "model.tiny.resolution=16", "model.tiny.block_out_channels=[32,32]",
                   "model.tiny.vae_channels=[32,32]"])
    from memfilter.launch.builders import build_components
    initial = build_components(cfg.model).unet.state_dict()
    trained = UNet2DConditionModel.from_pretrained(run_dir / "unet").state_dict()
    assert all(torch.equal(initial[k], trained[k]) for k in initial)


@pytest.mark.parametrize("lora", [False, True])
def test_every_sample_anchored_keeps_the_base_and_counts_them(tmp_path, lora):
    """dropped_samples=anchor with every sample dropped: each one is trained toward the model before fine-tuning,
    which the model still is, so the gradient is exactly zero and (without weight decay) the weights stay the base's,
    yet the steps are not skipped: the anchored samples are in the loss (LoRA: the base is the UNet without its
    adapters)."""
    extra = ["model.lora.rank=4"] if lora else []
    run_dir, summary = train_in_process(tmp_path, [
        "filter=fixed", "filter.threshold=1e-12", "proportion_empty_prompts=0", "max_train_steps=3",
        "optim.lr_warmup_steps=0", "optim.adam_weight_decay=0", "dropped_samples=anchor", *extra])
    assert summary["skipped_steps"] == 0 and summary["samples_kept"] == 0
    assert summary["samples_anchored"] == summary["samples_seen"] == 12
    if lora:
        adapters = load_file(run_dir / "pytorch_lora_weights.safetensors")
        assert all(not v.abs().sum() for k, v in adapters.items() if "lora_B" in k or "lora.up" in k)
        return
    from memfilter.launch.builders import build_components
    cfg = compose(["model=tiny", "model.tiny.resolution=16", "model.tiny.block_out_channels=[32,32]",
                   "model.tiny.vae_channels=[32,32]"])
    initial = build_components(cfg.model).unet.state_dict()
    trained = UNet2DConditionModel.from_pretrained(run_dir / "unet").state_dict()
    assert all(torch.equal(initial[k], trained[k]) for k in initial)


def test_anchoring_changes_the_update_of_a_filtered_run(tmp_path):
    """Half of each batch dropped: anchoring those samples (the default) moves the weights differently from leaving
    them out."""
    common = ["filter=batch_quantile", "filter.drop_fraction=0.5", "max_train_steps=2", "proportion_empty_prompts=0"]
    a, sa = train_in_process(tmp_path / "a", common + ["dropped_samples=drop"])
    b, sb = train_in_process(tmp_path / "b", common)                     # anchor: the default
    assert sa["samples_anchored"] == 0 and sb["samples_anchored"] == sb["samples_seen"] - sb["samples_kept"] == 4
    ra, rb = (read_records(d / "records").to_pandas() for d in (a, b))
    np.testing.assert_array_equal(ra[ra.step == 1].kept, rb[rb.step == 1].kept)    # the same step-1 decisions
    ua = UNet2DConditionModel.from_pretrained(a / "unet").state_dict()
    ub = UNet2DConditionModel.from_pretrained(b / "unet").state_dict()
    assert any(not torch.equal(ua[k], ub[k]) for k in ua)


def test_filter_changes_the_update(tmp_path):
    """Dropping samples changes the weights (the loss really excludes them), keeping all does not drop any."""
    a, sa = train_in_process(tmp_path / "a", ["filter=none", "max_train_steps=2", "proportion_empty_prompts=0"])
    b, sb = train_in_process(tmp_path / "b", ["filter=batch_quantile", "filter.drop_fraction=0.5",
                                              "max_train_steps=2", "proportion_empty_prompts=0"])
    assert sa["kept_fraction"] == 1.0 and sb["kept_fraction"] == 0.5
    ra, rb = (read_records(d / "records").to_pandas() for d in (a, b))
    # same data, same noise: identical magnitudes at step 1 (before any update differs)
    np.testing.assert_array_equal(ra[ra.step == 1].magnitude, rb[rb.step == 1].magnitude)
    ua = UNet2DConditionModel.from_pretrained(a / "unet").state_dict()
    ub = UNet2DConditionModel.from_pretrained(b / "unet").state_dict()
    assert any(not torch.equal(ua[k], ub[k]) for k in ua)


def test_pretrained_directory_v_prediction_lora_and_ema(tmp_path):
    """model.pretrained loads a save_pretrained directory; v-prediction and LoRA export as diffusers does."""
    from memfilter.launch.builders import build_components
    base = build_components(compose(["model=tiny", "model.tiny.resolution=16", "model.tiny.block_out_channels=[32,32]",
                                     "model.tiny.vae_channels=[32,32]"]).model)
    from memfilter.train.families import build_pipeline
    build_pipeline(base).save_pretrained(tmp_path / "base")

    run_dir, summary = train_in_process(tmp_path / "lora", [
        f"model.pretrained={tmp_path / 'base'}", "model.prediction_type=v_prediction", "model.lora.rank=4",
        "max_train_steps=2", "checkpointing_steps=2"])
    assert summary["steps"] == 2
    assert (run_dir / "pytorch_lora_weights.safetensors").exists()
    pipe = StableDiffusionPipeline.from_pretrained(run_dir)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.sample_size * 2 == 16                      # resolution came from the model
    lora_pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base")
    lora_pipe.load_lora_weights(run_dir)
    out = lora_pipe("a red circle", num_inference_steps=2, height=16, width=16, output_type="np").images
    assert np.isfinite(out).all()
    # a LoRA checkpoint holds only the adapters, as diffusers' LoRA script writes them
    ckpt = run_dir / "checkpoint-2"
    assert (ckpt / "pytorch_lora_weights.safetensors").exists() and not (ckpt / "unet").exists()
    assert set(load_file(ckpt / "pytorch_lora_weights.safetensors")) == \
        set(load_file(run_dir / "pytorch_lora_weights.safetensors"))

    run_dir, summary = train_in_process(tmp_path / "ema", ["use_ema=true", "ema_decay=0.5", "max_train_steps=2",
                                                           "checkpointing_steps=1"])
    ema = UNet2DConditionModel.from_pretrained(run_dir / "checkpoint-2", subfolder="unet_ema")
    raw = UNet2DConditionModel.from_pretrained(run_dir / "checkpoint-2", subfolder="unet")
    final = UNet2DConditionModel.from_pretrained(run_dir, subfolder="unet")       # the export holds the EMA weights
    assert torch.equal(final.state_dict()["conv_in.weight"], ema.state_dict()["conv_in.weight"])
    assert not torch.equal(raw.state_dict()["conv_in.weight"], ema.state_dict()["conv_in.weight"])


@pytest.mark.parametrize("override, key", [
    ("optim.learning_rate=-1", "optim.learning_rate"),
    ("train_batch_size=0", "train_batch_size"),
    ("filter=fixed", None),
    ("mixed_precision=fp16", "mixed_precision"),
    ("filter=timestep", None),
])
def test_config_check(override, key):
    from memfilter.launch.config_check import check_train_config
    cfg = compose([override])
    if key is None:
        check_train_config(cfg, cuda_available=False)
        return
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_train_config(cfg, cuda_available=False)


def test_filter_values_are_checked():
    from memfilter.launch.config_check import check_train_config
    with pytest.raises(ConfigError, match=r"filter\.threshold"):
        check_train_config(compose(["filter=fixed", "filter.threshold=-2"]), cuda_available=False)
    with pytest.raises(ConfigError, match=r"filter\.statistic"):
        check_train_config(compose(["filter=timestep", "filter.statistic=mean"]), cuda_available=False)
    with pytest.raises(ConfigError, match=r"filter\.threshold"):
        check_train_config(compose(["filter=caption", "filter.threshold=0.9"]), cuda_available=False)   # must be > 1
    # across fields and names, by the policy's own checks, at start
    with pytest.raises(ConfigError, match=r"filter\.release=0\.6 > filter\.margin=0\.5"):
        check_train_config(compose(["filter.margin=0.5", "filter.release=0.6"]), cuda_available=False)
    with pytest.raises(ConfigError, match=r"filter\.update_with=kept with a quantile"):
        check_train_config(compose(["filter=timestep", "filter.statistic=quantile", "filter.update_with=kept"]),
                           cuda_available=False)
    with pytest.raises(ConfigError, match=r"filter\.update_with='kept' is invalid"):
        check_train_config(compose(["filter=running_quantile", "filter.update_with=kept"]), cuda_available=False)
    with pytest.raises(ConfigError, match=r"filter=item: .*'margn'"):
        check_train_config(compose(["+filter.margn=0.2"]), cuda_available=False)
    check_train_config(compose(["filter=timestep", "filter.update_with=kept"]), cuda_available=False)  # median_mad


def test_a_bad_world_value_stops_the_run_naming_the_data_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.variant='copies'"):
        train_in_process(tmp_path, ["data.variant=copies"])


def test_webdataset_run_reports_bad_samples(tmp_path):
    import webdataset as wds
    from tests.test_wds import png, write_shards
    pattern = write_shards(tmp_path / "shards", n_shards=2, per_shard=8, counts=False)
    with wds.TarWriter(str(tmp_path / "shards" / "shard-000002.tar")) as w:   # a third shard with a bad image
        w.write({"__key__": "broken", "jpg": b"not an image", "txt": "a broken sample"})
        w.write({"__key__": "fine", "png": png(), "txt": "a fine sample"})
    pattern = pattern.replace("000001}", "000002}")
    run_dir, summary = train_in_process(tmp_path, ["data=webdataset", f"data.shards='{pattern}'",
                                                   "max_train_steps=4", "data.shuffle_buffer=0"])
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["skipped"] == {"undecodable": 1} and report["examples"]["undecodable"][0].startswith("broken")
    assert report["used"] == 16 and report["seen"] == 17
    rec = read_records(run_dir / "records").to_pandas()
    assert len(rec) == 16 and rec.key.is_unique and "broken" not in set(rec.key)


def test_imagefolder_bad_images_and_an_all_bad_batch(tmp_path):
    """A corrupt file is skipped and counted; a batch left with no sample still trains safely (filler row)."""
    from PIL import Image
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i, colour in enumerate([(200, 0, 0), (0, 0, 200)]):
        Image.new("RGB", (24, 24), colour).save(folder / f"img{i}.png")
        rows.append({"file_name": f"img{i}.png", "text": f"a plain image {i}"})
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    rows.append({"file_name": "broken.jpg", "text": "a broken image"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    run_dir, summary = train_in_process(tmp_path, ["data=imagefolder", f"data.path={folder}", "train_batch_size=1",
                                                   "max_train_steps=3", "filter=none", "proportion_empty_prompts=0"])
    rec = read_records(run_dir / "records").to_pandas()
    assert sorted(rec.key) == ["img0", "img1"]
    assert summary["samples_seen"] == 2 and summary["skipped_steps"] == 1      # the all-bad step
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["skipped"] == {"undecodable": 1} and report["used"] == 2
    unet = UNet2DConditionModel.from_pretrained(run_dir / "unet")
    assert all(torch.isfinite(p).all() for p in unet.parameters())


def test_imagefolder_with_injected_duplication(tmp_path):
    from PIL import Image
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"image number {i}")
    run_dir, summary = train_in_process(tmp_path, [
        "data=imagefolder", f"data.path={folder}", "data.duplication.protocol=wen",
        "data.duplication.num_duplicated=1", "data.duplication.repeats=6", "data.duplication.nondup_ratio=null",
        "train_batch_size=5", "max_train_steps=2", "filter=none"])
    rec = read_records(run_dir / "records").to_pandas()
    assert len(rec) == 10 and rec.key.is_unique                  # 11 appearances, batch 5: one epoch of 2 batches
    copies = rec[rec.key.str.contains("#dup")]
    assert 0 < len(copies) and summary["dup_kept_fraction"] == 1.0
    assert summary["samples_seen"] == 10


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_steps_neither_weights_nor_ema_and_is_counted(bad):
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel
    from memfilter.train.loop import TrainState, optimizer_update

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    ema = EMAModel(net.parameters(), decay=0.5)
    state, acc = TrainState(), Accelerator(cpu=True)

    def update(grad_value, max_grad_norm):
        for p in net.parameters():
            p.grad = torch.full_like(p, 1.0)
        net.weight.grad[0, 0] = grad_value
        return optimizer_update(acc, list(net.parameters()), opt, ema, net, kept_total=2,
                                max_grad_norm=max_grad_norm, state=state)

    before = [p.detach().clone() for p in net.parameters()]
    ema_before = [p.clone() for p in ema.shadow_params]
    for max_grad_norm in (1.0, 0.0):                       # with and without clipping
        assert not update(bad, max_grad_norm)
    assert state.nonfinite_steps == 2 and state.skipped_steps == 0
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
    assert all(torch.equal(a, p) for a, p in zip(ema_before, ema.shadow_params))
    assert update(1.0, 1.0)                                # a finite one updates both
    assert not torch.equal(before[0], net.weight) and not torch.equal(ema_before[0], ema.shadow_params[0])
    assert torch.isfinite(net.weight).all() and state.nonfinite_steps == 2
    assert not optimizer_update(acc, list(net.parameters()), opt, ema, net, 0, 1.0, state)   # nothing kept
    assert state.skipped_steps == 1


def test_lora_in_bf16_is_fused_into_the_full_precision_base(tmp_path):
    """Training casts the frozen UNet to bf16; the exported pipeline must hold the base's fp32 weights, bit for
    bit, plus the adapters' delta computed in fp32, not a bf16 copy upcast."""
    from safetensors.torch import load_file
    from memfilter.launch.builders import build_components
    from memfilter.train.families import build_pipeline

    base = build_components(compose(["model=tiny", "model.tiny.resolution=16", "model.tiny.block_out_channels=[32,32]",
                                     "model.tiny.vae_channels=[32,32]"]).model)
    build_pipeline(base).save_pretrained(tmp_path / "base")
    run_dir = tmp_path / "lora"                   # its own process: bf16 needs a fresh accelerate state
    proc = run_cmd(launch_cmd(run_dir, [f"model.pretrained={tmp_path / 'base'}", "model.lora.rank=4",
                                        "mixed_precision=bf16", "max_train_steps=2", "optim.learning_rate=1e-2"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = UNet2DConditionModel.from_pretrained(tmp_path / "base" / "unet").state_dict()
    after = UNet2DConditionModel.from_pretrained(run_dir / "unet").state_dict()
    assert any(not torch.equal(before[k].bfloat16().float(), before[k]) for k in before)   # bf16 would show
    lora = load_file(run_dir / "pytorch_lora_weights.safetensors")
    layers = [k.removeprefix("unet.").removesuffix(".lora.down.weight") for k in lora if k.endswith("lora.down.weight")]
    assert layers and all(f"{k}.weight" in before for k in layers)
    adapted = {f"{k}.weight" for k in layers}
    for k in before:
        if k not in adapted:
            assert torch.equal(after[k], before[k]), k                     # untouched: the base, exactly
    for k in layers:
        delta = lora[f"unet.{k}.lora.up.weight"].float() @ lora[f"unet.{k}.lora.down.weight"].float()
        torch.testing.assert_close(after[f"{k}.weight"], before[f"{k}.weight"] + delta, rtol=0, atol=1e-6)  # scale 1
    assert any(not torch.equal(after[k], before[k]) for k in adapted)
