"""Image quality, the other axis of the replication-vs-quality trade-off: FID/KID and CLIP score.

Why it looks like this:
- Weights come only from paths the user names (no hub download, no pickle): the FID Inception-v3 as
  TorchScript (`evaluation.inception_path`), CLIP as a local transformers checkpoint (`evaluation.clip_path`).
  A metric whose weights are not configured is reported as `{"skipped": reason}`, never as a number.
- Inception runs once per image. Its features feed torchmetrics' FrechetInceptionDistance and
  KernelInceptionDistance through a pass-through extractor (both accept any nn.Module as `feature`),
  so FID and KID see identical features and the statistics are torchmetrics' (float64 sums; the
  trace of sqrt(sigma1 sigma2) from eigenvalues, which tolerates the singular covariances of small sets).
- Preprocessing is explicit, because FID numbers are only comparable under one convention: PIL bicubic
  resize to `resize_to` (clean-fid's "clean" resize; 299), then the value range the network expects.
  The StyleGAN2-ADA/StyleGAN3/clean-fid TorchScript `inception-2015-12-05.pt` takes float [0, 255]
  ("0-255", the default), normalises and resizes internally, and gives its 2048-d pool3 features when
  called with `return_features=True` (done automatically when its forward has that argument).
- CLIP score is computed here, with torchmetrics' definition 100 * max(cos(E_image, E_text), 0):
  torchmetrics 1.9's CLIPScore accepts only a fixed list of hub names (a local directory is refused),
  and with transformers 5 `get_image_features` returns a model output instead of a tensor.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

INPUT_RANGES = ("0-255", "0-1", "-1-1")
_INCEPTION_HINT = ("set evaluation.inception_path to the FID Inception-v3 TorchScript "
                   "(inception-2015-12-05.pt, as StyleGAN2-ADA/StyleGAN3 and clean-fid use)")
_CLIP_HINT = "set evaluation.clip_path to a local CLIP checkpoint directory (CLIPModel.save_pretrained + its processor)"


# ----------------------------------------------------------------------------------------------- FID / KID
class InceptionFeatures(torch.nn.Module):
    """A TorchScript feature network as [N, 3, H, W] float -> [N, D] features.

    Args:
        net: the loaded TorchScript module (or any nn.Module mapping images to features).
        return_features: call `net(x, return_features=True)` (the StyleGAN Inception's pool3 switch).
            Default None: True when the network's forward has that argument.
    """

    def __init__(self, net: torch.nn.Module, return_features: bool | None = None):
        super().__init__()
        self.net = net
        if return_features is None:
            schema = getattr(getattr(net, "forward", None), "schema", None)
            return_features = schema is not None and any(a.name == "return_features" for a in schema.arguments)
        self.return_features = return_features

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x, return_features=True) if self.return_features else self.net(x)
        return out.reshape(x.shape[0], -1)                                   # [N, D]


def load_inception(path: str | Path | None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The FID Inception network from a TorchScript file, wrapped as an InceptionFeatures module (eval mode).

    Args:
        path: the TorchScript file (`evaluation.inception_path`). Only TorchScript: a pickle (StyleGAN's
            `.pkl`) or a state dict (torch-fidelity's `.pth`) is refused with a message.
        device: where it runs. Default "cpu".
    """
    if not path or not Path(path).is_file():
        raise FileNotFoundError(f"evaluation.inception_path={path}: no such file; {_INCEPTION_HINT}")
    try:
        net = torch.jit.load(str(path), map_location=device)
    except RuntimeError as err:
        raise ValueError(f"evaluation.inception_path={path} is not a TorchScript archive ({str(err)[:120]}); "
                         f"{_INCEPTION_HINT}") from None
    return InceptionFeatures(net.eval()).eval()


def inception_inputs(images: Sequence[Image.Image], resize_to: int | None = 299,
                     input_range: str = "0-255") -> torch.Tensor:
    """PIL images -> [N, 3, S, S] float32 in the network's value range.

    Args:
        images: PIL images (converted to RGB); all of one size when resize_to is None.
        resize_to: square side for a PIL bicubic resize. Default 299; None keeps the size (the network
            then has to resize, as the StyleGAN TorchScript does).
        input_range: "0-255" (default: the StyleGAN/clean-fid TorchScript), "0-1" or "-1-1".
    """
    if input_range not in INPUT_RANGES:
        raise ValueError(f"input_range={input_range!r}; expected one of {INPUT_RANGES}")
    arrays = []
    for im in images:
        im = im.convert("RGB")
        if resize_to:
            im = im.resize((resize_to, resize_to), Image.BICUBIC)
        arrays.append(np.asarray(im, dtype=np.uint8))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()   # [N, 3, S, S] in [0, 255]
    if input_range == "0-1":
        return x / 255.0
    if input_range == "-1-1":
        return x / 127.5 - 1.0
    return x


@torch.no_grad()
def extract_features(images: Sequence[Image.Image], feature_extractor: torch.nn.Module, batch_size: int = 32,
                     resize_to: int | None = 299, input_range: str = "0-255",
                     device: str | torch.device = "cpu", desc: str = "inception") -> torch.Tensor:
    """Features of every image, batch by batch: [N, D] float64 on the CPU.

    Args:
        images: PIL images. feature_extractor: [N, 3, S, S] -> [N, D] (e.g. from load_inception).
        batch_size: images per forward. Default 32.
        resize_to, input_range: see inception_inputs. Defaults 299, "0-255".
        device: where the network runs. Default "cpu".
        desc: progress bar label. Default "inception".
    """
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, disable=None):
        x = inception_inputs(images[start:start + batch_size], resize_to, input_range).to(device)
        chunks.append(feature_extractor(x).reshape(x.shape[0], -1).double().cpu())
    return torch.cat(chunks)


