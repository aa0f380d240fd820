"""The memorization signal m = ||eps(x_t, t, e_p) - eps(x_t, t, e_0)||_2 on a real (tiny) diffusers UNet."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from memfilter.filtering.signal import magnitude_from_predictions, text_noise_magnitude
from memfilter.train.models import SD_SCHEDULER

B, C, H, W = 4, 4, 8, 8   # latents of a 16 px image through a 2x VAE
L, D = 7, 32              # prompt length, cross-attention width


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny ops: one intra-op thread is faster


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    # the same wiring as train.families.sd.build_tiny, UNet only (the signal needs nothing else)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = UNet2DConditionModel(
            sample_size=H, in_channels=C, out_channels=C, layers_per_block=1, block_out_channels=(32, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=D, attention_head_dim=8, norm_num_groups=32)
    return net.eval()


@pytest.fixture(scope="module")
def scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SD_SCHEDULER)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(B, C, H, W, generator=g)
    t = torch.tensor([0, 250, 600, 999])
    cond = torch.randn(B, L, D, generator=g)
    uncond = torch.randn(1, L, D, generator=g)
    return x_t, t, cond, uncond


def _direct(unet, x_t, t, cond, uncond_full):
    """The definition, written out: two UNet calls, L2 norm over every latent element, float32."""
    with torch.no_grad():
        pc = unet(x_t, t, encoder_hidden_states=cond).sample
        pu = unet(x_t, t, encoder_hidden_states=uncond_full).sample
    return torch.stack([torch.linalg.vector_norm((pc[i] - pu[i]).float()) for i in range(x_t.shape[0])]), pc, pu


def test_matches_two_explicit_unet_calls_with_cond(unet, batch):
    x_t, t, cond, uncond = batch
    expected, _, _ = _direct(unet, x_t, t, cond, uncond.expand(B, L, D))
    assert (expected > 0).all()                      # the text really changes the prediction
    m = text_noise_magnitude(unet, x_t, t, uncond, cond=cond)
    assert m.shape == (B,) and m.dtype == torch.float32
    assert not m.requires_grad
    torch.testing.assert_close(m, expected, rtol=1e-5, atol=1e-6)


def test_matches_with_cond_pred_from_a_training_forward(unet, batch):
    x_t, t, cond, uncond = batch
    expected, _, _ = _direct(unet, x_t, t, cond, uncond.expand(B, L, D))
    cond_pred = unet(x_t, t, encoder_hidden_states=cond).sample    # with grad, as in the training step
    assert cond_pred.requires_grad
    m = text_noise_magnitude(unet, x_t, t, uncond, cond_pred=cond_pred)
    assert m.shape == (B,) and m.dtype == torch.float32 and not m.requires_grad
    torch.testing.assert_close(m, expected, rtol=1e-5, atol=1e-6)
    # cond_pred wins over cond: garbage embeddings are ignored when the prediction is given
    m2 = text_noise_magnitude(unet, x_t, t, uncond, cond_pred=cond_pred, cond=cond * 100)
    torch.testing.assert_close(m2, expected, rtol=1e-5, atol=1e-6)


def test_uncond_broadcast_equals_per_sample_uncond(unet, batch):
    x_t, t, cond, uncond = batch
    m_broadcast = text_noise_magnitude(unet, x_t, t, uncond, cond=cond)
    m_full = text_noise_magnitude(unet, x_t, t, uncond.repeat(B, 1, 1), cond=cond)
    torch.testing.assert_close(m_broadcast, m_full, rtol=1e-5, atol=1e-6)
    # each sample alone gives its own entry of the batch result (no mixing across the batch)
    for i in range(B):
        mi = text_noise_magnitude(unet, x_t[i:i + 1], t[i:i + 1], uncond, cond=cond[i:i + 1])
        torch.testing.assert_close(mi, m_broadcast[i:i + 1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_unet_output_as_v_or_x0_gives_the_noise_prediction_magnitude(unet, scheduler, batch, prediction_type):
    """Treat the real UNet's output as a v (or x0) prediction; m must be the norm of the implied eps difference."""
    x_t, t, cond, uncond = batch
    _, pc, pu = _direct(unet, x_t, t, cond, uncond.expand(B, L, D))
    abar = scheduler.alphas_cumprod[t].double().view(B, 1, 1, 1)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    if prediction_type == "v_prediction":
        to_eps = lambda out: a * out.double() + s * x_t.double()          # noqa: E731
    else:
        to_eps = lambda out: (x_t.double() - a * out.double()) / s        # noqa: E731
    expected = torch.linalg.vector_norm((to_eps(pc) - to_eps(pu)).flatten(1), dim=1).float()
    m = text_noise_magnitude(unet, x_t, t, uncond, cond=cond, prediction_type=prediction_type,
                             alphas_cumprod=scheduler.alphas_cumprod)
    assert m.dtype == torch.float32 and m.shape == (B,)
    torch.testing.assert_close(m, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_known_x0_and_noise_converted_predictions_give_epsilon_magnitude(scheduler, prediction_type):
    """From a known x0 and noise: eps-, v- and x0-predictions of the same model give the same m."""
    g = torch.Generator().manual_seed(2)
    n = 6
    x0 = torch.randn(n, C, H, W, generator=g, dtype=torch.float64)
    noise = torch.randn(n, C, H, W, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 100, 500, 900, 999])
    ac = scheduler.alphas_cumprod.double()
    x_t = scheduler.add_noise(x0, noise, t)
    abar = ac[t].view(n, 1, 1, 1)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    # the scheduler's own v target, and the conversion back to eps the paper's signal needs
    v = scheduler.get_velocity(x0, noise, t)
    torch.testing.assert_close(a * v + s * x_t, noise)
    # two noise predictions (cond / uncond) that err differently around the true noise
    eps_c = noise + 0.3 * torch.randn(n, C, H, W, generator=g, dtype=torch.float64)
    eps_u = noise + 0.1 * torch.randn(n, C, H, W, generator=g, dtype=torch.float64)
    x0_c, x0_u = (x_t - s * eps_c) / a, (x_t - s * eps_u) / a          # their implied x0
    if prediction_type == "v_prediction":
        pred_c, pred_u = a * eps_c - s * x0_c, a * eps_u - s * x0_u     # = get_velocity(x0_hat, eps_hat)
        torch.testing.assert_close(a * pred_c + s * x_t, eps_c)
    else:
        pred_c, pred_u = x0_c, x0_u
    expected = torch.linalg.vector_norm((eps_c - eps_u).flatten(1), dim=1).float()
    m_eps = magnitude_from_predictions(eps_c.float(), eps_u.float())
    torch.testing.assert_close(m_eps, expected, rtol=1e-5, atol=1e-6)
    m = magnitude_from_predictions(pred_c.float(), pred_u.float(), prediction_type=prediction_type,
                                   alphas_cumprod=scheduler.alphas_cumprod, timesteps=t)
    assert m.dtype == torch.float32
    torch.testing.assert_close(m, expected, rtol=1e-3, atol=1e-5)
    # the raw difference of v / x0 predictions is NOT the signal (the conversion matters)
    raw = magnitude_from_predictions(pred_c.float(), pred_u.float())
    assert not torch.allclose(raw, expected, rtol=1e-2)


