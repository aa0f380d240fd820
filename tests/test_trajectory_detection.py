"""Detection scores along the real CFG trajectory (filtering/detection.py)."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from memfilter.filtering.detection import DETECTORS, generation_seed, detection_scores, trajectory_magnitudes
from memfilter.filtering.signal import text_noise_magnitude
from memfilter.train.families import build_tiny


def _setup(prediction_type="epsilon"):
    c = build_tiny(resolution=16, block_out_channels=(32, 32), vae_channels=(32, 32), prediction_type=prediction_type)
    c.unet.eval()
    sched = DDIMScheduler.from_config(c.noise_scheduler.config, set_alpha_to_one=False)
    ids = c.tokenizer(["a red circle", "a blue square on the left", ""], padding="max_length",
                      max_length=c.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        emb = c.text_encoder(ids)[0]
    return c, sched, emb[:2], emb[2:]


def test_first_step_equals_the_signal_at_x_T():
    c, sched, prompts, uncond = _setup()
    mags = trajectory_magnitudes(c.unet, sched, prompts, uncond, (4, 8, 8), num_generations=3, num_steps=2,
                                 num_inference_steps=10, batch_size=4)
    assert mags.shape == (2, 3, 2) and (mags > 0).all()
    sched.set_timesteps(10)
    t0 = sched.timesteps[0]
    for i in range(2):
        for j in range(3):
            x = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(generation_seed(0, i, j)))[None]
            direct = text_noise_magnitude(c.unet, x * sched.init_noise_sigma, torch.tensor([int(t0)]), uncond,
                                          cond=prompts[i:i + 1])
            torch.testing.assert_close(mags[i, j, 0], direct[0], rtol=1e-4, atol=1e-5)
    # the second step follows the guided trajectory: it differs from the first
    assert not torch.allclose(mags[..., 0], mags[..., 1])
    assert torch.allclose(detection_scores(mags), mags.mean(dim=(1, 2)))


def test_batching_does_not_change_the_scores():
    c, sched, prompts, uncond = _setup("v_prediction")
    a = trajectory_magnitudes(c.unet, sched, prompts, uncond, (4, 8, 8), num_generations=2, num_steps=2,
                              num_inference_steps=5, batch_size=1)
    b = trajectory_magnitudes(c.unet, sched, prompts, uncond, (4, 8, 8), num_generations=2, num_steps=2,
                              num_inference_steps=5, batch_size=4)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_schedule_is_set_before_the_initial_noise_is_scaled():
    """Euler's init_noise_sigma is the first sigma of the schedule that set_timesteps builds: a scheduler fresh
    from its config (1000-step sigmas) and one already set for these steps must give the same scores."""
    from diffusers import EulerDiscreteScheduler

    c, _, prompts, uncond = _setup()
    make = lambda: EulerDiscreteScheduler.from_config(c.noise_scheduler.config, timestep_spacing="leading")  # noqa: E731
    fresh, already_set = make(), make()
    already_set.set_timesteps(10)
    assert fresh.init_noise_sigma != already_set.init_noise_sigma          # the case that matters
    kw = dict(num_generations=2, num_steps=2, num_inference_steps=10, batch_size=4)
    a = trajectory_magnitudes(c.unet, fresh, prompts, uncond, (4, 8, 8), **kw)
    b = trajectory_magnitudes(c.unet, already_set, prompts, uncond, (4, 8, 8), **kw)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="num_steps=11"):
        trajectory_magnitudes(c.unet, fresh, prompts, uncond, (4, 8, 8), num_steps=11, num_inference_steps=10)


# -- the later detectors, each against its definition computed directly ---------------------------------------
def _ends(c, prompts):
    ids = c.tokenizer(prompts, padding="max_length", max_length=c.tokenizer.model_max_length,
                      return_tensors="pt").input_ids
    return (ids == c.tokenizer.eos_token_id).int().argmax(1)              # the first end token of each prompt


def _delta_score(unet, x, t, cond, uncond, sigma):
    """Ds = -(eps(x, e_p) - eps(x, e_0)) / sigma_t by two plain calls."""
    return -(unet(x, t, encoder_hidden_states=cond).sample - unet(x, t, encoder_hidden_states=uncond).sample) / sigma


def test_sharpness_is_the_jacobian_of_the_score_difference_applied_to_it():
    from memfilter.filtering.detection import trajectory_scores

    c, sched, prompts, uncond = _setup()
    unet, prompts, uncond = c.unet.double(), prompts.double(), uncond.double()
    got = trajectory_scores(unet, sched, prompts, uncond, (4, 8, 8), detectors=("sharpness", "magnitude"),
                            num_generations=2, num_steps=2, num_inference_steps=10, batch_size=3)
    sched.set_timesteps(10)
    for i in range(2):
        for j in range(2):
            x = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(generation_seed(0, i, j)))[None].double()
            x = x * sched.init_noise_sigma
            for k, t in enumerate(sched.timesteps[:2]):
                sigma = float((1 - sched.alphas_cumprod[int(t)]).sqrt())
                with torch.no_grad():
                    ds = _delta_score(unet, x, t, prompts[i:i + 1], uncond, sigma)
                    h = 1e-4 / float(ds.norm())                            # central difference along Ds
                    jv = (_delta_score(unet, x + h * ds, t, prompts[i:i + 1], uncond, sigma)
                          - _delta_score(unet, x - h * ds, t, prompts[i:i + 1], uncond, sigma)) / (2 * h)
                    assert got["sharpness"][i, j, k].item() == pytest.approx(float(jv.norm()), rel=1e-3)
                    assert got["magnitude"][i, j, k].item() == pytest.approx(float(ds.norm()) * sigma, rel=1e-5)
                    guided = unet(x, t, encoder_hidden_states=uncond).sample * (1 - 7.5) \
                        + 7.5 * unet(x, t, encoder_hidden_states=prompts[i:i + 1]).sample
                    x = sched.step(guided, t, x).prev_sample                # the trajectory's next x_t


def _attention_maps_by_hand(unet, ends, rows):
    """Forward hooks on every cross-attention's to_q / to_k: softmax(q k^T / sqrt(d)) per head, by einsum."""
    from diffusers.models.attention_processor import Attention

    seen, handles = [], []
    for mod in unet.modules():
        if isinstance(mod, Attention) and mod.is_cross_attention:
            store = {}
            handles.append(mod.to_q.register_forward_hook(lambda m, a, o, s=store: s.__setitem__("q", o)))
            handles.append(mod.to_k.register_forward_hook(lambda m, a, o, s=store: s.__setitem__("k", o)))
            seen.append((mod, store))

    def maps():
        out = []
        for mod, s in seen:
            q, k = s["q"][:rows], s["k"][:rows]                            # [rows, Q, H*d], [rows, L, H*d]
            q = q.reshape(rows, q.shape[1], mod.heads, -1)
            k = k.reshape(rows, k.shape[1], mod.heads, -1)
            att = torch.einsum("bqhd,blhd->bhql", q, k) / q.shape[-1] ** 0.5
            att = att.softmax(-1).mean(1)                                  # [rows, Q, L]
            out.append(att[torch.arange(rows), :, ends])
        return out
    return maps, handles


