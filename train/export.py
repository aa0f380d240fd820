"""The end products of a run: validation images and the final pipeline (save_pretrained)."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from memfilter.train.families import build_pipeline, get_family
from memfilter.train.models import Components


@torch.no_grad()
def validation_images(components: Components, unet, prompts: list[str], *, num_images: int = 1,
                      num_inference_steps: int = 20, guidance_scale: float = 7.5, resolution: int | None = None,
                      seed: int = 0, device: torch.device | str = "cpu") -> list[tuple[str, int, object]]:
    """Sample images for `prompts`; image j of prompt i uses seed + 1000 * i + j, so runs compare on equal noise.

    Returns (prompt, j, PIL image) triples. The UNet is used as given (swap EMA weights in beforehand).
    """
    pipe = build_pipeline(components, unet).to(device)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i, prompt in enumerate(prompts):
        gens = [torch.Generator(device="cpu").manual_seed(seed + 1000 * i + j) for j in range(num_images)]
        images = pipe([prompt] * num_images, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      height=resolution, width=resolution, generator=gens).images
        out += [(prompt, j, im) for j, im in enumerate(images)]
    return out


def save_images(images: list[tuple[str, int, object]], folder: str | Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    prompts = list(dict.fromkeys(p for p, _, _ in images))
    for prompt, j, im in images:
        path = folder / f"{prompts.index(prompt):03d}-{j:02d}.png"
        im.save(path)
        paths.append(path)
    (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return paths


def full_unet(unet) -> torch.nn.Module | None:
    """The whole UNet of an FSDP2-sharded one, as a plain module on rank 0 (None on the other ranks): a gather, so
    every rank calls it. Its class is the model's own (fully_shard makes a subclass), its weights fp32 on the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    state = get_model_state_dict(unet, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not state:
        return None
    cls = next(c for c in type(unet).__mro__ if not issubclass(c, FSDPModule))
    plain = cls.from_config(unet.config)
    plain.load_state_dict({k: v.float() for k, v in state.items()})
    return plain


def export_pipeline(components: Components, unet, out_dir: str | Path, lora: bool = False) -> Path:
    """Save the final model as its family's full pipeline (loadable by `from_pretrained`), with the base model's
    scheduler.

    With LoRA, `pytorch_lora_weights.safetensors` goes to <out_dir> as diffusers writes it, and the
    pipeline gets the adapters fused into the full-precision base UNet of `components` (kept in fp32 when the
    run trained in bf16/fp16), so it loads without peft and its frozen weights are the base model's, bit for bit.
    """
    out_dir = Path(out_dir)
    if lora:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        adapters = get_peft_model_state_dict(unet)
        get_family(components).save_lora(out_dir, convert_state_dict_to_diffusers(adapters))
        fused = copy.deepcopy(components.unet).to(torch.float32)   # fuse in fp32: deltas vanish in bf16 weights
        if components.unet is not unet:                   # the fp32 base kept apart: give it the trained adapters
            fused.add_adapter(unet.peft_config["default"])
            set_peft_model_state_dict(fused, {k: v.float() for k, v in adapters.items()})
        fused.fuse_lora()
        fused.unload_lora()
        unet = fused
    build_pipeline(components, unet.to(torch.float32)).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def write_model_card(run_dir: str | Path, summary: dict, config: dict | None, family: str) -> Path:
    """README.md in the run directory, as diffusers' scripts write one: base model, data, filter and what it kept,
    the validation images, and how to load the pipeline. Never over an existing README (a user's own)."""
    run_dir, config = Path(run_dir), config or {}
    model, data, filt = config.get("model") or {}, config.get("data") or {}, config.get("filter") or {}
    base = model.get("pretrained") or f"a tiny {family} model built from config"
    where = data.get("shards") or data.get("path") or data.get("name", "?")
    images = sorted((run_dir / "samples" / "final").glob("*.png"))

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"
    lines = [
        "---", f"base_model: {base}", "library_name: diffusers", "license: other",
        "tags: [text-to-image, diffusers, memfilter]", "---", "",
        f"# {run_dir.name}: a memfilter fine-tune of {base}", "",
        f"Fine-tuned with memfilter's memorization filter `filter={summary.get('policy')}`: every step, the samples "
        "it judged memorized (from the magnitude of the text-conditional noise prediction, Wen et al. ICLR 2024, "
        "and the policy's evidence) were kept out of the loss.",
        "", "| | |", "| --- | --- |",
        f"| data | {data.get('name', '?')}: `{where}` |",
        f"| steps | {summary.get('steps')} x {config.get('train_batch_size', '?')} per process x "
        f"{summary.get('world_size')} process(es), learning rate {(config.get('optim') or {}).get('learning_rate')} |",
        f"| samples kept | {pct(summary.get('kept_fraction'))} (duplicated: {pct(summary.get('dup_kept_fraction'))}, "
        f"others: {pct(summary.get('nondup_kept_fraction'))}) |",
        f"| filter settings | `{ {k: v for k, v in filt.items() if k != 'protect'} }` |",
        f"| per-sample decisions | `records/` (Parquet: step, key, timestep, magnitude, kept, loss) |", "",
        "```python", "from diffusers import DiffusionPipeline", "",
        f'pipe = DiffusionPipeline.from_pretrained("{run_dir}")', "```", ""]
    if images:
        prompts = (run_dir / "samples" / "final" / "prompts.txt").read_text().splitlines()
        lines += ["## Validation images", "", f"Prompts: {'; '.join(prompts)}", "",
                  *[f"![{p.stem}](samples/final/{p.name})" for p in images], ""]
    path = run_dir / "README.md"
    if not path.exists():
        path.write_text("\n".join(lines))
    return path
