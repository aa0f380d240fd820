"""Model families: one seam per family (train.families.base.Family), chosen by the model's model_index.json.

    sd    StableDiffusionPipeline     SD 1.x/2.x, epsilon or v-prediction      train/families/sd.py
    sdxl  StableDiffusionXLPipeline   SDXL: two text encoders, added conditions  train/families/sdxl.py

Adding a family (e.g. SD3 or Flux, flow matching) is one module here that subclasses Family (its components,
text encoding, denoiser arguments, pipeline; for flow matching the magnitude is the norm of the text-conditional
part of the predicted velocity and the training target the velocity), one entry in FAMILIES, and one
conf/model/<name>.yaml.
"""
from __future__ import annotations

from memfilter.train.families.base import Family, Tokenize
from memfilter.train.families.sd import StableDiffusion, build_tiny
from memfilter.train.families.sdxl import StableDiffusionXL, build_tiny_sdxl
from memfilter.train.models import Components

FAMILIES: dict[str, type[Family]] = {f.name: f for f in (StableDiffusion, StableDiffusionXL)}
TINY_BUILDERS = {"sd": build_tiny, "sdxl": build_tiny_sdxl}
_BY_PIPELINE = {f.pipeline_class_name: f for f in FAMILIES.values()}

__all__ = ["FAMILIES", "Components", "Family", "Tokenize", "build_pipeline", "build_tiny", "build_tiny_sdxl",
           "build_tiny_model", "family_class", "from_pipeline", "get_family", "load_pretrained", "read_model_index"]


def family_class(pipeline_class_name: str, where: str = "") -> type[Family]:
    """The family of a pipeline class name; an unknown one is an error that names it and the known ones."""
    try:
        return _BY_PIPELINE[pipeline_class_name]
    except KeyError:
        raise ValueError(f"{where or 'model'}: _class_name={pipeline_class_name!r} is not a model family memfilter "
                         f"knows ({', '.join(sorted(_BY_PIPELINE))}); add one in train/families/") from None


def read_model_index(pretrained: str, revision: str | None = None) -> dict:
    """model_index.json of a diffusers directory or hub id (the hub's local cache with HF_HUB_OFFLINE=1)."""
    from diffusers import DiffusionPipeline

    return dict(DiffusionPipeline.load_config(pretrained, revision=revision))


def load_pretrained(pretrained: str, revision: str | None = None, variant: str | None = None,
                    prediction_type: str | None = None, vae: str | None = None,
                    non_ema_revision: str | None = None) -> Components:
    """Components of a diffusers directory or hub id, of the family its model_index.json names.

    Args:
        pretrained: local directory (as `save_pretrained` writes it) or hub id.
        revision: hub revision. Default None (main).
        variant: weights variant, e.g. "fp16". Default None.
        prediction_type: override the scheduler's prediction_type ("epsilon" or "v_prediction").
            Default None: keep what the model was trained with.
        vae: a separate AutoencoderKL (directory or hub id, its weights at the top level) instead of the model's.
            Default None.
        non_ema_revision: hub revision of the UNet to train, as diffusers' --non_ema_revision: the trained UNet
            comes from it, an EMA starts from `revision`'s (Components.ema_start). Default None: `revision`'s.
    """
    index = read_model_index(pretrained, revision)
    cls = family_class(index.get("_class_name", ""), f"model.pretrained={pretrained!r}")
    components = cls.load(pretrained, index, revision=revision, variant=variant, prediction_type=prediction_type)
    if vae:
        from diffusers import AutoencoderKL
        components.vae = AutoencoderKL.from_pretrained(vae, revision=revision)
    if non_ema_revision and non_ema_revision != revision:
        import diffusers
        unet_cls = getattr(diffusers, cls.component_classes["unet"])
        components.ema_start = components.unet
        components.unet = unet_cls.from_pretrained(pretrained, subfolder="unet", revision=non_ema_revision,
                                                   variant=variant)
    return components


def build_tiny_model(family: str = "sd", **kw) -> Components:
    """A tiny model of `family` built from config (train.families.sd.build_tiny's arguments)."""
    if family not in TINY_BUILDERS:
        raise ValueError(f"model.tiny.family={family!r}: expected one of {sorted(TINY_BUILDERS)}")
    return TINY_BUILDERS[family](**kw)


def get_family(components: Components) -> Family:
    return FAMILIES[components.family](components)


def from_pipeline(pipe) -> Family:
    """The family of a loaded diffusers pipeline, over its components (for detection and evaluation)."""
    from diffusers import DDPMScheduler

    cls = family_class(type(pipe).__name__, "pipeline")
    parts = {name: getattr(pipe, name, None) for name in cls.component_classes}
    flags = {k: pipe.config.get(k, d) for k, d in cls.pipeline_flags.items()}
    return cls(Components(**parts, noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
                          family=cls.name, scheduler=pipe.scheduler, pipeline_config=flags))


def build_pipeline(components: Components, unet=None):
    """The family's diffusers pipeline over `components` (with `unet` instead of theirs when given)."""
    return get_family(components).pipeline(unet)