class _PassThrough(torch.nn.Module):
    """Hands precomputed features to torchmetrics; `num_features` spares it a dummy 299x299 forward."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid_kid(generated: Sequence[Image.Image], reference: Sequence[Image.Image], feature_extractor: torch.nn.Module,
            batch_size: int = 32, kid_subset_size: int | None = None, device: str | torch.device = "cpu", *,
            resize_to: int | None = 299, input_range: str = "0-255", kid_subsets: int = 100,
            seed: int = 0) -> dict:
    """FID and KID between generated and reference images, on the features of one network.

    FID is biased upward when a set is small (and the covariance is rank-deficient below D images):
    compare FIDs only at equal set sizes; KID is unbiased and the better number for small sets.

    Args:
        generated, reference: PIL images, at least 2 each.
        feature_extractor: [N, 3, S, S] -> [N, D] (load_inception's module).
        batch_size: images per forward. Default 32.
        kid_subset_size: images per KID subset. Default None: min(1000, n_generated, n_reference).
        device: where the network runs. Default "cpu".
        resize_to, input_range: the preprocessing, see inception_inputs. Defaults 299, "0-255".
        kid_subsets: random subsets KID averages over. Default 100.
        seed: seeds KID's subset draws (the global torch RNG is left as it was). Default 0.
    """
    import warnings

    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    n_gen, n_ref = len(generated), len(reference)
    if min(n_gen, n_ref) < 2:
        raise ValueError(f"FID/KID need at least 2 images per set; got {n_gen} generated, {n_ref} reference")
    subset = kid_subset_size or min(1000, n_gen, n_ref)
    if not 2 <= subset <= min(n_gen, n_ref):
        raise ValueError(f"kid_subset_size={subset}: must be in [2, min(n_generated, n_reference)={min(n_gen, n_ref)}]")
    f_gen = extract_features(generated, feature_extractor, batch_size, resize_to, input_range, device, "inception gen")
    f_ref = extract_features(reference, feature_extractor, batch_size, resize_to, input_range, device, "inception ref")
    dim = f_gen.shape[1]

    fid = FrechetInceptionDistance(feature=_PassThrough(dim))          # float64 features: result stays float64
    fid.update(f_gen, real=False)
    fid.update(f_ref, real=True)
    with warnings.catch_warnings():   # "KID keeps all features in a buffer": we hold them anyway
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        kid = KernelInceptionDistance(feature=_PassThrough(dim), subsets=kid_subsets, subset_size=subset)
    kid.update(f_gen, real=False)
    kid.update(f_ref, real=True)
    with torch.random.fork_rng(devices=[]):                            # KID draws subsets with torch.randperm
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    out = {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
           "kid_subset_size": subset, "kid_subsets": kid_subsets, "n_generated": n_gen, "n_reference": n_ref,
           "feature_dim": dim, "resize_to": resize_to, "input_range": input_range}
    if min(n_gen, n_ref) <= dim:
        out["note"] = (f"fewer images than feature dimensions ({min(n_gen, n_ref)} <= {dim}): FID is strongly "
                       "biased; compare only at equal set sizes, prefer KID")
    return out


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), as pytorch-fid / clean-fid compute it.

    Args:
        mu1, mu2: [D] feature means. sigma1, sigma2: [D, D] feature covariances.
        eps: added to both diagonals when sqrtm of the product is not finite (singular product). Default 1e-6.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shapes differ: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(sigma1 sigma2) has an imaginary component {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------------------------- CLIP score
def _load_clip(path: str | Path, device: str | torch.device):
    """CLIPModel, tokenizer and PIL image processor from a local directory (no torchvision needed)."""
    if not path or not Path(path).is_dir():
        raise FileNotFoundError(f"evaluation.clip_path={path}: no such directory; {_CLIP_HINT}")
    from transformers import AutoTokenizer, CLIPModel
    try:   # transformers 5: the PIL backend by name; CLIPImageProcessor would want torchvision and warn
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:    # older transformers: CLIPImageProcessor is the PIL/numpy one
        from transformers import CLIPImageProcessor as ImageProcessor

    model = CLIPModel.from_pretrained(str(path)).to(device).eval()
    return model, AutoTokenizer.from_pretrained(str(path)), ImageProcessor.from_pretrained(str(path))


def _embeds(out) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output whose pooler_output is projected (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def clip_score(images: Sequence[Image.Image], prompts: Sequence[str], clip_path: str | Path,
               device: str | torch.device = "cpu", batch_size: int = 32) -> dict:
    """CLIP score of each image with its prompt, 100 * max(cos(E_image, E_text), 0), as torchmetrics defines it.

    Args:
        images: PIL images. prompts: one prompt per image (truncated to the text model's length).
        clip_path: local CLIP checkpoint directory (`evaluation.clip_path`).
        device: where CLIP runs. Default "cpu".
        batch_size: pairs per forward. Default 32.

    Returns: dict(mean, std (population), n, model).
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if not images:
        raise ValueError("clip_score needs at least one image")
    model, tokenizer, processor = _load_clip(clip_path, device)
    max_len = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
    scores = []
    for start in tqdm(range(0, len(images), batch_size), desc="clip", leave=False, disable=None):
        ims = [im.convert("RGB") for im in images[start:start + batch_size]]
        pixels = processor(images=ims, return_tensors="pt")["pixel_values"].to(device)
        text = tokenizer(list(prompts[start:start + batch_size]), padding=True, truncation=True,
                         max_length=max_len, return_tensors="pt").to(device)
        e_img = _embeds(model.get_image_features(pixel_values=pixels)).float()           # [B, P]
        e_txt = _embeds(model.get_text_features(input_ids=text["input_ids"],
                                                attention_mask=text["attention_mask"])).float()  # [B, P]
        cos = torch.nn.functional.cosine_similarity(e_img, e_txt, dim=-1)
        scores.append((100 * cos.clamp(min=0)).cpu())
    s = torch.cat(scores).double().numpy()
    return {"mean": float(s.mean()), "std": float(s.std()), "n": int(s.size), "model": str(clip_path)}


# ----------------------------------------------------------------------------------------------- together
def quality_metrics(generated: Sequence[Image.Image], reference: Sequence[Image.Image] | None,
                    prompts: Sequence[str], *, inception_path: str | Path | None = None,
                    clip_path: str | Path | None = None, device: str | torch.device = "cpu",
                    batch_size: int = 32, kid_subset_size: int | None = None, resize_to: int | None = 299,
                    input_range: str = "0-255") -> dict:
    """{"fid": ..., "kid": ..., "clip_score": ...}: each measured, or {"skipped": why and what to set}.

    Args:
        generated: generated PIL images. reference: reference PIL images for FID/KID (None or empty: skipped).
        prompts: the prompt of each generated image (CLIP score).
        inception_path: FID Inception TorchScript (`evaluation.inception_path`). Default None: FID/KID skipped.
        clip_path: local CLIP directory (`evaluation.clip_path`). Default None: CLIP score skipped.
        device: where the networks run. Default "cpu".
        batch_size: images per forward. Default 32.
        kid_subset_size: see fid_kid. Default None (min(1000, n_generated, n_reference)).
        resize_to, input_range: FID preprocessing, see inception_inputs. Defaults 299, "0-255".
    """
    out: dict = {}
    n_ref = len(reference) if reference is not None else 0
    if not inception_path:
        note = f"no Inception weights: {_INCEPTION_HINT}"
        out["fid"], out["kid"] = {"skipped": note}, {"skipped": note}
    elif min(len(generated), n_ref) < 2:
        note = (f"{len(generated)} generated and {n_ref} reference images; FID/KID need at least 2 of each "
                "(evaluation.quality_reference, evaluation.max_reference)")
        out["fid"], out["kid"] = {"skipped": note}, {"skipped": note}
    else:
        net = load_inception(inception_path, device)
        r = fid_kid(generated, reference, net, batch_size, kid_subset_size, device, resize_to=resize_to,
                    input_range=input_range)
        common = {k: r[k] for k in ("n_generated", "n_reference", "feature_dim", "resize_to", "input_range")}
        out["fid"] = {"fid": r["fid"], **common, "weights": str(inception_path)}
        if "note" in r:
            out["fid"]["note"] = r["note"]
        out["kid"] = {"kid_mean": r["kid_mean"], "kid_std": r["kid_std"], "subset_size": r["kid_subset_size"],
                      "subsets": r["kid_subsets"], **common}
    if not clip_path:
        out["clip_score"] = {"skipped": f"no CLIP weights: {_CLIP_HINT}"}
    elif not generated:
        out["clip_score"] = {"skipped": "no generated images"}
    else:
        out["clip_score"] = clip_score(generated, prompts, clip_path, device, batch_size)
    return out
