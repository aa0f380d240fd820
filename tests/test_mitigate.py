"""Inference-time mitigation (filtering/mitigate.py, evaluation/mitigate.py, launch/mitigate.py) on tiny real models:
the embedding optimisation, its per-generation target, the baselines, both families end to end and the app."""
from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import DDIMScheduler

from memfilter.filtering.mitigate import (add_embedding_noise, add_random_numbers, add_random_tokens, baseline_rng,
                                          first_step_magnitudes, initial_noise, optimize_prompt_embedding,
                                          repeat_words)
from memfilter.launch.config_check import ConfigError
from memfilter.train.families import build_tiny, build_tiny_sdxl, from_pipeline, get_family
from tests.conftest import compose

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny ops: one intra-op thread is faster
SMALL = dict(resolution=16, block_out_channels=(32, 32), vae_channels=(32, 32))
SHAPE, STEPS = (4, 8, 8), 4                          # a 16 px image's latent; a short DDIM schedule
PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def sd():
    c = build_tiny(**SMALL)
    c.unet.eval()
    fam = get_family(c)
    sched = DDIMScheduler.from_config(c.noise_scheduler.config, set_alpha_to_one=False)
    return c, sched, fam.prompt_conditioning([PROMPT], 16), fam.uncond_conditioning(16)


def _optimize(sd, **kw):
    c, sched, cond, uncond = sd
    args = dict(num_generations=2, num_inference_steps=STEPS, seed=0, prompt_index=0)
    return optimize_prompt_embedding(c.unet, sched, cond, uncond, SHAPE, **{**args, **kw})


def test_a_reachable_target_is_reached_and_an_unreachable_one_stops_at_the_limit_and_says_so(sd):
    c, sched, cond, uncond = sd
    m0 = first_step_magnitudes(c.unet, sched, cond, uncond, SHAPE, num_generations=2, num_inference_steps=STEPS)
    target = 0.5 * float(m0.min())                   # every generation below half the smallest initial m
    new, info = _optimize(sd, target=target)
    torch.testing.assert_close(info["m_before"], m0, rtol=1e-4, atol=1e-6)     # detection's step-1 m, same x_T
    assert info["reached"] and 0 < info["iterations"] <= 10 and (info["m_after"] < target).all()
    assert info["history"].shape == (info["iterations"] + 1, 2) and "reached" in info["stop_reason"]
    # m_after is the returned embedding's: measured again from scratch
    again = first_step_magnitudes(c.unet, sched, new, uncond, SHAPE, num_generations=2, num_inference_steps=STEPS)
    torch.testing.assert_close(again, info["m_after"], rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in c.unet.parameters())                    # the model learns nothing
    _, info = _optimize(sd, target=1e-6, max_iterations=3)
    assert not info["reached"] and info["iterations"] == 3 and info["history"].shape == (4, 2)
    assert "not reached" in info["stop_reason"] and "max_iterations=3" in info["stop_reason"]
    assert (info["m_after"] < info["m_before"]).all()
    with pytest.raises(ValueError, match="target=0"):
        _optimize(sd, target=0)


def test_the_start_token_row_is_frozen_and_every_other_row_moves(sd):
    _, _, cond, _ = sd
    new, info = _optimize(sd, target=1e-6, max_iterations=2)
    old_e, new_e = cond["encoder_hidden_states"], new["encoder_hidden_states"]           # [1, 77, D]
    assert new_e.shape == old_e.shape and info["iterations"] == 2
    assert torch.equal(new_e[:, 0], old_e[:, 0])
    assert (new_e[:, 1:] != old_e[:, 1:]).any(dim=-1).all()       # padding rows too: the official mask is all but 0


def test_the_target_is_per_generation_so_the_decision_does_not_depend_on_n(sd):
    c, sched, cond, uncond = sd
    # a seed whose generation 0 has the smaller m, so that a target between the two separates the rules
    seed = next(s for s in range(20) if (lambda m: m[0] < m[1])(first_step_magnitudes(
        c.unet, sched, cond, uncond, SHAPE, num_generations=2, num_inference_steps=STEPS, seed=s)))
    _, two = _optimize(sd, target=1e9, max_iterations=0, seed=seed)
    _, one = _optimize(sd, target=1e9, max_iterations=0, seed=seed, num_generations=1)
    torch.testing.assert_close(one["m_before"][0], two["m_before"][0], rtol=1e-5, atol=1e-7)  # same x_T, same m
    m_low, m_high = two["m_before"].tolist()
    target = 0.25 * m_low + 0.75 * m_high            # above the mean of the two, below generation 1's m
    new1, one = _optimize(sd, target=target, max_iterations=0, seed=seed, num_generations=1)
    assert one["reached"] and one["iterations"] == 0
    assert torch.equal(new1["encoder_hidden_states"], cond["encoder_hidden_states"])   # nothing to do: unchanged
    _, two = _optimize(sd, target=target, max_iterations=0, seed=seed)
    assert not two["reached"] and two["m_before"].mean() < target    # a mean rule would have stopped here


