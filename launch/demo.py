"""The toy-world demo: memorization that really happens on a laptop, and the filter preventing it.

    python launch/demo.py                                   # ~7.5 minutes on 2 CPU cores
    python launch/demo.py "runs.filtered='filter=fixed filter.threshold=1.5'" output_dir=outputs/demo/fixed
    python launch/demo.py world.repeats=80 "train='max_train_steps=600 optim.learning_rate=1e-3'"

`train` and each entry of `runs` are launch/train.py command-line overrides in one string (quoted for
Hydra, since they hold `=`).

The world's settings are `world.*`, composed from the world group (conf/world/default.yaml: the same world
as `data=world` and `launch/prepare.py input.kind=world`); captions name shape and colour, e.g. "a red circle".
With world.augment=true every run is also given center_crop=false random_flip=true (AUGMENT_OVERRIDES), before
`train` and its own overrides: the wider appearances are then seen shifted and mirrored, as in a real fine-tune.

1. builds the world's fine-tuning set (duplicated and unique items) as webdataset shards with the prep code;
2. fine-tunes the shipped base model (builtin:world-base) on it, once per entry of `runs` (by default
   without a filter, with the default filter (filter=item, dropped samples anchored), and with filter=item leaving
   its dropped samples out), each a normal
   `launch/train.py` run in <output_dir>/<run>;
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
from omegaconf import DictConfig, ListConfig, OmegaConf  # noqa: E402

from memfilter.launch.config_check import ConfigError, check_train_config, check_value, is_int, run_or_exit  # noqa: E402

log = logging.getLogger("memfilter.demo")

_RULES = [
    ("world.num_unique", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    ("world.num_duplicated", lambda v: is_int(v) and v >= 1, "an integer >= 1 (the demo needs duplicated items)"),
    ("world.repeats", lambda v: is_int(v) and v >= 2, "an integer >= 2"),
    ("world.shard_size", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    ("world.augment", lambda v: isinstance(v, bool), "true or false"),
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


# What a run on an augmented world (world.augment=true) is told, as diffusers' flags say it: random crops of the
# wider appearances and random horizontal flips. Before the demo's `train` and the run's own overrides, which win.
AUGMENT_OVERRIDES = ("center_crop=false", "random_flip=true")


def run_overrides(cfg: DictConfig, name: str, shards: str, run_dir: Path, seed: int) -> list[str]:
    """The launch/train.py overrides of run `name` of the demo: the augmentation an augmented world needs,
    the demo's `train`, the world's shards, the run's directory and seed, then the run's own overrides
    (`runs.<name>`; a deduplication baseline's are filter=none)."""
    own = _overrides(cfg.runs[name]) if name in cfg.runs else ["filter=none"]
    return [*(AUGMENT_OVERRIDES if cfg.world.augment else ()), *_overrides(cfg.train), "data=webdataset",
            f"data.shards='{shards}'", f"output_dir='{run_dir}'", f"seed={seed}", *own]


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
    """The demo once (`seed`, `world.seed`), or once per seed of `seeds` (each in <output_dir>/seed-<S>, with
    seed = world.seed = S) and a report of mean and spread across them. Returns the results."""
    from memfilter.toyworld.report import write_seeds_report

    for key, ok, must in _RULES:
        check_value(cfg, key, ok, must)
    if not cfg.runs or len(cfg.runs) < 2:
        raise ConfigError("runs: needs at least two runs (name: 'train overrides') to compare, e.g. the default "
                          "runs.unfiltered='filter=none' and runs.filtered='filter=item'")
    if cfg.seeds is not None and (not isinstance(cfg.seeds, (list, ListConfig)) or not cfg.seeds
                                  or not all(is_int(s) for s in cfg.seeds) or len(set(cfg.seeds)) != len(cfg.seeds)):
        raise ConfigError(f"seeds={cfg.seeds!r} is invalid: must be null or a list of distinct integers, "
                          "e.g. 'seeds=[0,1,2]'")
    for b in cfg.baselines or []:
        if b not in ("exact", "near"):
            raise ConfigError(f"baselines: {b!r} is not a deduplication baseline; use exact and/or near")
    out = Path(cfg.output_dir).resolve()
    if out.is_dir() and any(out.iterdir()) and not (cfg.reuse_runs or cfg.reuse_reports):
        raise ConfigError(f"output_dir={out} already holds a demo; memfilter never overwrites one: continue it with "
                          "reuse_runs=true (finished runs are kept, interrupted ones resume), or choose another "
                          "output_dir")
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "demo_config.yaml", resolve=True)
    if cfg.seeds is None:
        return _run_seed(cfg, int(cfg.seed), int(cfg.world.seed), out)["results"]
    per_seed = {int(s): _read_seed(out / f"seed-{s}", list(cfg.runs)) if cfg.reuse_reports else None
                for s in cfg.seeds}
    per_seed = {s: r or _run_seed(cfg, s, s, out / f"seed-{s}") for s, r in per_seed.items()}
    names = list(cfg.runs)
    path = write_seeds_report(per_seed, out, unfiltered=names[0], filtered=names[1])
    _print_seeds(path)
    return {s: r["results"] for s, r in per_seed.items()}



