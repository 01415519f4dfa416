#!/usr/bin/env bash
# CPU alpha sweep on the embedded SmolLM2-135M, then the summary table + Pareto plot.
# Usage: bash experiments/smollm2_alpha_sweep.sh [extra Hydra overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
SWEEP_DIR="${PROJECT_ROOT:-.}/outputs/train/sweeps/smollm2_alpha_$(date +%Y-%m-%d_%H-%M-%S)"
python -m src.train experiment=smollm2_alpha_sweep +sweep=alpha loss.alpha=1e-3,3e-3,3e-2 \
  hydra.sweep.dir="$SWEEP_DIR" "$@"
python -m src.sweep_summary "sweep_dir=$SWEEP_DIR"
echo "summary: $SWEEP_DIR/summary.md, plot: $SWEEP_DIR/pareto.png"