def _inserted(original: str, changed: str) -> list[str]:
    """The words of `changed` beyond `original`'s, after checking `original`'s words are kept in order."""
    words, it = changed.split(), iter(changed.split())
    assert all(w in it for w in original.split()), (original, changed)           # an in-order subsequence
    return list((Counter(words) - Counter(original.split())).elements())


def test_text_baselines_insert_exactly_k_words_keep_the_prompt_and_repeat_with_the_seed():
    vocab = ["zorp", "blick", "quux"]
    cases = {"tokens": (lambda p, r, k: add_random_tokens(p, r, vocab, k), lambda w: w in vocab),
             "numbers": (add_random_numbers, lambda w: w.isdigit() and 0 <= int(w) < 100_000),
             "repeats": (repeat_words, lambda w: w in PROMPT.split())}
    for name, (fn, allowed) in cases.items():
        out = fn(PROMPT, baseline_rng(0, 7), 3)
        added = _inserted(PROMPT, out)
        assert len(out.split()) == len(PROMPT.split()) + 3 and len(added) == 3 and all(map(allowed, added)), name
        assert fn(PROMPT, baseline_rng(0, 7), 3) == out                          # same (seed, prompt index)
        assert len({fn(PROMPT, baseline_rng(s, 7), 3) for s in range(10)}) > 1   # the seed matters
        assert fn(PROMPT, random.Random(0), 0) == PROMPT
    # insertions land anywhere, the start and the end included
    where = {next(i for i, w in enumerate(add_random_numbers(PROMPT, random.Random(s), 1).split()) if w.isdigit())
             for s in range(40)}
    assert {0, len(PROMPT.split())} <= where
    assert repeat_words("", random.Random(0), 3) == ""
    from memfilter.evaluation.mitigate import token_vocabulary
    words = token_vocabulary(build_tiny(**SMALL).tokenizer)
    assert "circle" in words and "<|startoftext|>" not in words and all(w and " " not in w for w in words)


def test_embedding_noise_has_the_given_std_and_leaves_row_zero():
    emb = torch.randn(4, 77, 256, generator=torch.Generator().manual_seed(0))
    out = add_embedding_noise(emb, torch.Generator().manual_seed(1), sigma=0.3)
    d = (out - emb)[:, 1:]                                                        # 78,848 draws
    assert torch.equal(out[:, 0], emb[:, 0])
    assert abs(float(d.std()) - 0.3) < 0.01 and abs(float(d.mean())) < 0.01
    assert torch.equal(out, add_embedding_noise(emb, torch.Generator().manual_seed(1), sigma=0.3))
    half = add_embedding_noise(emb.half(), torch.Generator().manual_seed(1), sigma=0.3)
    assert half.dtype == torch.float16 and torch.equal(half[:, 0], emb.half()[:, 0])


@pytest.mark.parametrize("build", [build_tiny, build_tiny_sdxl], ids=["sd", "sdxl"])
def test_both_families_run_end_to_end_from_detections_x_T(build):
    from memfilter.evaluation.detect import score_prompts
    from memfilter.evaluation.mitigate import mitigate

    pipe = get_family(build(**SMALL)).pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts, kw = ["a red circle", PROMPT], dict(num_generations=2, num_inference_steps=3, progress=False)
    plain = mitigate(pipe, prompts, "none", **kw)
    assert len(plain) == 4 and all(r["image"].size == (16, 16) for r in plain)
    _, mags = score_prompts(pipe, prompts, num_generations=2, num_steps=1, num_inference_steps=3)
    np.testing.assert_allclose([r["m_before"] for r in plain], mags[:, :, 0].flatten().numpy(), rtol=1e-4)
    # method=none is the pipeline's own generation from the same x_T: the embeddings are built as the pipeline's
    ref = pipe([PROMPT] * 2, latents=initial_noise(SHAPE, 2, prompt_index=1), num_inference_steps=3, height=16,
               width=16, guidance_scale=7.5).images
    assert all(np.array_equal(np.asarray(a["image"]), np.asarray(b)) for a, b in zip(plain[2:], ref))
    target = 0.5 * min(r["m_before"] for r in plain)
    rows = mitigate(pipe, prompts, "embedding", target=target, **kw)
    assert [r["m_before"] for r in rows] == pytest.approx([r["m_before"] for r in plain], rel=1e-4)
    for i in range(2):                               # reached: every generation of the prompt is below the target
        mine = [r for r in rows if r["prompt_index"] == i]
        assert all(r["reached"] == all(q["m_after"] < target for q in mine) for r in mine)
    assert all(r["image"].size == (16, 16) for r in rows) and all(r["iterations"] > 0 for r in rows)
    assert any(not np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])) for a, b in zip(rows, plain))
    # only encoder_hidden_states rows move: SDXL's pooled embedding and time ids stay as the pipeline builds them
    fam = from_pipeline(pipe)
    cond = fam.prompt_conditioning([PROMPT], 16)
    new, _ = optimize_prompt_embedding(pipe.unet, DDIMScheduler.from_config(pipe.scheduler.config), cond,
                                       fam.uncond_conditioning(16), SHAPE, target=1e-6, max_iterations=1,
                                       num_generations=1, num_inference_steps=3)
    assert not torch.equal(new["encoder_hidden_states"], cond["encoder_hidden_states"])
    assert all(torch.equal(new["added_cond_kwargs"][k], v) for k, v in cond.get("added_cond_kwargs", {}).items())
    assert ("added_cond_kwargs" in cond) == (build is build_tiny_sdxl)
    noisy = mitigate(pipe, prompts[:1], "embedding_noise", sigma=0.5, **kw)
    assert noisy[0]["m_after"] != pytest.approx(noisy[0]["m_before"]) and noisy[0]["prompt_used"] == prompts[0]


