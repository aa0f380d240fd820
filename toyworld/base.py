"""The base model of the toy world: what stands in for a pretrained Stable Diffusion on a laptop.

An SD-shaped pipeline (AutoencoderKL, CLIP tokenizer and text encoder, UNet2DConditionModel, DDIM) trained
from scratch on fresh, never-duplicated items of the world (`toyworld.world`, split "base"):

1. the VAE (16 px RGB -> 8x8x4 latents) on reconstruction, until it keeps the unnamed detail
   (a detail-descriptor cosine of ~0.99 between an image and its reconstruction);
2. its latent scaling factor, measured (1 / std of the latents) rather than SD's 0.18215;
3. the UNet and the text encoder jointly on the denoising loss with 10% caption dropout, an EMA of
   both, AdamW with warm-up and cosine decay.

Fine-tuning then starts from it with the text encoder frozen, as users fine-tune SD. The repo ships
the result (`toyworld/assets/world-base`, safetensors); `python launch/build_world_base.py` rebuilds it
from the same seed. Progress lines report the VAE's PSNR and the base's prompt fidelity (attributes read
back from generations of fresh captions) as they go.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from memfilter.toyworld.world import SPLITS, WorldSpec, draw_item, fidelity
from memfilter.train.families import build_pipeline, build_tiny
from memfilter.train.models import Components

log = logging.getLogger("memfilter.world_base")

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "world-base"


@dataclass
class BaseArgs:
    """How the base is built.

    Args:
        seed: world and initialisation seed. Default 0.
        vae_steps: VAE optimisation steps. Default 2500.
        vae_lr: VAE AdamW lr. Default 1e-3.
        unet_steps: UNet + text encoder steps. Default 2500.
        lr: UNet/text-encoder peak lr (cosine decay after 200 warm-up steps). Default 1e-3.
        batch_size: images per step (both stages). Default 64.
        caption_dropout: share of empty captions in UNet training (for guidance). Default 0.1.
        ema_decay: EMA decay of UNet and text encoder. Default 0.999.
        eval_every: UNet steps between fidelity checks. Default 500.
        block_out_channels, cross_attention_levels, cross_attention_dim, vae_channels, max_length:
            model shape (see train.families.sd.build_tiny). Defaults (64, 128), 2, 64, (32, 64), 16.
        vae_from: a diffusers directory whose trained `vae/` is reused instead of training one (e.g. an
            earlier build; the UNet stage is the long one). Default None: train it.
    """

    seed: int = 0
    vae_steps: int = 2500
    vae_lr: float = 1e-3
    unet_steps: int = 2500
    lr: float = 1e-3
    batch_size: int = 64
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    eval_every: int = 500
    block_out_channels: tuple = (64, 128)
    layers_per_block: int = 1
    cross_attention_levels: int = 2
    cross_attention_dim: int = 64
    vae_channels: tuple = (32, 64)
    max_length: int = 16
    vae_from: str | None = None


def world_components(args: BaseArgs, spec: WorldSpec = WorldSpec()) -> Components:
    """Untrained components of the world's shape."""
    return build_tiny(resolution=spec.resolution, block_out_channels=tuple(args.block_out_channels),
                      layers_per_block=args.layers_per_block,
                      cross_attention_dim=args.cross_attention_dim, vae_channels=tuple(args.vae_channels),
                      max_length=args.max_length, seed=args.seed, cross_attention_levels=args.cross_attention_levels)


def _images(seed: int, split: str, start: int, n: int, spec: WorldSpec) -> tuple[torch.Tensor, list[str], list[dict]]:
    items = [draw_item(seed, split, start + i, spec) for i in range(n)]
    x = torch.from_numpy(np.stack([it["image"] for it in items])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, [it["caption"] for it in items], [it["attrs"] for it in items]      # x: [n, 3, S, S] in [-1, 1]


def train_vae(c: Components, args: BaseArgs, spec: WorldSpec) -> dict:
    """Reconstruction (+1e-6 KL) on base items; sets vae.config.scaling_factor. Returns its measurements."""
    vae = c.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.vae_steps)))
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for step in range(args.vae_steps):
        x, _, _ = _images(args.seed, "base", step * args.batch_size, args.batch_size, spec)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(gen)).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 500 == 0:
            log.info("vae step %d/%d  mse %.5f  (%.0f s)", step + 1, args.vae_steps, loss.item(), time.time() - t0)
    vae.eval()
    with torch.no_grad():
        x, _, _ = _images(args.seed, "fresh", 0, 256, spec)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mean).sample.clamp(-1, 1)
        psnr = float(10 * torch.log10(4.0 / F.mse_loss(rec, x)))
        std = float(post.sample(gen).std())
    vae.register_to_config(scaling_factor=1.0 / std)
    log.info("vae: PSNR %.2f dB on fresh items, latent std %.3f -> scaling_factor %.4f", psnr, std, 1.0 / std)
    return {"vae_psnr_db": psnr, "latent_std": std, "scaling_factor": 1.0 / std}