def _read_seed(seed_dir: Path, runs: list[str]) -> dict | None:
    """A finished seed's numbers from its report.json (reuse_reports=true), or None when it lacks a run."""
    path = seed_dir / "report.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if not set(runs) <= set(data.get("results", {})):
        return None
    return {"results": data["results"], "runs": data["runs"], "world": data["world"]}

def _run_seed(cfg: DictConfig, seed: int, world_seed: int, out: Path) -> dict:
    """World, fine-tunes, evaluation and report of one seed in `out`."""
    from rich.console import Console

    from memfilter.launch.builders import build_world
    from memfilter.toyworld.report import write_report
    from memfilter.toyworld.world import prepare_world, shard_urls, world_to_dict

    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    timings, t0 = {}, time.time()
    world = build_world(cfg.world, seed=world_seed)
    data = {"": out / "world", **{f"dedup-{b}": out / f"world-dedup-{b}" for b in cfg.baselines or []}}
    console.rule(f"[bold]1/4 the world (seed {world_seed})[/] -> {data['']}")
    for name, data_dir in data.items():           # the world, and its deduplicated copies (the baselines)
        if not (cfg.reuse_runs and (data_dir / "world.json").is_file()):
            prepare_world(world, data_dir, shard_size=cfg.world.shard_size, seed=seed, overwrite=True,
                          dedup=name[len("dedup-"):] if name else "none")
    timings["world"] = time.time() - t0
    runs_cfg = {**{n: _overrides(cfg.runs[n]) for n in cfg.runs},
                **{n: ["filter=none"] for n in data if n}}
    configs = {}                      # every run's config is composed and checked before the first one starts
    for name in runs_cfg:
        urls = shard_urls(data[name] if name in data and name else data[""])
        overrides = run_overrides(cfg, name, urls, out / name, seed)
        configs[name] = (overrides, _train_config(overrides))
        check_train_config(configs[name][1], _cuda())
    runs = {name: _fine_tune(cfg, console, out, name, k, configs, runs_cfg, timings)
            for k, name in enumerate(configs)}
    results, records = _evaluate(cfg, console, out, world, seed, configs, timings)
    console.rule("[bold]4/4 report[/]")
    timings["total"] = time.time() - t0
    names = list(cfg.runs)
    path = write_report(results, out, world=world_to_dict(world), runs=runs, unfiltered=names[0],
                        filtered=names[1], records=records, timings=timings)
    _print_seed(console, results, runs, names, path, timings)
    return {"results": results, "runs": runs, "world": world_to_dict(world)}


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _fine_tune(cfg, console, out: Path, name: str, k: int, configs: dict, runs_cfg: dict, timings: dict) -> dict:
    """One launch/train.py run (or the finished one, with reuse_runs)."""
    from memfilter.launch import train as train_app

    overrides, tcfg = configs[name]
    done = out / name / "train_summary.json"
    head = f"[bold]2/4 fine-tune {k + 1}/{len(configs)}: {name}[/]"
    if cfg.reuse_runs and done.is_file() and (out / name / "model_index.json").is_file():
        console.rule(head + " (reused: reuse_runs=true)")
        return {"overrides": runs_cfg[name], "summary": json.loads(done.read_text()), "run_dir": str(out / name)}
    if (out / name).is_dir() and any((out / name).iterdir()):      # reuse_runs: an interrupted run resumes
        overrides = [*overrides, "resume_from_checkpoint=latest"]
        tcfg = _train_config(overrides)
    console.rule(head)
    console.print("python launch/train.py " + " ".join(f'"{o}"' if set(o) & set(" {}'[]") else o
                                                       for o in overrides), soft_wrap=True, highlight=False,
                  markup=False)
    t = time.time()
    summary = train_app.run(tcfg)
    timings[f"fine-tune {name}"] = time.time() - t
    return {"overrides": runs_cfg[name], "summary": summary, "run_dir": str(out / name)}


