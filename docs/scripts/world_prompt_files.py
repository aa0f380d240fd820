"""Prompt files of a toy world for the detection app: its duplicated captions (memorized) and a seeded sample of
its unique ones (not memorized).

    python docs/scripts/world_prompt_files.py /tmp/wm1/world /tmp/wm1/prompts --unique 64
    python launch/detect.py pipeline=/tmp/wm1/unfiltered memorized=/tmp/wm1/prompts/duplicated.txt \
        nonmemorized=/tmp/wm1/prompts/unique.txt detectors=[magnitude,sharpness,bright_ending] output=/tmp/wm1/det
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from a checkout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("world_dir")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--unique", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    from memfilter.toyworld.mitigation import study_prompts
    from memfilter.toyworld.world import load_world

    _, prompts, n_dup = study_prompts(load_world(a.world_dir), a.unique, a.seed)
    a.out_dir.mkdir(parents=True, exist_ok=False)
    (a.out_dir / "duplicated.txt").write_text("\n".join(prompts[:n_dup]) + "\n")
    (a.out_dir / "unique.txt").write_text("\n".join(prompts[n_dup:]) + "\n")
    print(f"{n_dup} duplicated and {len(prompts) - n_dup} unique prompts in {a.out_dir}")


if __name__ == "__main__":
    main()
