"""Quality metrics on stand-in weights: a scripted 64-d "Inception" and a tiny CLIP saved like real checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from memfilter.evaluation.quality import (clip_score, fid_kid, frechet_distance, inception_inputs, load_inception,
                                quality_metrics)

DIM = 64


class StandInInception(torch.nn.Module):
    """Like the StyleGAN TorchScript: [N,3,H,W] in [0,255] -> logits, or pool features with return_features."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 8 * 8, DIM)
        self.head = torch.nn.Linear(DIM, 10)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = (x.float() - 128.0) / 128.0
        f = torch.tanh(self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)))   # [N, 64]
        return f if return_features else self.head(f)                                        # [N, 10]


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny ops: one intra-op thread is faster


@pytest.fixture(scope="module")
def inception_path(tmp_path_factory):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = StandInInception()
        with torch.no_grad():
            net.proj.weight.mul_(8.0)                      # spread the features over tanh's range
    path = tmp_path_factory.mktemp("inception") / "inception.pt"
    torch.jit.script(net.eval()).save(str(path))
    return path


def _images(n: int, seed: int, shift: int = 0, size: int = 24) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, (n, size, size, 3))
    return [Image.fromarray(np.clip(a + shift, 0, 255).astype(np.uint8)) for a in base]


def _direct_features(path, images) -> np.ndarray:
    """The test's own preprocessing: PIL bicubic to 299, float [0, 255], then the network's pool features."""
    net = torch.jit.load(str(path))
    x = np.stack([np.asarray(im.convert("RGB").resize((299, 299), Image.BICUBIC)) for im in images])
    with torch.no_grad():
        return net(torch.from_numpy(x).permute(0, 3, 1, 2).float(), return_features=True).double().numpy()


def _stats(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return f.mean(0), np.cov(f, rowvar=False)


def test_frechet_distance_closed_form():
    # diagonal covariances: FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    rng = np.random.default_rng(0)
    mu1, mu2, a, b = rng.normal(size=5), rng.normal(size=5), rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # a rotated pair too (sqrtm of a non-diagonal product)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    # singular covariances (rank 2 of 5) still give a finite number, 0 against itself
    low = rng.normal(size=(5, 2))
    assert abs(frechet_distance(mu1, low @ low.T, mu1, low @ low.T)) < 1e-4


def test_fid_matches_direct_computation(inception_path):
    gen, ref = _images(72, seed=1), _images(72, seed=2, shift=30)
    net = load_inception(inception_path)
    r = fid_kid(gen, ref, net, batch_size=40, kid_subset_size=20)
    assert r["feature_dim"] == DIM                       # return_features=True was used (logits are 10-d)
    assert (r["n_generated"], r["n_reference"]) == (72, 72)
    expected = frechet_distance(*_stats(_direct_features(inception_path, gen)),
                                *_stats(_direct_features(inception_path, ref)))
    assert expected > 1.0
    assert r["fid"] == pytest.approx(expected, rel=1e-3)
    assert "note" not in r                               # more images than feature dimensions


def test_fid_self_is_zero_and_grows_with_shift(inception_path):
    net = load_inception(inception_path)
    ref = _images(70, seed=3)
    same = fid_kid(ref, ref, net, kid_subset_size=10, kid_subsets=20)          # 70 > 64 dims: full-rank covariance
    small = fid_kid(_images(70, seed=3, shift=15), ref, net, kid_subset_size=10, kid_subsets=20)
    large = fid_kid(_images(70, seed=3, shift=50), ref, net, kid_subset_size=10, kid_subsets=20)
    assert abs(same["fid"]) < 1e-6 * small["fid"] + 1e-8
    assert 0 < small["fid"] < large["fid"]
    assert abs(same["kid_mean"]) < small["kid_mean"] < large["kid_mean"]
    assert same["kid_subset_size"] == 10 and np.isfinite(large["kid_std"]) and large["kid_std"] >= 0


def test_small_sets_and_bad_arguments(inception_path):
    net = load_inception(inception_path)
    r = fid_kid(_images(12, seed=4), _images(10, seed=5), net, kid_subset_size=5, kid_subsets=5)
    assert np.isfinite(r["fid"]) and "note" in r         # 10 <= 64 dims: flagged as biased
    # KID subsets are seeded: the same call gives the same number, and the global RNG is left as it was
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    again = fid_kid(_images(12, seed=4), _images(10, seed=5), net, kid_subset_size=5, kid_subsets=5)
    assert again["kid_mean"] == r["kid_mean"] and again["kid_std"] == r["kid_std"] and torch.rand(1) == before
    with pytest.raises(ValueError, match="kid_subset_size"):
        fid_kid(_images(12, seed=4), _images(10, seed=5), net, kid_subset_size=11)
    with pytest.raises(ValueError, match="at least 2"):
        fid_kid(_images(1, seed=4), _images(10, seed=5), net)


def test_input_ranges():
    im = [Image.fromarray(np.array([[[0, 255, 51]]], dtype=np.uint8))]
    assert inception_inputs(im, None, "0-255")[0, :, 0, 0].tolist() == [0.0, 255.0, 51.0]
    assert torch.allclose(inception_inputs(im, None, "0-1")[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.2]))
    assert torch.allclose(inception_inputs(im, None, "-1-1")[0, :, 0, 0], torch.tensor([-1.0, 1.0, -0.6]))
    assert inception_inputs(im, 299).shape == (1, 3, 299, 299)
    with pytest.raises(ValueError, match="input_range"):
        inception_inputs(im, 299, "0-2")


