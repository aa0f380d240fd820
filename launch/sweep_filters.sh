#!/bin/bash
# Ablation over filter policies, one run directory each under $ROOT (default outputs/sweep-filters).
# Extra arguments are Hydra overrides for every run, e.g.  bash launch/sweep_filters.sh model=sd15 max_train_steps=5000
# With a GPU node per run, prefer Hydra's multirun with a SLURM launcher plugin; this script is the plain loop.
set -euo pipefail
ROOT=${ROOT:-outputs/sweep-filters}
LAUNCH=${LAUNCH:-python}            # e.g. LAUNCH="accelerate launch --multi_gpu --num_processes 8"
for f in none fixed batch_quantile running_quantile timestep; do
  $LAUNCH launch/train.py filter=$f output_dir="$ROOT/$f" "$@"
done
python - "$ROOT" <<'PY'
import json, sys, pathlib
root = pathlib.Path(sys.argv[1])
print(f"{'filter':18s} {'kept':>6s} {'kept dup':>9s} {'kept non-dup':>13s}")
for d in sorted(root.iterdir()):
    s = json.loads((d / "train_summary.json").read_text())
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    print(f"{d.name:18s} {fmt(s['kept_fraction']):>6s} {fmt(s['dup_kept_fraction']):>9s} {fmt(s['nondup_kept_fraction']):>13s}")
PY
