"""Detection scores along the real CFG trajectory (filtering/detection.py)."""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from memfilter.filtering.detection import _seed, detection_scores, trajectory_magnitudes
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
            x = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(_seed(0, i, j)))[None]
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
    import pytest
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
