#!/usr/bin/env bash
# Released two-stage recipe: stage 1 (Tulu-3, alpha 1e-4), then stage 2 (open-perfectblend, alpha 1e-5)
# warm-started from stage 1's router/adapter export. Each stage prints the alpha it uses: by default the
# README value x 8 processes (released_alpha.use=reproduce, docs/released-differences.md); pass
# released_alpha.use=face to this script for the value as written. Both stages use stable run folders, so re-running this
# script after a crash resumes the unfinished stage (resume=auto) and skips a finished stage 1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${PROJECT_ROOT:-.}/outputs/train/runs"
STAGE1="$ROOT/released_stage1_llama3_8b/flexidepth"
if [ ! -f "$STAGE1/flexidepth_config.json" ]; then
  python -m src.train experiment=released_stage1_llama3_8b resume=auto "$@"
fi
python -m src.train experiment=released_stage2_llama3_8b init_from="$STAGE1" "$@"
