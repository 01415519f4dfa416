#!/usr/bin/env bash
# Issue 23, T2 on the embedded SmolLM2-135M: trains the three presets that are each meant to be both faster and
# better than ShortGPT with k = 2 / 4 / 6 layers really deleted (conf/experiment/smollm2_static_k2.yaml,
# smollm2_hybrid_k4.yaml, smollm2_hybrid_k6.yaml; ~12 min each on the 2-core CPU), then times them against the
# base and pruned ShortGPT in one `src.speed` run (~20 min) that also measures every system's held-out perplexity.
# A preset whose run folder already holds an exported checkpoint is not trained again.
# Usage: bash experiments/speed_vs_shortgpt_smollm2.sh [extra src.speed overrides, e.g. rounds=3]
# Timings are only meaningful on an otherwise idle machine; the result is outputs/speed/runs/<run>/speed.md
# (the table "Best FlexiDepth point at least as fast as each ShortGPT point" answers T2 cell by cell).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${PROJECT_ROOT:-.}/outputs/train/runs"
for preset in smollm2_static_k2 smollm2_hybrid_k4 smollm2_hybrid_k6; do
  if [[ -f "$RUNS/$preset/flexidepth/flexidepth.safetensors" ]]; then
    echo "$preset: using the checkpoint in $RUNS/$preset"
  else
    python -m src.train experiment="$preset"
  fi
done
python -m src.speed ckpt_path="$RUNS/smollm2_static_k2" \
  "more_ckpts=[$RUNS/smollm2_hybrid_k4,$RUNS/smollm2_hybrid_k6]" model.dtype=float32 \
  'taus=[0.3,0.5,0.7]' 'shortgpt_k=[2,4,6]' always_run_max_skip=0.1 calibration_texts=16 \
  prompts=2 new_tokens=16 rounds=7 batch=0 prefill_length=0 ppl_max_tokens=1024 text_decode=false \
  run_name="speed_vs_shortgpt_$(date +%Y-%m-%d_%H-%M-%S)" "$@"
