"""The toy-world demo: memorization that really happens on a laptop, and the filter preventing it.

    python launch/demo.py                                   # ~7.5 minutes on 2 CPU cores
    python launch/demo.py "runs.filtered='filter=fixed filter.threshold=1.5'" output_dir=outputs/demo/fixed
    python launch/demo.py world.repeats=80 "train='max_train_steps=600 optim.learning_rate=1e-3'"

`train` and each entry of `runs` are launch/train.py command-line overrides in one string (quoted for
Hydra, since they hold `=`).

1. builds the world's fine-tuning set (duplicated and unique items) as webdataset shards with the prep code;
2. fine-tunes the shipped base model (builtin:world-base) on it, once per entry of `runs` (by default
   without and with the magnitude filter), each a normal `launch/train.py` run in <output_dir>/<run>;
3. evaluates the base and every run (step-1 detection, replication, prompt fidelity, filter decisions);
4. writes <output_dir>/report.md (+ report.json, grid.png, magnitudes.png, detection.png).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from launch.config_check import ConfigError, check_train_config, check_value, is_int, run_or_exit  # noqa: E402

log = logging.getLogger("memfilter.demo")

_RULES = [
    ("world.num_unique", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    ("world.num_duplicated", lambda v: is_int(v) and v >= 1, "an integer >= 1 (the demo needs duplicated items)"),
    ("world.repeats", lambda v: is_int(v) and v >= 2, "an integer >= 2"),
    ("world.shard_size", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    ("evaluation.num_images_per_prompt", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    ("evaluation.num_inference_steps", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    ("evaluation.bar_quantile", lambda v: isinstance(v, float) and 0 < v < 1, "a number in (0, 1), e.g. 0.99"),
]


def _overrides(value) -> list[str]:
    """Training overrides from a string ("a=1 b=2", split like a shell) or a list of strings."""
    import shlex

    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def _train_config(overrides: list[str]) -> DictConfig:
    """conf/train.yaml with `overrides`, as `python launch/train.py <overrides>` would see it."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train", overrides=overrides)
    from hydra import initialize_config_dir
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def run(cfg: DictConfig) -> dict:
    """Build the world, fine-tune each run, evaluate, report. Returns the report's results."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from evaluation.generate import load_pipeline
    from evaluation.world_eval import WorldEvalSettings, evaluate_world, replication_bar, training_descriptors
    from evaluation.world_report import targets, write_report
    from launch import train as train_app
    from launch.builders import resolve_pretrained
    from train.data.world import ToyWorld, prepare_world, shard_urls, world_to_dict

    for key, ok, must in _RULES:
        check_value(cfg, key, ok, must)
    if not cfg.runs or len(cfg.runs) < 2:
        raise ConfigError("runs: needs at least two runs (name: 'train overrides') to compare, e.g. the default "
                          "runs.unfiltered='filter=none' and runs.filtered='filter=timestep'")
    console = Console()
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "demo_config.yaml", resolve=True)
    timings, t0 = {}, time.time()
    settings = WorldEvalSettings(**OmegaConf.to_container(cfg.evaluation, resolve=True), seed=cfg.seed)
    names = list(cfg.runs)
    train_common = _overrides(cfg.train)
    # every run's config is composed and checked before the first one starts
    configs = {}
    world = ToyWorld(num_unique=cfg.world.num_unique, num_duplicated=cfg.world.num_duplicated,
                     repeats=cfg.world.repeats, seed=cfg.world.seed)
    data_dir = out / "world"

    console.rule(f"[bold]1/4 the world[/] -> {data_dir}")
    if not (cfg.reuse_runs and (data_dir / "world.json").is_file()):
        prepare_world(world, data_dir, shard_size=cfg.world.shard_size, seed=cfg.seed, overwrite=True)
    urls = shard_urls(data_dir)
    timings["world"] = time.time() - t0
    for name in names:
        overrides = [*train_common, "data=webdataset", f"data.shards='{urls}'", f"output_dir='{out / name}'",
                     f"seed={cfg.seed}", *_overrides(cfg.runs[name])]
        configs[name] = (overrides, _train_config(overrides))
        check_train_config(configs[name][1], torch.cuda.is_available())

    runs = {}
    for k, name in enumerate(names):
        overrides, tcfg = configs[name]
        done = out / name / "train_summary.json"
        if cfg.reuse_runs and done.is_file() and (out / name / "pipeline" / "model_index.json").is_file():
            console.rule(f"[bold]2/4 fine-tune {k + 1}/{len(names)}: {name}[/] (reused: reuse_runs=true)")
            runs[name] = {"overrides": _overrides(cfg.runs[name]), "summary": json.loads(done.read_text()),
                          "run_dir": str(out / name)}
            continue
        console.rule(f"[bold]2/4 fine-tune {k + 1}/{len(names)}: {name}[/]")
        console.print("python launch/train.py " + " ".join(f'"{o}"' if set(o) & set(" {}'[]") else o
                                                           for o in overrides), soft_wrap=True, highlight=False,
                      markup=False)
        t = time.time()
        summary = train_app.run(tcfg)
        timings[f"fine-tune {name}"] = time.time() - t
        runs[name] = {"overrides": _overrides(cfg.runs[name]), "summary": summary,
                      "run_dir": str(out / name)}

    console.rule("[bold]3/4 evaluation[/]")
    t = time.time()
    train_desc = training_descriptors(world)
    bar = replication_bar(world, train_desc[1], settings.fresh_items, settings.bar_quantile)
    results, records = {}, {}
    pipelines = {name: out / name / "pipeline" for name in names}
    if cfg.evaluate_base:
        base = configs[names[0]][1].model.pretrained
        pipelines = {"base": Path(resolve_pretrained(base)), **pipelines}
    for name, path in pipelines.items():
        te = time.time()
        pipe = load_pipeline(path)
        rec = out / name / "records" if name in runs else None
        results[name] = evaluate_world(pipe, world, settings, records_dir=rec, bar=bar, train=train_desc)
        records[name] = rec
        timings[f"evaluate {name}"] = time.time() - te
        d, r = results[name]["detection"], results[name]["replication"]["duplicated"]
        console.print(f"{name}: detection AUC {d['auc']:.3f}, duplicated prompts replicated "
                      f"{r['replicated_fraction']:.1%}, fidelity {results[name]['fidelity']['duplicated']['all']:.1%}")

    console.rule("[bold]4/4 report[/]")
    timings["total"] = time.time() - t0
    path = write_report(results, out, world=world_to_dict(world), runs=runs, unfiltered=names[0],
                        filtered=names[1], records=records, timings=timings)
    table = Table(title=f"memfilter toy-world demo: {path}")
    for col in ("run", "AUC step 1", "dup. replicated", "dup. fidelity", "unique fidelity", "dup. kept"):
        table.add_column(col)
    for name, res in results.items():
        s = runs.get(name, {}).get("summary") or {}
        table.add_row(name, f"{res['detection']['auc']:.3f}",
                      f"{res['replication']['duplicated']['replicated_fraction']:.1%}",
                      f"{res['fidelity']['duplicated']['all']:.1%}", f"{res['fidelity']['unique']['all']:.1%}",
                      "-" if s.get("dup_kept_fraction") is None else f"{s['dup_kept_fraction']:.1%}")
    console.print(table)
    for c in targets(results, names[0], names[1]):
        console.print(f"[{'green' if c['met'] else 'red'}]{'met' if c['met'] else 'NOT met'}[/] {c['target']}: "
                      f"{c['value']}")
    console.print(f"total {timings['total']:.0f} s; report: {path}")
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="demo")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    main()
