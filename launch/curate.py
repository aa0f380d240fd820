"""The curation pass as an app: score every sample of a dataset, on one process or many, and decide keep/drop.

    accelerate launch launch/curate.py model.pretrained=<dir or hub id> data=webdataset \\
        'data.shards="/data/shards/shard-{000000..000099}.tar"' output_dir=/data/curate/run1
    memfilter-curate model.pretrained=outputs/train/<run> unet=outputs/train/<run>/checkpoint-500 \\
        data=imagefolder data.path=<folder> output_dir=<dir>

Writes into output_dir: plan.json, parts/ (one Parquet part per chunk), then on rank 0 scores.parquet,
completeness.json and decisions/<name>/ (keep.txt, drop.txt, decisions.parquet, report.md/json, figures, and shards
with write_shards=true). A killed pass continues where it stopped when started again with the same output_dir.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from memfilter.launch.config_check import ConfigError, run_or_exit  # noqa: E402

log = logging.getLogger("memfilter.curate")


def settings(cfg: DictConfig):
    """(ScoreArgs, DecideArgs) of the config, checked by their fields."""
    from memfilter.filtering.curate import ScoreArgs
    from memfilter.filtering.curation import DecideArgs

    try:
        return (ScoreArgs(**OmegaConf.to_container(cfg.score, resolve=True)),
                DecideArgs(**OmegaConf.to_container(cfg.decide, resolve=True)))
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def check_output_dir(out: Path) -> str:
    """A new pass needs a new or empty output_dir; one holding this app's plan.json is continued."""
    if (out / "plan.json").is_file():
        return "continue"
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries:
        raise ConfigError(f"output_dir={out} holds something that is not a curation pass ({', '.join(entries[:4])}"
                          "); memfilter never overwrites it: choose another output_dir")
    return "new"


def load_scoring_model(cfg: DictConfig):
    """The model's components, with the UNet of a fine-tune's checkpoint when `unet` is given; and what scored."""
    import diffusers

    from memfilter.launch.builders import build_components
    from memfilter.train.families import FAMILIES

    c = build_components(cfg.model)
    scored_by = {"model": str(cfg.model.pretrained or "tiny model built from config"), "unet": None}
    if cfg.unet:
        path = Path(cfg.unet)
        sub = cfg.unet_subfolder if (path / cfg.unet_subfolder / "config.json").is_file() else None
        if sub is None and not (path / "config.json").is_file():
            raise ConfigError(f"unet={cfg.unet!r}: neither a UNet folder (config.json) nor a checkpoint with "
                              f"{cfg.unet_subfolder}/ (unet_subfolder=unet|unet_ema)")
        cls = getattr(diffusers, FAMILIES[c.family].component_classes["unet"])
        c.unet = cls.from_pretrained(str(path), subfolder=sub)
        scored_by["unet"] = str(path / sub) if sub else str(path)
    scored_by["question"] = (
        "what this fine-tune started to memorize (a checkpoint of a fine-tune on this data)" if cfg.unet else
        "what this model memorized (give unet=<checkpoint> to score a fine-tune's checkpoint instead)")
    return c, scored_by


def run(cfg: DictConfig) -> dict:
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from memfilter.filtering.curate import Scorer, check_plan, make_plan, pending_chunks, score_chunks
    from memfilter.launch.builders import build_dataset, native_resolution
    from memfilter.train.data.collate import CollateForTraining
    from memfilter.train.data.transforms import ImageTransform
    from memfilter.train.families import get_family

    score_args, decide_args = settings(cfg)
    state = PartialState(cpu=not torch.cuda.is_available())
    out = [str(Path(cfg.output_dir).resolve())]
    broadcast_object_list(out, from_process=0)
    out = Path(out[0])
    mode = check_output_dir(out)
    state.wait_for_everyone()
    components, scored_by = load_scoring_model(cfg)
    resolution = cfg.resolution or native_resolution(components)
    source = build_dataset(cfg.data, resolution, cfg.seed)
    plan = make_plan(source, score_args.chunk_size)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        try:
            check_plan(out, plan)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        from memfilter.launch.train import new_config_path
        OmegaConf.save(cfg, new_config_path(out, "continue"), resolve=True)
    state.wait_for_everyone()
    if not (out / "plan.json").is_file():
        raise ConfigError(f"output_dir={out}: rank 0 could not start the pass (see its error)")
    chunks = pending_chunks(out, plan, state.process_index, state.num_processes)
    state.wait_for_everyone()              # every rank has listed the finished chunks before any rank writes
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision, torch.float32)
    family = get_family(components)
    scorer = Scorer(family, score_args, resolution, state.device, dtype)
    collate = CollateForTraining(family.tokenize_fn(), ImageTransform(resolution, center_crop=True))
    log.info("rank %d: %d chunk(s) of %d to score (%s)", state.process_index, len(chunks), plan["chunks"], mode)
    score_chunks(source, plan, chunks, scorer, collate, out, rank=state.process_index,
                 progress=_progress(state, plan))
    state.wait_for_everyone()
    result = {}
    if state.is_main_process:
        from memfilter.launch.curate_finish import finish
        result = finish(cfg, out, plan, source, score_args, decide_args, scored_by)
    state.wait_for_everyone()
    return result


def _progress(state, plan: dict):
    if not state.is_main_process:
        return None
    from tqdm.auto import tqdm
    from memfilter.filtering.curation import expected_samples
    bar = tqdm(total=expected_samples(plan), unit="sample", desc="curate (rank 0)")
    return bar.update


@hydra.main(version_base="1.3", config_path="../conf", config_name="curate")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


def cli() -> None:
    import os
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()


if __name__ == "__main__":
    cli()
