"""Score prompts for memorization with the detectors of filtering.detection and, with labelled sets, report AUC and
TPR at low FPR per detector and grid cell (evaluation/detect_report.py).

    python launch/detect.py pipeline=<dir> memorized=sets:sdv1_500_memorized.jsonl \
        nonmemorized=sets:sd1_nonmemorized_500.txt detectors=[magnitude,sharpness,bright_ending]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from memfilter.launch.config_check import ConfigError, run_or_exit  # noqa: E402


def run(cfg: DictConfig) -> dict:
    from memfilter.evaluation.detect import run_detectors
    from memfilter.evaluation.detect_report import write_report
    from memfilter.evaluation.generate import load_pipeline
    from memfilter.launch.builders import resolve_device, resolve_pretrained

    rows = _prompt_rows(cfg)
    out = Path(cfg.output)
    if (out / "metrics.json").exists():
        raise ConfigError(f"output={out} already holds a detection run (metrics.json): give another output")
    steps = list(cfg.grid_steps or [cfg.num_steps])
    gens = list(cfg.grid_generations or [cfg.num_generations])
    if max(steps) > cfg.num_steps or max(gens) > cfg.num_generations or min(steps + gens) < 1:
        raise ConfigError(f"grid_steps={steps} and grid_generations={gens} must lie in 1..num_steps="
                          f"{cfg.num_steps} and 1..num_generations={cfg.num_generations} (the pass they are taken "
                          "from)")
    device = resolve_device(cfg.device)
    try:
        pipe = load_pipeline(resolve_pretrained(cfg.pipeline), device)
    except (OSError, ValueError) as e:
        raise ConfigError(f"pipeline={cfg.pipeline!r} could not be loaded: {e}") from None
    try:
        run_ = run_detectors(pipe, [r["prompt"] for r in rows], detectors=list(cfg.detectors),
                             num_generations=cfg.num_generations, num_steps=cfg.num_steps,
                             num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                             seed=cfg.seed, batch_size=cfg.batch_size, resolution=cfg.resolution)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: cfg[k] for k in ("pipeline", "detectors", "num_generations", "num_steps", "num_inference_steps",
                                    "guidance_scale", "seed")}
    settings["detectors"] = list(settings["detectors"])
    result = write_report(out, rows, run_, steps=steps, generations=gens, fprs=list(cfg.fprs), settings=settings)
    for r in result["grid"]:
        if "auc" in r:
            f = f"{cfg.fprs[0]:g}"
            print(f"{r['detector']:>13} k={r['steps']} n={r['generations']}: AUC {r['auc']:.3f}  TPR@{f}FPR "
                  f"{r['tpr_at_fpr_strict'][f]:.3f} (Wen) {r['tpr_at_fpr_closest'][f]:.3f} (closest)")
    print(f"report: {out / 'report.md'}; scores: {out / 'scores.parquet'}")
    return result


def _prompt_rows(cfg: DictConfig) -> list[dict]:
    """The prompts of the labelled and unlabelled files, with label 1 / 0 / -1 and the file's name."""
    from memfilter.evaluation.prompts import load_prompt_file

    rows = []
    for path, label in [(cfg.memorized, 1), (cfg.nonmemorized, 0), (cfg.prompts, -1)]:
        if path:
            try:
                rows += [{**r, "label": label, "file": Path(path).name}
                         for r in load_prompt_file(path, limit=cfg.limit)]
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(str(e)) from None
    if not rows:
        raise ConfigError("no prompts: give memorized=<file> and nonmemorized=<file>, or prompts=<file>")
    return rows


@hydra.main(version_base="1.3", config_path="../conf", config_name="detect")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
