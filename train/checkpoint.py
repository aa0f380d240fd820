"""Checkpoints: `checkpoint-<step>/` as diffusers' scripts write them, made atomic, plus our own state.

Accelerate's `save_state` writes the optimizer and RNG states, and through `register_diffusers_format`'s hooks the
UNet as diffusers does (`unet/`, `unet_ema/`, or only the LoRA adapters). Everything memfilter adds (train
position, lr schedule, filter policy state) is written beside it as
safetensors for tensors and JSON for the rest, never pickled. A checkpoint is written to a hidden
`.checkpoint-<step>.tmp/` and renamed when complete, so a run killed mid-save leaves no half
checkpoint that `resume_from_checkpoint=latest` could pick; `latest` names the newest complete one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

META = "memfilter_state.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON tree of `obj` with every tensor moved to `tensors` under a fresh numbered name."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"      # numbered, not path-named: dict keys may contain anything
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, tensors) for v in obj]
    if isinstance(obj, float) and not (obj == obj and abs(obj) != float("inf")):
        return {"__float__": repr(obj)}                 # inf and nan survive JSON
    return obj


def _unflatten(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__float__" in tree:
            return float(tree["__float__"])
        return {k: _unflatten(v, tensors) for k, v in tree["__dict__"]}
    if isinstance(tree, list):
        return [_unflatten(v, tensors) for v in tree]
    return tree


def save_state_dict(state: dict, directory: str | os.PathLike, name: str) -> None:
    """Write a state dict as `<name>.safetensors` (tensors) + `<name>.json` (everything else)."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, tensors)
    directory = Path(directory)
    if tensors:
        save_file(tensors, directory / f"{name}.safetensors")
    (directory / f"{name}.json").write_text(json.dumps(tree))


def load_state_dict(directory: str | os.PathLike, name: str) -> dict:
    directory = Path(directory)
    st = directory / f"{name}.safetensors"
    tensors = load_file(st) if st.exists() else {}
    return _unflatten(json.loads((directory / f"{name}.json").read_text()), tensors)


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    out = []
    for p in Path(run_dir).glob("checkpoint-*"):
        m = _CKPT.match(p.name)
        if m and (p / META).exists():
            out.append((int(m.group(1)), p))
    return sorted(out)


def find_checkpoint(run_dir: str | os.PathLike, which: str) -> Path | None:
    """`which` = "latest" (newest complete checkpoint of run_dir, or None) or a checkpoint path."""
    if which == "latest":
        ckpts = list_checkpoints(run_dir)
        return ckpts[-1][1] if ckpts else None
    p = Path(which)
    if not p.is_absolute() and not p.exists():
        p = Path(run_dir) / which
    if not (p / META).exists():
        raise FileNotFoundError(f"resume_from_checkpoint={which!r}: {p} is not a complete memfilter checkpoint "
                                f"(no {META}); use 'latest' or a checkpoint-<step> folder of the run")
    return p


def save_checkpoint(accelerator, run_dir: str | os.PathLike, step: int, stateful: dict[str, Any],
                    meta: dict, total_limit: int | None = None) -> Path:
    """Save on all ranks (accelerate needs every process); rank 0 writes our state and renames.

    Args:
        accelerator: the run's Accelerator (its prepared model and optimizer are saved).
        run_dir: the run directory.
        step: global step; the folder is checkpoint-<step>.
        stateful: objects with state_dict(), saved as <name>.safetensors/.json.
        meta: JSON-able train position and settings, saved as memfilter_state.json.
        total_limit: keep at most this many checkpoints (oldest removed first). Default: no limit.
    """
    run_dir = Path(run_dir)
    final, tmp = run_dir / f"checkpoint-{step}", run_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        if total_limit:
            old = [p for s, p in list_checkpoints(run_dir) if s != step]
            for p in old[:max(0, len(old) - total_limit + 1)]:
                shutil.rmtree(p)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()          # every rank's files are in tmp before it is renamed
    if accelerator.is_main_process:
        for name, obj in stateful.items():
            save_state_dict(obj.state_dict(), tmp, name)
        (tmp / META).write_text(json.dumps(meta, indent=1, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = run_dir / ".latest.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, run_dir / "latest")
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | os.PathLike, stateful: dict[str, Any]) -> dict:
    """Restore model, optimizer (accelerate) and our objects; returns the saved meta."""
    path = Path(path)
    accelerator.load_state(str(path))
    for name, obj in stateful.items():
        obj.load_state_dict(load_state_dict(path, name))
    return json.loads((path / META).read_text())


def is_sharded(unet) -> bool:
    """Whether the UNet is FSDP2-sharded (torch's fully_shard, as accelerate's FSDP2 prepares it): its parameters
    are DTensor shards, its forward needs every rank and its full weights a gather (`export.full_unet`)."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(unet, FSDPModule)


def register_diffusers_format(accelerator, family, ema=None, lora: bool = False) -> None:
    """Checkpoints hold the UNet as diffusers' scripts write it, through accelerate's save/load hooks:
    `checkpoint-N/unet` (UNet2DConditionModel.from_pretrained(..., subfolder="unet") loads it) and
    `checkpoint-N/unet_ema`, or for LoRA only the adapters (`pytorch_lora_weights.safetensors`, loadable with
    `load_lora_weights`). Weights round-trip exactly in fp32, so a resumed run continues bit for bit."""

    def save_hook(models, weights, output_dir):
        if not accelerator.is_main_process:
            return
        if ema is not None:
            ema.save_pretrained(os.path.join(output_dir, "unet_ema"))
        for model in models:
            unet = accelerator.unwrap_model(model)
            if is_sharded(unet):       # accelerate saved (and loads) it as shards: a gather here would need every rank
                continue
            if lora:
                from diffusers.utils import convert_state_dict_to_diffusers
                from peft.utils import get_peft_model_state_dict
                family.save_lora(output_dir, convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
            else:
                unet.save_pretrained(os.path.join(output_dir, "unet"), safe_serialization=True)
            if weights:
                weights.pop()          # accelerate must not write its flat model.safetensors too

    def load_hook(models, input_dir):
        if ema is not None:
            from diffusers.training_utils import EMAModel
            saved = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), ema.model_cls)
            ema.load_state_dict(saved.state_dict())
        while models:
            unet = accelerator.unwrap_model(models.pop())
            if lora:
                _load_lora_adapters(unet, family, input_dir)
            else:
                saved = type(unet).from_pretrained(input_dir, subfolder="unet")
                unet.load_state_dict(saved.state_dict())

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _load_lora_adapters(unet, family, input_dir) -> None:
    """The adapters of a LoRA checkpoint into the UNet's existing (trainable, fp32) adapter weights."""
    import diffusers
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    lora_state, _ = getattr(diffusers, family.pipeline_class_name).lora_state_dict(input_dir)
    unet_state = {k.removeprefix("unet."): v for k, v in lora_state.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state), adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{input_dir}: LoRA checkpoint has keys this UNet's adapters lack, e.g. "
                         f"{result.unexpected_keys[:2]}")