def test_bf16_autocast_returns_float32_close_to_fp32(unet, batch):
    x_t, t, cond, uncond = batch
    m32 = text_noise_magnitude(unet, x_t, t, uncond, cond=cond)
    m16 = text_noise_magnitude(unet, x_t, t, uncond, cond=cond,
                               autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    assert m16.dtype == torch.float32 and m16.shape == (B,)
    assert torch.isfinite(m16).all()
    torch.testing.assert_close(m16, m32, rtol=0.1, atol=1e-3)
    # autocast really ran: the UNet computed in bf16, so the numbers are not bit-identical
    assert not torch.equal(m16, m32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert unet(x_t, t, encoder_hidden_states=cond).sample.dtype == torch.bfloat16


def test_errors(unet, batch, scheduler):
    x_t, t, cond, uncond = batch
    with pytest.raises(ValueError, match="alphas_cumprod"):
        text_noise_magnitude(unet, x_t, t, uncond, cond=cond, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="alphas_cumprod"):
        text_noise_magnitude(unet, x_t, t, uncond, cond=cond, prediction_type="sample")
    with pytest.raises(ValueError, match="needs cond_pred or cond$"):
        text_noise_magnitude(unet, x_t, t, uncond)
    with pytest.raises(ValueError, match="prediction_type"):
        text_noise_magnitude(unet, x_t, t, uncond, cond=cond, prediction_type="flow",
                             alphas_cumprod=scheduler.alphas_cumprod)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        x = torch.randn(B, C, H, W)
        magnitude_from_predictions(x, x + 1, prediction_type="v_prediction",
                                   alphas_cumprod=scheduler.alphas_cumprod)   # timesteps missing


def test_training_step_gives_the_caption_policy_each_samples_group(unet, scheduler):
    """The step gathers 48-bit caption ids exactly (float32 halves) and the policy decides per caption."""
    import copy as _copy

    from memfilter.filtering.policies import CaptionHistory, caption_group
    from memfilter.train.step import filtered_diffusion_step

    g = torch.Generator().manual_seed(3)
    latents, embeds = torch.randn(8, C, H, W, generator=g), torch.randn(8, 6, D, generator=g)
    uncond = torch.zeros(1, 6, D)
    groups = torch.tensor([caption_group(c) for c in ["a red circle", "a blue square"] * 4])
    policy = CaptionHistory(threshold=1.01, baseline=1, decay=1.0, num_buckets=1, warmup=1, window=64,
                            min_timestep=0)
    seen = []
    for step in range(4):
        mirror = _copy.deepcopy(policy)
        out = filtered_diffusion_step(unet, scheduler, latents, embeds, uncond, policy,
                                      torch.Generator().manual_seed(10 + step), groups=groups)
        seen.append(out.keep)
        expected = mirror.decide(out.magnitudes, out.timesteps, groups=groups)
        assert torch.equal(out.keep, expected)
    assert set(policy.state_dict()["group_ids"].tolist()) == set(groups.tolist())
    assert not torch.stack(seen).all()                                # the policy did drop something


def test_step_stats_travel_by_name_through_one_gather_with_exact_48_bit_ids():
    """Two ranks' rows in one float32 collective (torch.cat stands for accelerate's all-gather, which
    concatenates in rank order): every field back by name, ids exact to 2**48 - 1, padding rows invalid."""
    from memfilter.train.step import StepStats

    def rank_stats(r: int, b: int) -> StepStats:
        return StepStats(magnitude=torch.tensor([float("nan")] + [1.5 + r] * (b - 1)),
                         timestep=torch.arange(b) + 100 * r, eligible=torch.arange(b) % 2 == 0,
                         duplicate=torch.full((b,), r == 1), loss=torch.full((b,), 0.25 * (r + 1)),
                         valid=torch.ones(b, dtype=torch.bool),
                         groups=torch.tensor([[2 ** 48 - 1 - i - r, 7 + i] for i in range(b)]),
                         base_loss=torch.full((b,), 0.5 * (r + 1)), base_magnitude=torch.full((b,), 3.0 + r))

    parts = [rank_stats(0, 3), rank_stats(1, 2)]              # rank 1 lost a sample to bad input
    sent = []                                                   # what each rank puts into the collective
    for p in parts:
        p.gather(lambda x: sent.append(x) or x, width=3)
    g = parts[0].gather(lambda x: torch.cat(sent), width=3)      # what every rank gets back
    assert g.valid.tolist() == [True, True, True, True, True, False]
    assert torch.isnan(g.magnitude[[0, 3]]).all() and g.magnitude[5] == 0.0     # padding: NaN-free
    real = g.select(g.valid)
    for name in ("timestep", "eligible", "duplicate", "loss", "groups", "base_loss", "base_magnitude"):
        want = torch.cat([getattr(p, name) for p in parts])
        assert torch.equal(getattr(real, name), want.to(getattr(real, name).dtype)), name
    assert real.groups.max() == 2 ** 48 - 1 and real.groups.dtype == torch.long


def _step_case():
    """A tiny UNet and one micro-batch of 8 (6 judged, 2 not) for the step's tests: (net, latents, prompt
    embeddings, empty-prompt embedding, eligible)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        net = UNet2DConditionModel(
            sample_size=H, in_channels=C, out_channels=C, layers_per_block=1, block_out_channels=(32, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=D, attention_head_dim=8, norm_num_groups=32)
    g = torch.Generator().manual_seed(7)
    latents, embeds = torch.randn(8, C, H, W, generator=g), torch.randn(8, L, D, generator=g)
    return net, latents, embeds, torch.zeros(1, L, D), torch.tensor([True] * 6 + [False] * 2)


def test_anchored_rows_train_toward_the_reference_and_protected_rows_never_do(scheduler):
    """dropped_samples=anchor, by definition: the loss is the kept rows' MSE to the target plus, for each row the
    policy drops, the MSE to the reference's prediction at the same x_t, t and caption; a row the policy may not
    judge (protected, caption dropped) is never anchored; the global count is the dropped judged rows."""
    import copy as _copy

    import torch.nn.functional as F

    from memfilter.filtering.policies import BatchQuantile
    from memfilter.train.step import filtered_diffusion_step

    net, latents, embeds, uncond, eligible = _step_case()
    ref_net = _copy.deepcopy(net)
    with torch.no_grad():                       # a reference that differs from the trained model
        for p in ref_net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    seen = {}

    def reference(x_t, t, cond):
        seen["rows"] = x_t.shape[0]
        return ref_net(x_t, t, **cond).sample

    def run(ref):
        return filtered_diffusion_step(net, scheduler, latents, embeds, uncond, BatchQuantile(drop_fraction=0.5),
                                       torch.Generator().manual_seed(11), eligible=eligible, reference=ref,
                                       anchor_weight=0.5)
    plain, out = run(None), run(reference)
    assert torch.equal(plain.keep, out.keep) and plain.anchored_global == 0
    dropped = eligible & ~out.keep
    assert out.anchored_global == int(dropped.sum()) == seen["rows"] > 0
    assert out.keep[~eligible].all()                                      # never judged: kept, never anchored
    # the definition written out, from the same noise and timesteps
    gen = torch.Generator().manual_seed(11)
    from memfilter.train.noise import NoiseArgs, training_inputs
    drawn = training_inputs(net, scheduler, latents, gen, NoiseArgs(), {"encoder_hidden_states": embeds}, None)
    with torch.no_grad():
        pred = net(drawn.noisy, drawn.timesteps, encoder_hidden_states=embeds).sample
        ref = ref_net(drawn.noisy, drawn.timesteps, encoder_hidden_states=embeds).sample
    kept_loss = F.mse_loss(pred, drawn.target, reduction="none").mean(dim=(1, 2, 3))[out.keep].sum()
    anchor_loss = F.mse_loss(pred, ref, reduction="none").mean(dim=(1, 2, 3))[dropped].sum()
    torch.testing.assert_close(out.loss_sum.detach(), kept_loss + 0.5 * anchor_loss)
    torch.testing.assert_close(plain.loss_sum.detach(), kept_loss)


def test_base_null_measures_the_base_at_the_training_inputs_and_its_prediction_is_the_anchor(scheduler):
    """filter.null=base: the step hands the policy the base model's loss and magnitude at each judged sample's own
    x_t and t. At the start of fine-tuning (base == model) they equal the model's own, exactly; for a base that
    differs they are its loss and magnitude written out; the anchored loss reuses the base's prediction."""
    import copy as _copy

    import torch.nn.functional as F

    from memfilter.filtering.policies import ItemEvidence
    from memfilter.filtering.signal import text_noise_magnitude
    from memfilter.train.noise import NoiseArgs, training_inputs
    from memfilter.train.step import filtered_diffusion_step

    net, latents, embeds, uncond, eligible = _step_case()

    def run(base_net, policy, base_rows=None):
        calls = []

        def reference(x_t, t, cond):
            calls.append(x_t.shape[0])
            return base_net(x_t, t, **cond).sample
        out = filtered_diffusion_step(net, scheduler, latents, embeds, uncond, policy, torch.Generator().manual_seed(11),
                                      eligible=eligible, reference=reference, groups=torch.arange(1, 9),
                                      base_rows=base_rows)
        return out, calls

    same, calls = run(_copy.deepcopy(net), ItemEvidence(num_buckets=1, warmup=1))
    assert calls == [6, 6]                                # prompt and empty prompt, judged rows only; no anchor call
    judged = same.stats.eligible
    torch.testing.assert_close(same.stats.base_loss[judged], same.stats.loss[judged])
    torch.testing.assert_close(same.stats.base_magnitude[judged], same.stats.magnitude[judged])
    assert torch.isnan(same.stats.base_loss[~judged]).all()
    some, calls = run(_copy.deepcopy(net), ItemEvidence(num_buckets=1, warmup=1),
                      base_rows=torch.tensor([True, False] * 4))              # policy.base_rows: judged rows 0, 2, 4
    assert calls == [3, 3] and torch.isfinite(some.stats.base_loss).tolist() == [True, False] * 3 + [False] * 2

    other = _copy.deepcopy(net)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    drawn = training_inputs(net, scheduler, latents, torch.Generator().manual_seed(11), NoiseArgs(),
                            {"encoder_hidden_states": embeds}, None)
    with torch.no_grad():
        base_pred = other(drawn.noisy, drawn.timesteps, encoder_hidden_states=embeds).sample
        base_m = text_noise_magnitude(other, drawn.noisy, drawn.timesteps, uncond, cond_pred=base_pred)
    out, _ = run(other, ItemEvidence(num_buckets=1, warmup=1))
    base_loss = F.mse_loss(base_pred, drawn.target, reduction="none").mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.stats.base_loss[:6], base_loss[:6])
    torch.testing.assert_close(out.stats.base_magnitude[:6], base_m[:6])
    with pytest.raises(ValueError, match="null=base"):
        filtered_diffusion_step(net, scheduler, latents, embeds, uncond, ItemEvidence(), torch.Generator(),
                                groups=torch.arange(1, 9))