@torch.no_grad()
def base_fidelity(c: Components, spec: WorldSpec, n: int = 64, seed: int = 0, steps: int = 20,
                  guidance_scale: float = 7.5) -> dict:
    """Share of generations for fresh captions that show each named attribute (and all of them: "all")."""
    _, captions, attrs = _images(seed, "fresh", 10_000, n, spec)
    pipe = build_pipeline(c)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(n)]
    images = pipe(captions, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens,
                  height=spec.resolution, width=spec.resolution).images
    rows = [fidelity(im, a, spec) for im, a in zip(images, attrs)]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def train_unet(c: Components, args: BaseArgs, spec: WorldSpec) -> dict:
    """Denoising loss on base items, UNet and text encoder together, EMA copied in at the end."""
    unet, te, sched = c.unet.train(), c.text_encoder.train(), c.noise_scheduler
    params = list(unet.parameters()) + list(te.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    warm = 200
    lr_at = lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.unet_steps)))  # noqa: E731
    lrs = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(args.seed + 1)
    sf = c.vae.config.scaling_factor
    empty = c.tokenizer([""], padding="max_length", max_length=args.max_length, return_tensors="pt").input_ids
    t0, history = time.time(), []
    offset = 10 ** 8      # base items for the UNet are not the VAE's
    for step in range(args.unet_steps):
        x, captions, _ = _images(args.seed, "base", offset + step * args.batch_size, args.batch_size, spec)
        ids = c.tokenizer(captions, padding="max_length", max_length=args.max_length, truncation=True,
                          return_tensors="pt").input_ids
        drop = torch.rand(len(captions), generator=gen) < args.caption_dropout
        ids = torch.where(drop[:, None], empty, ids)
        with torch.no_grad():
            latents = c.vae.encode(x).latent_dist.sample(gen) * sf                # [B, 4, 8, 8]
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(x),), generator=gen)
        pred = unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=te(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lrs.step()
        with torch.no_grad():
            d = min(args.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.unet_steps:
            backup = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, e in zip(params, ema):
                    p.copy_(e)
            unet.eval(), te.eval()
            fid = base_fidelity(c, spec, seed=args.seed)
            history.append({"step": step + 1, "loss": float(loss), **fid})
            log.info("unet step %d/%d  loss %.4f  fidelity(EMA) %s  (%.0f s)", step + 1, args.unet_steps,
                     float(loss), " ".join(f"{k} {v:.2f}" for k, v in fid.items()), time.time() - t0)
            if step + 1 < args.unet_steps:
                with torch.no_grad():
                    for p, b in zip(params, backup):
                        p.copy_(b)
                unet.train(), te.train()
    unet.eval(), te.eval()          # the EMA weights stay in
    return {"history": history, "fidelity": history[-1] if history else None}


def build_world_base(out_dir: str | Path = ASSET_DIR, args: BaseArgs = BaseArgs(),
                     spec: WorldSpec = WorldSpec()) -> Path:
    """Train the world's base pipeline and save it with `save_pretrained` (safetensors) in `out_dir`."""
    t0 = time.time()
    torch.manual_seed(args.seed)
    c = world_components(args, spec)
    if args.vae_from:
        from diffusers import AutoencoderKL
        c.vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae").eval()
        prev = Path(args.vae_from) / "world_base.json"
        info = {"vae": {**(json.loads(prev.read_text())["vae"] if prev.is_file() else {}), "from": str(args.vae_from)}}
    else:
        info = {"vae": train_vae(c, args, spec)}
        c.vae.save_pretrained(Path(out_dir) / "vae", safe_serialization=True)    # usable before the UNet is done
    c.vae.requires_grad_(False)
    info["unet"] = train_unet(c, args, spec)
    out = Path(out_dir)
    build_pipeline(c).save_pretrained(out, safe_serialization=True)
    info.update(args=asdict(args), spec=asdict(spec), splits=SPLITS, seconds=round(time.time() - t0, 1))
    (out / "world_base.json").write_text(json.dumps(info, indent=1))
    log.info("saved %s (%.0f s)", out, time.time() - t0)
    return out