def test_missing_or_wrong_weights_name_the_config_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluation.inception_path"):
        load_inception(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="evaluation.inception_path"):
        load_inception(None)
    torch.save({"w": torch.zeros(2)}, tmp_path / "state_dict.pth")     # a state dict is not TorchScript
    with pytest.raises(ValueError, match="evaluation.inception_path.*TorchScript"):
        load_inception(tmp_path / "state_dict.pth")
    with pytest.raises(FileNotFoundError, match="evaluation.clip_path"):
        clip_score(_images(1, seed=0), ["a"], tmp_path / "no_clip")


def test_quality_metrics_without_weights_skips_with_reasons():
    q = quality_metrics(_images(4, seed=0), _images(4, seed=1), ["a red circle"] * 4)
    assert set(q) == {"fid", "kid", "clip_score"}
    for name, field in (("fid", "evaluation.inception_path"), ("kid", "evaluation.inception_path"),
                        ("clip_score", "evaluation.clip_path")):
        assert list(q[name]) == ["skipped"] and field in q[name]["skipped"]


# ----------------------------------------------------------------------------------------------- CLIP
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor
    from memfilter.train.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(cfg).eval()
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    ip = ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(path)
    return path


def _direct_clip(path, images, prompts) -> np.ndarray:
    """Per-pair CLIP score through the model's own forward (normalised image_embeds / text_embeds)."""
    from transformers import CLIPModel, CLIPProcessor
    model, proc = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    inputs = proc(text=prompts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    return (100 * (out.image_embeds * out.text_embeds).sum(-1).clamp(min=0)).double().numpy()


def test_clip_score_matches_direct_computation(clip_dir):
    images = _images(5, seed=7, size=40)
    prompts = ["a red circle", "a blue square on the left", "small green star", "striped background",
               "a photo of something unknown"]
    r = clip_score(images, prompts, clip_dir, batch_size=2)       # batches of 2, 2, 1
    expected = _direct_clip(clip_dir, images, prompts)
    assert r["n"] == 5 and r["model"] == str(clip_dir)
    assert 0 <= r["mean"] <= 100
    assert r["mean"] == pytest.approx(expected.mean(), abs=1e-4)
    assert r["std"] == pytest.approx(expected.std(), abs=1e-4)
    with pytest.raises(ValueError, match="prompts"):
        clip_score(images, prompts[:2], clip_dir)


def test_quality_metrics_with_weights(inception_path, clip_dir):
    gen, ref = _images(24, seed=8), _images(24, seed=9, shift=20)
    prompts = ["a red circle"] * len(gen)
    q = quality_metrics(gen, ref, prompts, inception_path=inception_path, clip_path=clip_dir, kid_subset_size=10)
    direct = fid_kid(gen, ref, load_inception(inception_path), kid_subset_size=10)
    assert q["fid"]["fid"] == pytest.approx(direct["fid"]) and q["fid"]["weights"] == str(inception_path)
    assert q["kid"]["kid_mean"] == pytest.approx(direct["kid_mean"]) and q["kid"]["subset_size"] == 10
    assert q["fid"]["input_range"] == "0-255" and q["fid"]["resize_to"] == 299
    assert 0 <= q["clip_score"]["mean"] <= 100 and q["clip_score"]["n"] == 24
    # too few reference images: skipped with the reason, not a number
    q = quality_metrics(gen, ref[:1], prompts, inception_path=inception_path)
    assert "skipped" in q["fid"] and "evaluation.quality_reference" in q["fid"]["skipped"]
