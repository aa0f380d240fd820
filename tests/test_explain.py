"""Per-token significance (filtering/explain.py, evaluation/explain.py, launch/explain.py) on tiny models built here:
the gradient is the derivative of m along the real CFG trajectory with respect to the prompt's own rows."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from memfilter.filtering.detection import generation_seed, trajectory_magnitudes
from memfilter.filtering.explain import significance_and_magnitudes, step_gradients, token_significance
from memfilter.launch.config_check import ConfigError
from memfilter.train.families import build_tiny, build_tiny_sdxl, get_family
from tests.conftest import compose

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(resolution=16, block_out_channels=(32, 32), vae_channels=(32, 32))
SHAPE = (4, 8, 8)
PROMPT = "a red circle on the left"


def _setup(prediction_type="epsilon", dtype=torch.float32):
    c = build_tiny(**SMALL, prediction_type=prediction_type)
    c.unet.eval().to(dtype)
    sched = DDIMScheduler.from_config(c.noise_scheduler.config, set_alpha_to_one=False)
    ids = c.tokenizer([PROMPT, ""], padding="max_length", max_length=c.tokenizer.model_max_length,
                      return_tensors="pt").input_ids
    with torch.no_grad():
        emb = c.text_encoder(ids)[0].to(dtype)          # [2, 77, 32]
    return c, sched, emb[:1], emb[1:]


def _m(unet, x, t, e, uncond, scale):
    """m in the test's own float64 arithmetic: scale * ||eps(x, t, e) - eps(x, t, e_0)||."""
    with torch.no_grad():
        return scale * (unet(x, t, encoder_hidden_states=e).sample
                        - unet(x, t, encoder_hidden_states=uncond).sample).flatten().norm()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_gradient_matches_finite_differences_at_steps_one_and_two(prediction_type):
    c, sched, cond, uncond = _setup(prediction_type, torch.float64)
    unet, g = c.unet, 7.5
    steps = list(step_gradients(unet, sched, cond, uncond, SHAPE, num_generations=1, num_steps=2,
                                num_inference_steps=5, guidance_scale=g, seed=3, prompt_index=2))
    assert [(s.generation, s.step) for s in steps] == [(0, 0), (0, 1)] and steps[0].grad.shape == (77, 32)
    # the trajectory rebuilt here: x_T of (seed 3, prompt 2, generation 0), one true-CFG DDIM step u + g (c - u)
    sched.set_timesteps(5)
    t0, t1 = sched.timesteps[:2]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(generation_seed(3, 2, 0))).double()[None]
    x = x * sched.init_noise_sigma
    with torch.no_grad():
        pc, pu = (unet(x, t0, encoder_hidden_states=e).sample for e in (cond, uncond))
    x1 = sched.step(pu + g * (pc - pu), t0, x).prev_sample
    abar = sched.alphas_cumprod.double()
    gen, h = torch.Generator().manual_seed(0), 1e-4
    for s, xt, t in zip(steps, (x, x1), (t0, t1)):
        scale = abar[int(t)].sqrt() if prediction_type == "v_prediction" else 1.0   # v -> eps: |c_t| = sqrt(abar)
        assert s.timestep == int(t)
        assert s.magnitude == pytest.approx(float(_m(unet, xt, t, cond, uncond, scale)), rel=1e-5)
        for row in (1, 3, 40):                            # prompt tokens and a padding row
            v = torch.zeros_like(cond)
            v[0, row] = torch.randn(32, generator=gen, dtype=torch.float64)
            fd = (_m(unet, xt, t, cond + h * v, uncond, scale) - _m(unet, xt, t, cond - h * v, uncond, scale)) / (2 * h)
            assert float((s.grad * v[0]).sum()) == pytest.approx(float(fd), rel=1e-6, abs=1e-12), (s.step, row)
            assert s.grad[row].abs().sum() > 0


def test_the_prompt_rows_are_differentiated_not_the_swapped_ones():
    """The official code exchanges cond and uncond: its gradient is that of the empty prompt's rows. At x_T (step 1)
    both are computed here by hand; the scores match the prompt's and are far from the swapped ones."""
    c, sched, cond, uncond = _setup()
    scores = token_significance(c.unet, sched, cond, uncond, SHAPE, num_generations=1, num_steps=1,
                                num_inference_steps=5)
    sched.set_timesteps(5)
    t = sched.timesteps[0]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(generation_seed(0, 0, 0)))[None] * sched.init_noise_sigma

    def grad_norms(differentiated, fixed):
        e = differentiated.clone().requires_grad_(True)
        m = (c.unet(x, t, encoder_hidden_states=e).sample - c.unet(x, t, encoder_hidden_states=fixed).sample).norm()
        return torch.autograd.grad(m, e)[0][0].norm(dim=-1)                     # [77]

    right, swapped = grad_norms(cond, uncond), grad_norms(uncond, cond)
    torch.testing.assert_close(scores, right, rtol=1e-4, atol=1e-7)
    assert ((scores - swapped).abs() / scores).max() > 0.05          # 500x the tolerance above