def _evaluate(cfg, console, out: Path, world, seed: int, configs: dict, timings: dict) -> tuple[dict, dict]:
    """The base (evaluate_base) and every run, evaluated in the world."""
    from memfilter.evaluation.generate import load_pipeline
    from memfilter.toyworld.evaluate import WorldEvalSettings, evaluate_world, replication_bar, training_descriptors
    from memfilter.launch.builders import resolve_pretrained

    console.rule("[bold]3/4 evaluation[/]")
    settings = WorldEvalSettings(**OmegaConf.to_container(cfg.evaluation, resolve=True), seed=seed)
    train_desc = training_descriptors(world)
    bar = replication_bar(world, train_desc[1], settings.fresh_items, settings.bar_quantile)
    names = list(configs)
    pipelines = {name: out / name for name in names}
    if cfg.evaluate_base:
        pipelines = {"base": Path(resolve_pretrained(configs[names[0]][1].model.pretrained)), **pipelines}
    results, records = {}, {}
    for name, path in pipelines.items():
        te = time.time()
        rec = out / name / "records" if name in configs else None
        results[name] = evaluate_world(load_pipeline(path), world, settings, records_dir=rec, bar=bar,
                                       train=train_desc)
        records[name] = rec
        timings[f"evaluate {name}"] = time.time() - te
        d, r = results[name]["detection"], results[name]["replication"]["duplicated"]
        console.print(f"{name}: detection AUC {d['auc']:.3f}, duplicated prompts replicated "
                      f"{r['replicated_fraction']:.1%}, fidelity {results[name]['fidelity']['duplicated']['all']:.1%}")
    return results, records


def _print_seed(console, results: dict, runs: dict, names: list, path: Path, timings: dict) -> None:
    from rich.table import Table

    from memfilter.toyworld.report import targets

    table = Table(title=f"memfilter toy-world demo: {path}")
    for col in ("run", "AUC step 1", "dup. replicated", "dup. fidelity", "unique fidelity", "dup. kept", "unique kept"):
        table.add_column(col)
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    for name, res in results.items():
        s = runs.get(name, {}).get("summary") or {}
        table.add_row(name, f"{res['detection']['auc']:.3f}",
                      pct(res['replication']['duplicated']['replicated_fraction']),
                      pct(res['fidelity']['duplicated']['all']), pct(res['fidelity']['unique']['all']),
                      pct(s.get("dup_kept_fraction")), pct(s.get("nondup_kept_fraction")))
    console.print(table)
    for c in targets(results, names[0], names[1]):
        console.print(f"[{'green' if c['met'] else 'red'}]{'met' if c['met'] else 'NOT met'}[/] {c['target']}: "
                      f"{c['value']}")
    console.print(f"total {timings['total']:.0f} s; report: {path}")


def _print_seeds(path: Path) -> None:
    from rich.console import Console
    from rich.markdown import Markdown

    text = path.read_text()
    Console().print(Markdown(text.split("\n## Per seed")[0]))
    Console().print(f"report: {path}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="demo")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    main()
