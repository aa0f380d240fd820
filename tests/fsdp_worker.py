"""Run by tests/test_launch_recipes.py with 2 processes (gloo, CPU; the command below): the
loop's filtered update on a tiny UNet sharded with FSDP2 (each BasicTransformerBlock, then the UNet, as
launch/accelerate/fsdp.yaml wraps it) and on the same UNet under DDP (accelerate's prepare), from the same weights
and the same per-rank batches. Rank 0 writes the two loss trajectories, the kept counts, the largest weight gap
and whether the pipeline exported from the gathered FSDP2 weights loads back with DDP's weights.

    accelerate launch --config_file launch/accelerate/cpu_2proc.yaml tests/fsdp_worker.py <out.json> <export dir>
"""
from __future__ import annotations

import copy
import json
import sys

import torch
from accelerate import Accelerator
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from torch.distributed.fsdp import fully_shard

from memfilter.filtering.policies import build_policy
from memfilter.train.checkpoint import is_sharded
from memfilter.train.export import export_pipeline, full_unet
from memfilter.train.families import build_tiny_model
from memfilter.train.loop import TrainState, optimizer_update, step_seed
from memfilter.train.step import filtered_diffusion_step

STEPS, BATCH = 4, 4


def batch(c, rank: int, step: int):
    """This rank's latents and text conditioning of a step (the same for both runs)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    latents = torch.randn(BATCH, c.unet.config.in_channels, 8, 8, generator=g)
    hidden = torch.randn(BATCH, 77, c.unet.config.cross_attention_dim, generator=g)
    return latents, {"encoder_hidden_states": hidden}, {"encoder_hidden_states": torch.zeros_like(hidden)}


def trajectory(accelerator, c, unet, raw, optimizer) -> tuple[list[float], list[int]]:
    """STEPS filtered steps as train/loop.py takes them: per-rank sum of kept losses x world backpropagated,
    then optimizer_update divides by the global kept count, clips and steps."""
    policy, state, losses, kept = build_policy("batch_quantile", drop_fraction=0.25), TrainState(), [], []
    params = [p for p in unet.parameters() if p.requires_grad]
    world, rank = accelerator.num_processes, accelerator.process_index
    for step in range(STEPS):
        latents, cond, uncond = batch(c, rank, step)
        gen = torch.Generator().manual_seed(step_seed(0, rank, step, 0))
        out = filtered_diffusion_step(unet, c.noise_scheduler, latents, cond, uncond, policy, gen,
                                      magnitude_unet=raw, gather=accelerator.gather, rank=rank)
        accelerator.backward(out.loss_sum * world)
        optimizer_update(accelerator, params, optimizer, None, raw, out.kept_global, 1.0, state)
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(accelerator.reduce(out.loss_sum.detach(), "sum")) / max(out.kept_global, 1))
        kept.append(out.kept_global)
    return losses, kept


def main(out_json: str, export_dir: str) -> None:
    accelerator = Accelerator(cpu=not torch.cuda.is_available())   # as launch/train.py: gloo on CPU
    torch.manual_seed(0)
    c = build_tiny_model("sd", resolution=16, block_out_channels=(32, 32))
    start = copy.deepcopy(c.unet.state_dict())

    ddp_unet = c.unet.train()
    ddp_unet, ddp_opt = accelerator.prepare(ddp_unet, torch.optim.AdamW(ddp_unet.parameters(), lr=1e-3))
    ddp = trajectory(accelerator, c, ddp_unet, accelerator.unwrap_model(ddp_unet), ddp_opt)

    sharded = UNet2DConditionModel.from_config(c.unet.config)
    sharded.load_state_dict(start)
    for m in sharded.modules():
        if isinstance(m, BasicTransformerBlock):
            fully_shard(m)
    fully_shard(sharded.train())
    fsdp = trajectory(accelerator, c, sharded, sharded, torch.optim.AdamW(sharded.parameters(), lr=1e-3))

    whole = full_unet(sharded)                             # every rank takes part in the gather
    if accelerator.is_main_process:
        want = accelerator.unwrap_model(ddp_unet).state_dict()
        gap = max(float((whole.state_dict()[k] - v).abs().max()) for k, v in want.items())
        export_pipeline(c, whole, export_dir)
        back = UNet2DConditionModel.from_pretrained(export_dir, subfolder="unet")
        exported = all(torch.allclose(back.state_dict()[k], v, atol=1e-6) for k, v in want.items())
        moved = max(float((want[k] - v).abs().max()) for k, v in start.items())
        json.dump({"ddp_losses": ddp[0], "fsdp_losses": fsdp[0], "ddp_kept": ddp[1], "fsdp_kept": fsdp[1],
                   "max_weight_gap": gap, "max_weight_change": moved, "exported_equal": exported,
                   "sharded": is_sharded(sharded), "gathered_class": type(whole).__name__,
                   "world": accelerator.num_processes}, open(out_json, "w"))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
