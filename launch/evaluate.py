"""Evaluate a run: replication against its training images (SSCD or the named fallback) and quality.

    python launch/evaluate.py run_dir=outputs/train/<run>
    python launch/evaluate.py run_dir=<run> evaluation.descriptor=sscd evaluation.sscd_path=<file> \
        evaluation.inception_path=<file> evaluation.clip_path=<dir>
    python launch/evaluate.py compare=[outputs/train/a,outputs/train/b] output_dir=outputs/compare
    python launch/evaluate.py run_dir=<a toy-world run> toy_world=true    # the world's readers and copy detector
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from memfilter.launch.config_check import ConfigError, run_or_exit  # noqa: E402


def run(cfg: DictConfig) -> dict:
    """Evaluate cfg.run_dir (or compare cfg.compare); returns the report."""
    from memfilter.evaluation.report import compare

    if cfg.compare:
        reports = {}
        for d in cfg.compare:
            path = Path(d) / "eval" / "report.json" if (Path(d) / "eval").is_dir() else Path(d) / "report.json"
            if not path.exists():
                raise ConfigError(f"compare: {d} has no evaluation report ({path}); run "
                                  f"`python launch/evaluate.py run_dir={d}` first")
            reports[Path(d).name] = json.loads(path.read_text())
        out = Path(cfg.output_dir or f"outputs/compare/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
        compare(reports, out)
        print(f"comparison of {len(reports)} runs: {out / 'compare.md'}")
        return {"compare": str(out)}
    if not cfg.run_dir:
        raise ConfigError("run_dir is required: python launch/evaluate.py run_dir=<a memfilter run directory> "
                          "(or compare=[run_a,run_b])")
    return evaluate_run(cfg)


def evaluate_run(cfg: DictConfig) -> dict:
    from memfilter.evaluation.descriptors import load_descriptor
    from memfilter.evaluation.evaluate import EvalSettings, evaluate
    from memfilter.evaluation.generate import load_pipeline
    from memfilter.launch.builders import build_dataset, resolve_device

    run_dir = Path(cfg.run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"run_dir={run_dir}: no config.yaml; give the directory of a memfilter training run")
    train_cfg = OmegaConf.load(run_dir / "config.yaml")
    if cfg.toy_world:
        return evaluate_world_run(cfg, run_dir, train_cfg)
    e = cfg.evaluation
    pipeline = cfg.pipeline or run_dir          # the final pipeline sits at the run's root, as diffusers puts it
    if not cfg.pipeline and not e.generations and not (run_dir / "model_index.json").exists():
        raise ConfigError(f"run_dir={run_dir}: no final pipeline (model_index.json); the run did not "
                          "finish: resume it, or name a pipeline with pipeline=<dir>")
    device = resolve_device(cfg.device)
    try:
        descriptor = load_descriptor(e.descriptor, e.sscd_path, e.preprocessing, device=device)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    for key in ("inception_path", "clip_path"):
        if e[key] and not Path(e[key]).exists():
            raise ConfigError(f"evaluation.{key}={e[key]}: no such file or directory")
    source = build_dataset(train_cfg.data, train_cfg.resolution, train_cfg.seed)
    names = {f.name for f in dataclasses.fields(EvalSettings)}
    settings = EvalSettings(**{k: v for k, v in OmegaConf.to_container(e, resolve=True).items() if k in names},
                            seed=cfg.seed)
    if settings.resolution is None:
        settings.resolution = int(train_cfg.resolution)
    reference = None
    if e.quality_reference != "training":
        from memfilter.evaluation.training_set import iter_samples
        from memfilter.train.data.imagefolder import ImageFolderSource
        ref = ImageFolderSource(e.quality_reference)
        reference = [s["image"] for s in iter_samples(ref) if "skip" not in s][:e.max_reference]
    out = Path(cfg.output_dir or run_dir / "eval")
    info = {"name": run_dir.name, "run_dir": str(run_dir), "pipeline": str(pipeline),
            "filter": train_cfg.filter.get("name"), "steps": train_cfg.get("max_train_steps")}
    if e.generations:
        info["generations"] = str(e.generations)
    pipe = None if e.generations else load_pipeline(pipeline, device)
    report = evaluate(pipe, source, descriptor, out, settings,
                      cache_dir=e.cache_dir, reference_images=reference, run_info=info)
    print((out / "report.md").read_text())
    return report


def evaluate_world_run(cfg: DictConfig, run_dir: Path, train_cfg: DictConfig) -> dict:
    """A run fine-tuned on the toy world, measured as the demo measures it (toyworld.evaluate: step-1 detection,
    replication by the world's detail descriptor against its calibrated bar, prompt fidelity, the filter's decisions
    against the ground truth); report.json and report.md in <run_dir>/eval (or output_dir)."""
    from memfilter.evaluation.generate import load_pipeline
    from memfilter.launch.builders import build_world, resolve_device
    from memfilter.toyworld.evaluate import WorldEvalSettings, evaluate_world, to_json
    from memfilter.toyworld.world import load_world

    data = train_cfg.data
    if data.name == "world":
        world = build_world(data, prefix="data")
    elif data.name == "webdataset" and (Path(str(data.shards)).parent / "world.json").is_file():
        world = load_world(Path(str(data.shards)).parent)
    else:
        raise ConfigError(f"toy_world=true: run_dir={run_dir} was not trained on the toy world (data={data.name}, "
                          "and no world.json beside its shards); evaluate it with toy_world=false")
    if not (run_dir / "model_index.json").exists():
        raise ConfigError(f"run_dir={run_dir}: no final pipeline (model_index.json); the run did not finish")
    out = Path(cfg.output_dir or run_dir / "eval")
    if (out / "report.json").exists():
        raise ConfigError(f"{out} already holds an evaluation (report.json); memfilter never overwrites one: "
                          "choose another output_dir")
    settings = WorldEvalSettings(**OmegaConf.to_container(cfg.world_evaluation, resolve=True), seed=cfg.seed)
    result = evaluate_world(load_pipeline(run_dir, resolve_device(cfg.device)), world, settings,
                            records_dir=run_dir / "records")
    out.mkdir(parents=True, exist_ok=True)
    report = to_json(result)
    report["evaluated"] = {"name": run_dir.name, "run_dir": str(run_dir), "filter": train_cfg.filter.get("name")}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    r, f, d = result["replication"], result["fidelity"], result["detection"]
    lines = [f"# memfilter world evaluation: {run_dir.name}", "", "| prompts | replicated | items replicated | "
             "fidelity |", "| --- | --- | --- | --- |"]
    for name in ("duplicated", "unique", "concept"):
        if r.get(name):
            lines.append(f"| {name} | {r[name]['replicated_fraction']:.1%} | {r[name]['items_replicated']} | "
                         f"{f[name]['all']:.1%} |")
    lines += ["", f"Step-1 detection of duplicated vs unique training captions: AUC {d['auc']:.3f}.",
              f"Replication bar {r['bar']['bar']:.3f} ({result['descriptor']}).", ""]
    (out / "report.md").write_text("\n".join(lines))
    print((out / "report.md").read_text())
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