def test_bright_ending_masks_the_first_steps_by_the_last_steps_end_token_attention():
    import torch.nn.functional as F

    from memfilter.filtering.detection import trajectory_scores

    c, sched, prompts, uncond = _setup()
    ends = _ends(c, ["a red circle", "a blue square on the left"])
    steps = 4
    got = trajectory_scores(c.unet, sched, prompts, uncond, (4, 8, 8), detectors=("bright_ending", "magnitude"),
                            end_positions=ends, num_generations=1, num_steps=2, num_inference_steps=steps)
    before = dict(c.unet.attn_processors)
    sched.set_timesteps(steps)
    for i in range(2):
        x = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(generation_seed(0, i, 0)))[None]
        diffs = []
        with torch.no_grad():
            for k, t in enumerate(sched.timesteps):
                if k == steps - 1:
                    maps, handles = _attention_maps_by_hand(c.unet, ends[i:i + 1], 1)
                pc = c.unet(x, t, encoder_hidden_states=prompts[i:i + 1]).sample
                if k == steps - 1:
                    mine = maps()
                    for hd in handles:
                        hd.remove()
                pu = c.unet(x, t, encoder_hidden_states=uncond).sample
                diffs.append(pc - pu)
                x = sched.step(pu + 7.5 * (pc - pu), t, x).prev_sample
        ups = [F.interpolate(m.reshape(1, 1, int(m.shape[1] ** 0.5), -1), size=(8, 8), mode="bilinear")[0, 0]
               for m in mine]
        mask = torch.stack(ups).mean(0)                                    # [8, 8]
        for k in range(2):
            want = (diffs[k] * mask).norm() / mask.mean()
            assert got["bright_ending"][i, 0, k].item() == pytest.approx(float(want), rel=1e-4)
        assert not torch.allclose(mask, mask.mean().expand_as(mask))       # a real map, not a constant
    assert {k: type(v) for k, v in c.unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}


def test_the_grid_is_nested_passes_and_every_detector_runs_on_sdxl():
    from memfilter.evaluation.detect import run_detectors
    from memfilter.filtering.detection import grid_scores, trajectory_scores
    from memfilter.train.families import build_tiny_sdxl, get_family

    c, sched, prompts, uncond = _setup()
    kw = dict(detectors=("magnitude", "sharpness"), num_inference_steps=5)
    big = trajectory_scores(c.unet, sched, prompts, uncond, (4, 8, 8), num_generations=3, num_steps=2, **kw)
    small = trajectory_scores(c.unet, sched, prompts, uncond, (4, 8, 8), num_generations=2, num_steps=1, **kw)
    for d in kw["detectors"]:
        cells = grid_scores(big[d], [1, 2], [1, 2, 3])
        assert set(cells) == {(k, n) for k in (1, 2) for n in (1, 2, 3)}
        torch.testing.assert_close(cells[(1, 2)], small[d].mean(dim=(1, 2)), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(cells[(2, 3)], big[d].mean(dim=(1, 2)))
    with pytest.raises(ValueError, match="outside"):
        grid_scores(big["magnitude"], [3], [1])
    with pytest.raises(ValueError, match="end_positions"):
        trajectory_scores(c.unet, sched, prompts, uncond, (4, 8, 8), detectors=("bright_ending",))
    with pytest.raises(ValueError, match="detectors"):
        trajectory_scores(c.unet, sched, prompts, uncond, (4, 8, 8), detectors=("entropy",))
    xl = build_tiny_sdxl(resolution=16, block_out_channels=(32, 32), vae_channels=(32, 32))
    out = run_detectors(get_family(xl).pipeline(), ["a red circle", "a dog"], detectors=list(DETECTORS),
                        num_generations=1, num_steps=1, num_inference_steps=3)
    assert set(out.per_step) == set(DETECTORS)
    for d in DETECTORS:
        assert out.per_step[d].shape == (2, 1, 1) and torch.isfinite(out.per_step[d]).all()
        assert (out.per_step[d] > 0).all()
    assert len(out.timesteps) == 1 and out.timesteps[0] > 500          # the schedule's first step: t near T