def test_averages_over_generations_and_follows_the_detection_trajectory():
    c, sched, cond, uncond = _setup("v_prediction")
    kw = dict(num_steps=2, num_inference_steps=5, seed=1)
    both, mags = significance_and_magnitudes(c.unet, sched, cond, uncond, SHAPE, num_generations=2, prompt_index=4,
                                             **kw)
    first = token_significance(c.unet, sched, cond, uncond, SHAPE, num_generations=1, prompt_index=4, **kw)
    second = token_significance(c.unet, sched, cond, uncond, SHAPE, num_generations=1, prompt_index=4,
                                first_generation=1, **kw)
    torch.testing.assert_close(both, (first + second) / 2)
    assert not torch.allclose(first, second)                 # two different noises: the mean is not trivial
    # m along the way is what detection measures on the same (seed, prompt index, generation)
    ref = trajectory_magnitudes(c.unet, sched, cond, uncond, SHAPE, num_generations=2, index_offset=4, **kw)[0]
    torch.testing.assert_close(mags, ref, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="num_steps=6"):
        token_significance(c.unet, sched, cond, uncond, SHAPE, num_steps=6, num_inference_steps=5)


def test_sdxl_runs_end_to_end_and_names_the_prompt_tokens(tmp_path):
    from memfilter.evaluation.detect import score_prompts
    from memfilter.evaluation.explain import explain_prompts, render_tokens

    c = build_tiny_sdxl(**SMALL)
    c.unet.eval()
    pipe = get_family(c).pipeline()
    prompts = ["a red circle", "a blue square on the left"]
    kw = dict(num_generations=1, num_steps=2, num_inference_steps=5, resolution=16)
    records = explain_prompts(pipe, prompts, **kw)
    _, mags = score_prompts(pipe, prompts, **kw)
    for rec, prompt, m in zip(records, prompts, mags):
        assert rec["tokens"][0] == "<|startoftext|>" and rec["tokens"][-1] == "<|endoftext|>"
        assert rec["tokens"][1:-1] == pipe.tokenizer.tokenize(prompt)           # one word, one token here
        assert rec["positions"] == list(range(len(rec["tokens"]))) and rec["sequence_length"] == 77
        assert len(rec["scores"]) == len(rec["tokens"]) and min(rec["scores"]) > 0
        assert rec["padding_mean_score"] is not None
        torch.testing.assert_close(torch.tensor(rec["magnitudes"]), m, rtol=1e-4, atol=1e-6)
    image = Image.open(render_tokens(records[1]["tokens"], records[1]["scores"], tmp_path / "p.png"))
    assert image.size[0] == 900 and image.getextrema() != ((255, 255),) * 3
    with pytest.raises(ValueError, match="prompts: the list is empty"):
        explain_prompts(pipe, [], **kw)


def test_the_app_writes_json_and_png_and_refuses_a_used_output(tmp_path):
    from memfilter.evaluation.generate import load_pipeline
    from memfilter.launch.explain import run

    c = build_tiny(**SMALL)
    get_family(c).pipeline().save_pretrained(tmp_path / "pipe")
    assert load_pipeline(tmp_path / "pipe", "cpu").unet.config.sample_size == 8
    out = tmp_path / "explained"
    args = [f"pipeline={tmp_path / 'pipe'}", f"output={out}", "num_generations=1", "num_inference_steps=5",
            "device=cpu"]
    result = run(compose([*args, f"prompt={PROMPT}"], config_name="explain"))
    saved = json.loads((out / "explanation.json").read_text())
    assert saved["settings"]["num_generations"] == 1 and saved["settings"]["resolution"] == 16
    rec = saved["prompts"][0]
    assert rec["prompt"] == PROMPT and len(rec["tokens"]) == len(rec["scores"]) == 8   # start, 6 words, end
    assert rec == json.loads(json.dumps(result["prompts"][0]))
    assert Image.open(out / rec["image"]).format == "PNG"
    with pytest.raises(ConfigError, match="output=.*explanation.json"):
        run(compose([*args, f"prompt={PROMPT}"], config_name="explain"))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ConfigError, match="prompts=.*no prompts"):
        run(compose([*args, f"prompts={tmp_path / 'empty.txt'}", f"output={tmp_path / 'o2'}"], config_name="explain"))
    with pytest.raises(ConfigError, match="num_steps=6"):
        run(compose([*args, f"prompt={PROMPT}", "num_steps=6", f"output={tmp_path / 'o3'}"], config_name="explain"))
