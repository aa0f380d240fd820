"""Score prompts for memorization (Wen et al.) and, with labelled sets, report AUC and TPR at low FPR.

    python launch/detect.py pipeline=<dir> memorized=<file> nonmemorized=<file>
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
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from memfilter.evaluation.detect import score_prompts
    from memfilter.evaluation.detection import detection_metrics
    from memfilter.evaluation.generate import load_pipeline
    from memfilter.evaluation.prompts import load_prompt_file
    from memfilter.launch.builders import resolve_pretrained

    sets = [(cfg.memorized, 1), (cfg.nonmemorized, 0), (cfg.prompts, -1)]
    rows = []
    for path, label in sets:
        if path:
            try:
                rows += [{**r, "label": label, "file": Path(path).name} for r in load_prompt_file(path, limit=cfg.limit)]
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(str(e)) from None
    if not rows:
        raise ConfigError("no prompts: give memorized=<file> and nonmemorized=<file>, or prompts=<file>")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    try:
        pipe = load_pipeline(resolve_pretrained(cfg.pipeline), device)
    except (OSError, ValueError) as e:
        raise ConfigError(f"pipeline={cfg.pipeline!r} could not be loaded: {e}") from None
    scores, mags = score_prompts(pipe, [r["prompt"] for r in rows], num_generations=cfg.num_generations,
                                 num_steps=cfg.num_steps, num_inference_steps=cfg.num_inference_steps,
                                 guidance_scale=cfg.guidance_scale, seed=cfg.seed, batch_size=cfg.batch_size,
                                 resolution=cfg.resolution)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    table = [{"prompt": r["prompt"], "label": r["label"], "file": r["file"], "score": float(s),
              "type": str(r["meta"].get("type", ""))} for r, s in zip(rows, scores.tolist())]
    pq.write_table(pa.Table.from_pylist(table), out / "scores.parquet")
    result = {"settings": {k: cfg[k] for k in ("pipeline", "num_generations", "num_steps", "num_inference_steps",
                                               "guidance_scale", "seed")},
              "n_prompts": len(rows)}
    labelled = [(t["score"], t["label"]) for t in table if t["label"] >= 0]
    if {lab for _, lab in labelled} == {0, 1}:
        metrics = detection_metrics([s for s, _ in labelled], [lab for _, lab in labelled], fprs=tuple(cfg.fprs))
        result["metrics"] = {k: v for k, v in metrics.items() if k != "roc"}
        result["roc"] = metrics.get("roc")
        print(f"AUC {metrics['auc']:.3f}  " + "  ".join(f"TPR@{k}FPR {v:.3f}"
                                                       for k, v in metrics["tpr_at_fpr"].items())
              + f"  (n={cfg.num_generations}, steps={cfg.num_steps}, {len(labelled)} prompts)")
    (out / "metrics.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"scores: {out / 'scores.parquet'}")
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="detect")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
