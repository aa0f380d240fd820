"""Config -> objects. The only place where a Hydra config becomes models, data and policies."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from filtering.policies import build_policy
from launch.config_check import ConfigError
from train.data.synthetic import SyntheticShapes
from train.data.wds import WebDatasetSource
from train.models import Components, build_tiny, load_pretrained


def build_components(model: DictConfig) -> Components:
    """model.pretrained (directory or hub id) or the tiny model built from model.tiny."""
    if model.pretrained:
        try:
            return load_pretrained(model.pretrained, revision=model.revision, variant=model.variant,
                                   prediction_type=model.prediction_type)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.pretrained={model.pretrained!r} could not be loaded ({e}). Give a local "
                              "diffusers directory (as save_pretrained writes it) or a hub id that is cached "
                              "(HF_HUB_OFFLINE=1), or use model=tiny") from e
    tiny = OmegaConf.to_container(model.tiny, resolve=True)
    return build_tiny(**tiny, prediction_type=model.prediction_type or "epsilon")


def native_resolution(components: Components) -> int:
    """Pixels the UNet was built for: sample_size x the VAE's downsampling factor."""
    factor = 2 ** (len(components.vae.config.block_out_channels) - 1)
    return int(components.unet.config.sample_size) * factor


def build_dataset(data: DictConfig, resolution: int, seed: int = 0):
    """The data source named by data.name; a bad path stops here, before any model is built."""
    try:
        if data.name == "synthetic":
            return SyntheticShapes(num_unique=data.num_unique, num_duplicated=data.num_duplicated,
                                   repeats=data.repeats, resolution=resolution, seed=data.seed)
        if data.name == "webdataset":
            return WebDatasetSource(list(data.shards) if OmegaConf.is_list(data.shards) else data.shards,
                                    seed=seed, shuffle_buffer=data.shuffle_buffer, resampled=data.resampled,
                                    samples_per_epoch=data.samples_per_epoch, counts_file=data.counts_file,
                                    min_size=data.min_size, max_pixels=data.max_pixels)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from e
    raise ConfigError(f"data.name={data.name!r}: unknown data source; choose data=synthetic|webdataset")


def build_filter(filter_cfg: DictConfig, num_train_timesteps: int):
    kwargs = {k: v for k, v in OmegaConf.to_container(filter_cfg, resolve=True).items() if k != "name"}
    if filter_cfg.name == "timestep":
        kwargs["num_train_timesteps"] = num_train_timesteps
    return build_policy(filter_cfg.name, **kwargs)
