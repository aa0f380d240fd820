"""The distributed backends the loop serves, checked at start, and the DeepSpeed settings it owns.

DDP and FSDP2 average gradients over ranks in backward and leave the step to the loop, which divides the
accumulated gradient by the step's global kept count, clips and steps (train.loop `optimizer_update`).
DeepSpeed's backward steps the optimizer itself (accelerate's engine wrapper calls `engine.step()`), so under
DeepSpeed the loop prescales the loss instead: each rank backpropagates sum(kept losses) x world / global kept,
which DeepSpeed's average over ranks turns into the mean over the step's kept samples, exactly what the
division gives under DDP. That is exact only when the global kept count is known before the first backward of
the step, so DeepSpeed runs at gradient_accumulation_steps=1; a step that kept nothing, or whose loss is not
finite on some rank, is not backpropagated at all, so DeepSpeed takes no step and AdamW's moments stay put.
ZeRO stages 0-2 keep every parameter whole on every rank (the magnitude forward, validation, the EMA and the
export read them as usual); stage 3 is refused. DeepSpeed's own fp16/bf16 modes cast the trained UNet itself to
low precision, unlike the loop's recipe (fp32 weights, autocast): they are refused, naming DeepSpeed's
`torch_autocast`, which keeps fp32 weights.
"""
from __future__ import annotations

import os

ZERO_STAGES_SERVED = (0, 1, 2)


def deepspeed_requested() -> bool:
    """Whether `accelerate launch` was told to run DeepSpeed (its config's distributed_type: DEEPSPEED)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def accelerator_kwargs(cuda: bool) -> dict:
    """The Accelerator arguments that select the device and process group. Without a GPU, accelerate's cpu=True
    (gloo) would also turn DeepSpeed off, so a DeepSpeed launch on CPU gets DeepSpeed's CPU accelerator over
    gloo instead (how the tests run ZeRO-2 on two CPU processes)."""
    from accelerate.utils import InitProcessGroupKwargs

    if cuda:
        return {"cpu": False}
    if deepspeed_requested():
        return {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": True}


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def deepspeed_autocast_dtype(accelerator):
    """The compute dtype of DeepSpeed's torch_autocast (zero2.json: bf16) when it is on, else None. The loop then
    runs its own no-grad forwards (the magnitude, the anchor's reference, validation) under the same autocast and
    keeps the frozen modules in that dtype, as accelerate's mixed_precision does under DDP."""
    if not is_deepspeed(accelerator):
        return None
    from deepspeed.runtime.config import get_torch_autocast_dtype, get_torch_autocast_enabled

    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    return get_torch_autocast_dtype(ds) if get_torch_autocast_enabled(ds) else None


def check_backend(accelerator, args) -> None:
    """Stop at start on a distributed backend, or a setting under it, that the loop cannot serve, naming the way
    out. `args` is the loop's TrainArgs."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        _check_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, args)
        return
    if kind != DistributedType.FSDP:
        return
    version = getattr(getattr(accelerator.state, "fsdp_plugin", None), "fsdp_version", 1)
    if version != 2:
        raise ValueError(f"FSDP version {version} is not supported: set fsdp_version: 2 in the accelerate config "
                         "(launch/accelerate/fsdp.yaml); FSDP2's gradients are the shards the loop divides")
    for bad, what in ((args.use_ema, "use_ema=true"), (args.lora_rank, "model.lora.rank>0")):
        if bad:
            raise ValueError(f"{what} is not supported under FSDP (the EMA and the adapters would need their own "
                             "sharding): drop it, or use DDP (multi_gpu)")


def _enabled(section) -> bool:
    return isinstance(section, dict) and section.get("enabled") not in (False, None, "false")


def _check_deepspeed(ds: dict, args) -> None:
    """The DeepSpeed config and loop settings the prescaled loss is exact under (module docstring)."""
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stage not in ZERO_STAGES_SERVED:
        raise ValueError(f"DeepSpeed zero_stage {stage} is not supported: ZeRO-3 shards the parameters, which the "
                         "magnitude forward, validation and the export read whole; use zero_stage: 2 "
                         "(launch/accelerate/zero2.yaml) or FSDP2 (launch/accelerate/fsdp.yaml)")
    if args.gradient_accumulation_steps != 1 or ds.get("gradient_accumulation_steps", 1) not in (1, "auto"):
        raise ValueError("gradient_accumulation_steps>1 is not supported under DeepSpeed: it scales each "
                         "micro-batch before the later ones' kept counts are known; set gradient_accumulation_steps"
                         "=1 (here and in the accelerate config's deepspeed_config) and raise train_batch_size, or "
                         "use DDP or FSDP2")
    for low in ("fp16", "bf16"):
        if _enabled(ds.get(low)):
            raise ValueError(f"DeepSpeed's {low} mode is not supported: it casts the trained UNet to {low}; set "
                             "mixed_precision: 'no' in the accelerate config and memfilter's mixed_precision=no, "
                             "and turn on DeepSpeed's torch_autocast (fp32 weights, low-precision compute) in a "
                             "deepspeed_config_file, as launch/accelerate/zero2.json does")
    if args.lora_rank:
        raise ValueError("model.lora.rank>0 is not supported under DeepSpeed (the adapters' optimizer state is "
                         "small: ZeRO saves nothing); use DDP (multi_gpu)")
    clip = ds.get("gradient_clipping", "auto")
    if clip not in ("auto", None) and float(clip) != float(args.max_grad_norm or 0.0):
        raise ValueError(f"the DeepSpeed config's gradient_clipping={clip} disagrees with max_grad_norm="
                         f"{args.max_grad_norm}: remove gradient_clipping from the accelerate config (the loop sets "
                         "it from max_grad_norm) or set the two alike")


def configure_deepspeed(accelerator, args) -> None:
    """Fill the DeepSpeed config's values the loop owns, before `prepare` builds the engine: the micro-batch (the
    loop prepares no dataloader, from which accelerate would read it) and the clipping norm (max_grad_norm, one
    definition; 0 = none, as DeepSpeed reads it)."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = args.train_batch_size
    ds["train_batch_size"] = args.train_batch_size * accelerator.num_processes
    ds["gradient_accumulation_steps"] = 1
    ds["gradient_clipping"] = float(args.max_grad_norm or 0.0)
