"""Explain prompts (Wen et al.): per-token significance of each prompt, as JSON and one PNG per prompt.

    python launch/explain.py pipeline=<dir> prompt="a red circle on the left"
    python launch/explain.py pipeline=<dir> prompts=<file> limit=10 output=explanation-run2
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from memfilter.launch.config_check import ConfigError, run_or_exit  # noqa: E402

SETTINGS = ("pipeline", "num_generations", "num_steps", "num_inference_steps", "guidance_scale", "seed")
DEFINITION = ("score of token i = mean over num_generations initial noises and the first num_steps steps of the "
              "classifier-free-guidance DDIM trajectory of || d m / d e_p[i] ||_2 (L2 over the embedding dimension), "
              "m = || eps(x_t, t, e_p) - eps(x_t, t, e_0) ||_2, e_p the prompt's own encoder_hidden_states rows; "
              "padding positions are left out")


def _image_name(i: int) -> str:
    return f"prompt-{i:03d}.png"


def _prompt_rows(cfg: DictConfig) -> list[dict]:
    """[{prompt, meta}] from prompt=... or prompts=<file>, checked: exactly one of them, and not empty."""
    from memfilter.evaluation.prompts import load_prompt_file

    if cfg.prompt is not None and cfg.prompts:
        raise ConfigError("prompt and prompts are both set: give one prompt with prompt=\"...\" or a file with "
                          "prompts=<file>, not both")
    if cfg.prompt is not None:
        if not str(cfg.prompt).strip():
            raise ConfigError("prompt='' is empty: give the prompt to explain, e.g. prompt=\"a red circle\"")
        return [{"prompt": str(cfg.prompt), "meta": {}}]
    if not cfg.prompts:
        raise ConfigError("no prompts: give prompt=\"...\" or prompts=<file> (.txt, .jsonl or .csv)")
    try:
        rows = load_prompt_file(cfg.prompts, limit=cfg.limit)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"prompts={cfg.prompts!r}: {e}") from None
    if not rows:
        raise ConfigError(f"prompts={cfg.prompts!r} holds no prompts: give a file with at least one")
    return rows


def _check_settings(cfg: DictConfig, out: Path, n_prompts: int) -> None:
    """Refuse, before the model loads, what cannot work or would overwrite an earlier run's files."""
    if not 1 <= cfg.num_steps <= cfg.num_inference_steps:
        raise ConfigError(f"num_steps={cfg.num_steps}: must be between 1 and num_inference_steps="
                          f"{cfg.num_inference_steps} (the first k steps of the schedule are averaged)")
    if cfg.num_generations < 1:
        raise ConfigError(f"num_generations={cfg.num_generations}: must be at least 1")
    used = [p for p in [out / "explanation.json", *(out / _image_name(i) for i in range(n_prompts))] if p.exists()]
    if used:
        raise ConfigError(f"output={str(out)!r} already holds {used[0].name} from an earlier run: choose a new "
                          "folder with output=<dir> (or move the old one away); nothing is overwritten")


def run(cfg: DictConfig) -> dict:
    from memfilter.evaluation.explain import explain_prompts, render_tokens
    from memfilter.evaluation.generate import load_pipeline
    from memfilter.launch.builders import resolve_device, resolve_pretrained
    from memfilter.train.families import from_pipeline

    rows = _prompt_rows(cfg)
    out = Path(cfg.output)
    _check_settings(cfg, out, len(rows))
    device = resolve_device(cfg.device)
    try:
        pipe = load_pipeline(resolve_pretrained(cfg.pipeline), device)
    except (OSError, ValueError) as e:
        raise ConfigError(f"pipeline={cfg.pipeline!r} could not be loaded: {e}") from None
    records = explain_prompts(pipe, [r["prompt"] for r in rows], num_generations=cfg.num_generations,
                              num_steps=cfg.num_steps, num_inference_steps=cfg.num_inference_steps,
                              guidance_scale=cfg.guidance_scale, seed=cfg.seed, resolution=cfg.resolution)
    out.mkdir(parents=True, exist_ok=True)
    for i, (rec, row) in enumerate(zip(records, rows)):
        rec["image"] = render_tokens(rec["tokens"], rec["scores"], out / _image_name(i)).name
        rec["meta"] = row["meta"]
    resolution = cfg.resolution or from_pipeline(pipe).native_resolution()
    result = {"settings": {**{k: cfg[k] for k in SETTINGS}, "resolution": resolution, "device": device},
              "definition": DEFINITION, "prompts": records}
    (out / "explanation.json").write_text(json.dumps(result, indent=1, default=str))   # last: marks a finished run
    for rec in records:
        top = max(range(1, len(rec["tokens"]) - 1), key=lambda j: rec["scores"][j], default=None)
        top_token = rec["tokens"][top] if top is not None else "-"
        print(f"m {rec['magnitude']:.3f}  top token {top_token!r}  {rec['prompt'][:70]}")
    print(f"explanation: {out / 'explanation.json'} and {len(records)} PNG")
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="explain")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
