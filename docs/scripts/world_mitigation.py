"""Inference-time mitigation on a toy-world fine-tune: every method's replication and fidelity on the same x_T.

    python launch/demo.py 'runs={unfiltered: filter=none}' seed=1 world.seed=1 output_dir=/tmp/wm1
    python docs/scripts/world_mitigation.py /tmp/wm1/unfiltered /tmp/wm1/world --out docs/results/mitigation-seed1.md

(toyworld/mitigation.py does the work; this script loads the run's exported pipeline and the world, and writes the
table as Markdown and the numbers as JSON beside it.)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from a checkout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="a fine-tune's output_dir (its exported pipeline)")
    p.add_argument("world_dir", help="the world's data folder (world.json), as the demo writes it")
    p.add_argument("--out", type=Path, required=True, help="Markdown file to write (never overwritten)")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--unique", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-fpr", type=float, default=0.05)
    a = p.parse_args()
    if a.out.exists():
        raise SystemExit(f"--out {a.out} exists: choose another file")
    from memfilter.evaluation.generate import load_pipeline
    from memfilter.toyworld.mitigation import markdown, mitigation_study
    from memfilter.toyworld.world import load_world

    result = mitigation_study(load_pipeline(a.run_dir, "cpu"), load_world(a.world_dir), num_images=a.images,
                              num_unique=a.unique, seed=a.seed, target_fpr=a.target_fpr)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(f"# Mitigation at inference on {a.run_dir}\n\n" + markdown(result))
    a.out.with_suffix(".json").write_text(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    print(markdown(result))


if __name__ == "__main__":
    main()
