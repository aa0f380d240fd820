"""Mitigate memorization at inference (Wen et al.) or with a baseline, and write the images with their magnitudes.

    python launch/mitigate.py pipeline=<dir> prompts=<file> method=embedding target=1.5
    python launch/mitigate.py pipeline=<dir> prompts=<file> method=random_numbers num_words=4 output=mitigation-rna

Writes into `output` (default "mitigation"), in evaluation/generate.py's layout: <output>/<set>/<prompt>-<gen>.png
and <output>/<set>/index.parquet (generate's columns plus method, prompt_used, m_before, m_after, reached,
iterations), <set> being the prompt file's stem; then <output>/summary.json. A folder that holds an earlier run's
summary (or its images) is never written into.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from memfilter.launch.config_check import ConfigError, is_int, is_num, run_or_exit  # noqa: E402

SUMMARY = "summary.json"
SDXL_NOTE = ("SDXL: only encoder_hidden_states rows are optimised (or noised); the pooled text embedding and the "
             "time ids stay as the pipeline builds them")


def check_settings(cfg: DictConfig) -> None:
    """A ConfigError for the first setting that cannot work, before anything is loaded."""
    from memfilter.evaluation.mitigate import METHODS, check_method

    if cfg.method not in METHODS:
        raise ConfigError(f"method={cfg.method!r} is not a mitigation method; choose one of {', '.join(METHODS)}")
    if OmegaConf.is_missing(cfg, "pipeline") or not cfg.pipeline or not cfg.prompts:
        raise ConfigError("pipeline and prompts are required: python launch/mitigate.py pipeline=<diffusers dir or "
                          "hub id> prompts=<file> method=embedding target=<m>")
    rules = [("lr", is_num(cfg.lr) and cfg.lr > 0, "a number > 0"),
             ("max_iterations", is_int(cfg.max_iterations) and cfg.max_iterations >= 0, "an integer >= 0"),
             ("num_words", is_int(cfg.num_words) and cfg.num_words >= 0, "an integer >= 0"),
             ("sigma", is_num(cfg.sigma) and cfg.sigma >= 0, "a number >= 0"),
             ("target", cfg.target is None or (is_num(cfg.target) and cfg.target > 0), "null or a number > 0"),
             ("num_generations", is_int(cfg.num_generations) and cfg.num_generations >= 1, "an integer >= 1"),
             ("num_inference_steps", is_int(cfg.num_inference_steps) and cfg.num_inference_steps >= 1,
              "an integer >= 1")]
    for key, ok, must in rules:
        if not ok:
            raise ConfigError(f"{key}={cfg[key]!r} is invalid: must be {must}")
    try:
        check_method(cfg.method, cfg.target)          # method=embedding needs a target
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_output(out: Path, set_name: str) -> None:
    """No command overwrites an earlier run's files: a folder with this app's summary, or with images of the same
    set (an unfinished run), is refused."""
    if (out / SUMMARY).exists():
        raise ConfigError(f"output={out} already holds a mitigation run ({out / SUMMARY}); memfilter never "
                          "overwrites it: choose another folder, e.g. output=mitigation-2")
    images = out / set_name
    if images.is_dir() and any(images.iterdir()):
        raise ConfigError(f"output={out} already holds images of an unfinished run ({images}); choose another "
                          "folder, or delete that one yourself")


def run(cfg: DictConfig) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from memfilter.evaluation.generate import load_pipeline
    from memfilter.evaluation.mitigate import iter_mitigate
    from memfilter.evaluation.prompts import load_prompt_file
    from memfilter.filtering.detection import generation_seed
    from memfilter.launch.builders import resolve_device, resolve_pretrained

    t0 = time.time()
    check_settings(cfg)
    try:
        prompts = load_prompt_file(cfg.prompts, limit=cfg.limit)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    if not prompts:
        raise ConfigError(f"prompts={cfg.prompts}: the file holds no prompts")
    set_name, out = Path(str(cfg.prompts).removeprefix("sets:")).stem, Path(cfg.output)
    check_output(out, set_name)
    device = resolve_device(cfg.device)
    try:
        pipe = load_pipeline(resolve_pretrained(cfg.pipeline), device)
    except (OSError, ValueError) as e:
        raise ConfigError(f"pipeline={cfg.pipeline!r} could not be loaded: {e}") from None
    folder = out / set_name
    folder.mkdir(parents=True, exist_ok=True)
    table = []
    for rows in iter_mitigate(pipe, [p["prompt"] for p in prompts], cfg.method, target=cfg.target, lr=cfg.lr,
                              max_iterations=cfg.max_iterations, num_words=cfg.num_words, sigma=cfg.sigma,
                              num_generations=cfg.num_generations, num_inference_steps=cfg.num_inference_steps,
                              guidance_scale=cfg.guidance_scale, seed=cfg.seed, resolution=cfg.resolution):
        for r in rows:          # images are written as they come: a long list never sits in memory
            i, j, meta = r["prompt_index"], r["generation"], prompts[r["prompt_index"]]["meta"]
            path = folder / f"{i:05d}-{j:02d}.png"
            r.pop("image").save(path)
            table.append({"set": set_name, "prompt_id": i, "prompt": r["prompt"], "image_index": j,
                          "seed": generation_seed(cfg.seed, i, j), "path": str(path),
                          "dup_group": int(meta.get("dup_group", -1)),
                          "train_keys": list(map(str, meta.get("keys", []))),
                          "label": str(meta.get("type", meta.get("label", ""))),
                          **{k: r[k] for k in ("method", "prompt_used", "m_before", "m_after", "reached",
                                               "iterations", "stop_reason")}})
    pq.write_table(pa.Table.from_pylist(table), folder / "index.parquet")
    summary = _summary(cfg, table, set_name, family=type(pipe).__name__, seconds=time.time() - t0)
    (out / SUMMARY).write_text(json.dumps(summary, indent=1, default=str))
    _print(summary, out)
    return summary


def _summary(cfg: DictConfig, table: list[dict], set_name: str, *, family: str, seconds: float) -> dict:
    """What summary.json holds: the settings, m before and after, which prompts reached the target."""
    import numpy as np

    before, after = (np.array([r[k] for r in table]) for k in ("m_before", "m_after"))
    stats = lambda a: {"mean": float(a.mean()), "median": float(np.median(a)), "max": float(a.max())}  # noqa: E731
    prompts = sorted({r["prompt_id"] for r in table})
    summary = {"method": cfg.method,
               "settings": OmegaConf.to_container(cfg, resolve=True),
               "pipeline_class": family, "set": set_name, "n_prompts": len(prompts), "n_images": len(table),
               "m_before": stats(before), "m_after": stats(after)}
    if cfg.target is not None:        # any method can be measured against a target, for comparison
        summary["fraction_below_target"] = {"before": float((before < cfg.target).mean()),
                                            "after": float((after < cfg.target).mean())}
    if cfg.method == "embedding":
        first = {r["prompt_id"]: r for r in table if r["image_index"] == 0}
        missed = [i for i in prompts if not first[i]["reached"]]
        summary["reached"] = {"prompts": len(prompts) - len(missed), "of": len(prompts),
                              "not_reached_prompt_ids": missed,
                              "note": "not reached: stopped at max_iterations with some generation's m >= target"}
        summary["iterations_mean"] = float(np.mean([first[i]["iterations"] for i in prompts]))
    if family == "StableDiffusionXLPipeline":
        summary["conditioning_note"] = SDXL_NOTE
    summary["files"] = {"index": f"{set_name}/index.parquet", "images": f"{set_name}/"}
    summary["wall_seconds"] = round(seconds, 1)
    return summary


def _print(summary: dict, out: Path) -> None:
    b, a = summary["m_before"], summary["m_after"]
    print(f"mitigation ({summary['method']}): {summary['n_prompts']} prompts, {summary['n_images']} images")
    print(f"  m at step 1, mean (max): before {b['mean']:.4g} ({b['max']:.4g})  "
          f"after {a['mean']:.4g} ({a['max']:.4g})")
    if "reached" in summary:
        r = summary["reached"]
        missed = r["of"] - r["prompts"]
        print(f"  target {summary['settings']['target']:g} reached for {r['prompts']}/{r['of']} prompts (mean "
              f"{summary['iterations_mean']:.1f} iterations)" + (f"; {missed} not reached: stopped at max_iterations="
                                                                 f"{summary['settings']['max_iterations']}"
                                                                 if missed else ""))
    print(f"  images and index: {out / summary['files']['index']}\n  summary: {out / SUMMARY}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="mitigate")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