def _app_config(tmp_path, *extra):
    return compose([f"pipeline={tmp_path / 'pipe'}", f"prompts={tmp_path / 'memorized.txt'}", "num_generations=2",
                    "num_inference_steps=3", f"output={tmp_path / 'out'}", "device=cpu", *extra],
                   config_name="mitigate")


def test_the_app_writes_images_index_and_summary_and_refuses_a_used_output(tmp_path, capsys):
    from memfilter.launch.mitigate import run

    get_family(build_tiny(**SMALL)).pipeline().save_pretrained(tmp_path / "pipe")
    (tmp_path / "memorized.txt").write_text("a red circle\na blue square on the left\n")
    with pytest.raises(ConfigError, match="random_tokens, random_numbers, repeat_words, embedding_noise, none"):
        run(_app_config(tmp_path, "method=resample"))
    with pytest.raises(ConfigError, match="method=embedding needs"):
        run(_app_config(tmp_path))
    summary = run(_app_config(tmp_path, "method=embedding", "target=0.05"))
    out = tmp_path / "out"
    table = pq.read_table(out / "memorized" / "index.parquet").to_pandas()
    assert len(table) == 4 and sorted(p.name for p in (out / "memorized").glob("*.png")) == [
        "00000-00.png", "00000-01.png", "00001-00.png", "00001-01.png"]
    assert {"set", "prompt_id", "image_index", "seed", "path", "m_before", "m_after", "reached"} <= set(table.columns)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["n_images"] == 4 and on_disk["reached"]["of"] == 2 and on_disk == json.loads(
        json.dumps(summary, default=str))
    assert on_disk["m_after"]["mean"] <= on_disk["m_before"]["mean"]
    assert "reached for" in capsys.readouterr().out
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(ConfigError, match=f"output={out} already holds"):
        run(_app_config(tmp_path, "method=none"))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_the_world_study_compares_methods_on_the_same_noise():
    from memfilter.evaluation.generate import load_pipeline
    from memfilter.filtering.calibration import fpr_threshold
    from memfilter.toyworld.base import ASSET_DIR
    from memfilter.toyworld.mitigation import markdown, mitigation_study
    from memfilter.toyworld.world import ToyWorld

    world = ToyWorld(num_unique=6, num_duplicated=2, repeats=3, seed=1)
    res = mitigation_study(load_pipeline(ASSET_DIR, "cpu"), world, methods=("none", "embedding", "random_numbers"),
                           num_images=2, num_unique=3, num_inference_steps=3, fresh_items=20, max_iterations=2)
    none = res["rows"]["none"]
    assert res["target"] == fpr_threshold([r["m_before"] for r in none if r["set"] == "unique"], 0.05)
    for method, rows in res["rows"].items():
        assert len(rows) == 5 * 2 and {r["set"] for r in rows} == {"duplicated", "unique"}
        # the same prompt and x_T before any change: m_before is the same number in every method
        assert [r["m_before"] for r in rows] == pytest.approx([r["m_before"] for r in none], rel=1e-5)
        assert set(res["methods"][method]) == {"duplicated", "unique"}
    emb = res["rows"]["embedding"]
    # reached or not, every prompt says which, and a reached one is below the calibrated target
    assert all(r["reached"] in (True, False) and r["stop_reason"] for r in emb)
    assert all(r["m_after"] < res["target"] for r in emb if r["reached"])
    assert np.mean([r["m_after"] for r in emb]) < np.mean([r["m_before"] for r in emb])
    assert "| embedding |" in markdown(res) and "| random_numbers |" in markdown(res)
