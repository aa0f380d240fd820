"""The toy-world demo end to end at a small size, the shipped base model, and the world evaluation's measures."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import REPO, run_cmd
from memfilter.toyworld.base import ASSET_DIR
from memfilter.toyworld.evaluate import replication_bar, training_descriptors
from memfilter.toyworld.world import ToyWorld, detail_descriptor, draw_item


def test_replication_bar_separates_copies_from_chance():
    w = ToyWorld(num_unique=200, num_duplicated=4, repeats=5)
    idx, desc, images = training_descriptors(w)
    bar = replication_bar(w, desc, n=300, quantile=0.99)
    assert 0.2 < bar["bar"] < 0.9
    copies = torch.nn.functional.normalize(torch.from_numpy(np.stack([detail_descriptor(im) for im in images[:20]])),
                                           dim=1)
    assert ((copies @ desc.T).max(dim=1).values > bar["bar"]).all()          # a training image replicates itself
    fresh = [detail_descriptor(draw_item(w.seed, "fresh", 5000 + i)["image"]) for i in range(200)]
    f = torch.nn.functional.normalize(torch.from_numpy(np.stack(fresh)), dim=1)
    assert ((f @ desc.T).max(dim=1).values > bar["bar"]).float().mean() < 0.05


def test_shipped_base_loads_and_follows_captions():
    """The base the demo fine-tunes: a StableDiffusionPipeline from safetensors that draws what captions name."""
    from diffusers import StableDiffusionPipeline

    from memfilter.toyworld.base import base_fidelity
    from memfilter.train.models import Components

    assert (ASSET_DIR / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    info = json.loads((ASSET_DIR / "world_base.json").read_text())
    assert info["vae"]["vae_psnr_db"] > 28
    pipe = StableDiffusionPipeline.from_pretrained(ASSET_DIR)
    c = Components(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, pipe.scheduler)
    fid = base_fidelity(c, ToyWorld().spec, n=32, seed=3, steps=20)
    assert fid["all"] >= 0.6, fid


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reports_every_section(tmp_path):
    out = tmp_path / "demo"
    cmd = ["python", str(REPO / "launch" / "demo.py"), f"output_dir={out}",
           "world.num_unique=40", "world.num_duplicated=2", "world.repeats=6", "world.shard_size=20",
           "train='max_train_steps=4 train_batch_size=8 logger=none checkpointing_steps=2 validation_prompts=[]'",
           "evaluation.num_images_per_prompt=2", "evaluation.num_unique_prompts=6", "evaluation.unique_images=1",
           "evaluation.num_inference_steps=3", "evaluation.fresh_items=100"]
    proc = run_cmd(cmd, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    for section in ("## Targets", "## Runs", "## Detection", "## Replication (unintended) and prompt fidelity",
                    "## Filter decisions", "grid.png", "magnitudes.png", "detection.png"):
        assert section in report, section
    for png in ("grid.png", "magnitudes.png", "detection.png"):
        assert (out / png).stat().st_size > 1000
    data = json.loads((out / "report.json").read_text())
    assert set(data["results"]) == {"base", "unfiltered", "filtered", "dropped"}     # conf/demo.yaml's runs
    for name in ("unfiltered", "filtered", "dropped"):
        res = data["results"][name]
        assert res["filter"]["overall"]["duplicated_judged"] + res["filter"]["overall"]["unique_judged"] > 0
        assert len(res["rows"]) == 2 * 2 + 6
        assert (out / name / "model_index.json").exists()
        assert data["runs"][name]["summary"]["steps"] == 4
    # every judged sample of the unfiltered run was kept; the records cover 4 steps x 8 samples
    assert data["results"]["unfiltered"]["filter"]["overall"]["dropped"] == 0
    assert len(data["targets"]) == 5
    assert (out / "world" / "manifest.parquet").exists()


_SMALL = ["world.num_unique=40", "world.num_duplicated=2", "world.repeats=6", "world.shard_size=20",
          "train='max_train_steps=4 train_batch_size=8 logger=none checkpointing_steps=2 validation_prompts=[]'",
          "evaluation.num_images_per_prompt=2", "evaluation.num_unique_prompts=6", "evaluation.unique_images=1",
          "evaluation.num_inference_steps=3", "evaluation.fresh_items=100", "evaluate_base=false"]


@pytest.mark.slow
def test_demo_over_seeds_reports_spread_dedup_baselines_and_protected_concepts(tmp_path):
    """seeds=[..]: one world per seed, the dedup baseline beside the runs, named concepts protected by caption."""
    import pyarrow.parquet as pq

    from memfilter.filtering.records import read_records
    from memfilter.toyworld.world import ToyWorld

    out = tmp_path / "demo"
    cmd = ["python", str(REPO / "launch" / "demo.py"), f"output_dir={out}", "seeds=[3,4]", "~runs.dropped",
           "world.num_concepts=1", "world.concept_repeats=5", "baselines=[exact]",
           "+runs.protected='filter=item filter.protect.captions=[emblem]'", *_SMALL]
    proc = run_cmd(cmd, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "over 2 seeds" in report and "## Targets on every seed" in report
    data = json.loads((out / "report.json").read_text())
    assert data["seeds"] == [3, 4]
    assert set(data["table"]) == {"unfiltered", "filtered", "protected", "dedup-exact"}
    rep = data["table"]["unfiltered"]["dup. prompts replicated"]
    assert set(rep["values"]) == {"3", "4"} and rep["min"] <= rep["mean"] <= rep["max"]
    for s in (3, 4):
        seed_dir = out / f"seed-{s}"
        assert json.loads((seed_dir / "world" / "world.json").read_text())["seed"] == s
        assert (seed_dir / "report.md").is_file()
        # the exact-dedup shards hold every distinct image once: no duplicated copy, no concept copy
        manifest = pq.read_table(seed_dir / "world-dedup-exact" / "manifest.parquet").to_pandas()
        assert manifest.sha256.is_unique and len(manifest) == 40 + 2 + 1
        # the protected run kept every appearance of the concept (intended), the concept reached the report
        world = ToyWorld(num_unique=40, num_duplicated=2, repeats=6, seed=s, num_concepts=1, concept_repeats=5)
        rec = read_records(seed_dir / "protected" / "records").to_pandas()
        concept = ToyWorld.item_of_keys(rec.key) == world.concept_indices()[0]
        assert concept.any() and rec.kept[concept].all()
    assert data["table"]["unfiltered"]["concepts reproduced"]["mean"] is not None
    # seeds run apart, then aggregated: reuse_reports reads each seed's report back, trains and evaluates nothing
    (out / "seed-4" / "protected" / "records").rename(out / "records-moved")      # would fail a re-evaluation
    proc = run_cmd(cmd + ["reuse_reports=true"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fine-tune" not in proc.stdout and json.loads((out / "report.json").read_text())["table"] == data["table"]


def test_build_world_base_writes_a_loadable_pipeline(tmp_path, one_thread):
    """The base builder end to end at a few steps: both stages, reuse of a trained VAE, save_pretrained."""
    from diffusers import StableDiffusionPipeline

    from memfilter.toyworld.base import BaseArgs, build_world_base

    args = BaseArgs(vae_steps=2, unet_steps=2, eval_every=1, batch_size=4, block_out_channels=(32, 32),
                    cross_attention_dim=32, vae_channels=(32, 32))
    out = build_world_base(tmp_path / "a", args)
    info = json.loads((out / "world_base.json").read_text())
    assert [h["step"] for h in info["unet"]["history"]] == [1, 2] and "all" in info["unet"]["history"][0]
    assert info["vae"]["scaling_factor"] == pytest.approx(1 / info["vae"]["latent_std"])
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.vae.config.scaling_factor == pytest.approx(info["vae"]["scaling_factor"])
    assert pipe.tokenizer.model_max_length == 16
    again = build_world_base(tmp_path / "b", BaseArgs(**{**args.__dict__, "vae_from": str(out)}))
    vae_a = StableDiffusionPipeline.from_pretrained(out).vae.state_dict()
    vae_b = StableDiffusionPipeline.from_pretrained(again).vae.state_dict()
    assert all(torch.equal(vae_a[k], vae_b[k]) for k in vae_a)          # the VAE was reused, not retrained
