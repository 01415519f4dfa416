#!/usr/bin/env bash
# Baselines + ablations on the embedded SmolLM2-135M (issue 7): train the learned systems, then one
# `python -m src.compare` over every method at k = 4 and 8 of 30 layers and the Table 3 ablations.
# Usage: bash experiments/baselines_smollm2.sh [train|compare|all]   (default all; trained runs are reused)
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE="${1:-all}"
RUNS="${PROJECT_ROOT:-.}/outputs/train/runs"
PY="${PYTHON:-python}"

train_once() {  # name, overrides...: skip when the run already exported its checkpoint
  local name="$1"; shift
  if [ -f "$RUNS/compare_$name/flexidepth/flexidepth_config.json" ]; then
    echo "[reuse] $name"; return
  fi
  echo "[train] $name: $*"
  "$PY" -m src.train run_name="compare_$name" logger=csv "$@"
}

if [ "$STAGE" = train ] || [ "$STAGE" = all ]; then
  train_once flexidepth_a1e-3 loss.target_layers_skipped=null loss.alpha=1e-3          # 3.46 layers under the earlier 40-step ce recipe (LOG, 2026-11-28)
  train_once flexidepth_a2e-3 loss.target_layers_skipped=null loss.alpha=2e-3          # aimed at k = 8
  train_once mindskip_a2e-3 method=mindskip loss.target_layers_skipped=null loss.alpha=2e-3   # compare also matches its threshold to k
  train_once abl_linear_router skip=linear_router loss.target_layers_skipped=null loss.alpha=1e-3
  train_once abl_no_adapter skip=no_adapter loss.target_layers_skipped=null loss.alpha=1e-3
  train_once abl_no_kv skip=no_kv loss.target_layers_skipped=null loss.alpha=1e-3
  train_once abl_rank24 skip.adapter_rank=24 loss.target_layers_skipped=null loss.alpha=1e-3
fi
if [ "$STAGE" = compare ] || [ "$STAGE" = all ]; then
  "$PY" -m src.compare experiment_name=smollm2_baselines runs_dir="$RUNS"
fi
