#!/usr/bin/env bash
# Paper v1 recipe on 8 GPUs (conf/experiment/paper_v1_llama3_8b.yaml). Extra args are Hydra overrides.
# On SLURM: add `hydra/launcher=submitit_slurm hydra.launcher.partition=<p> --multirun`.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m src.train experiment=paper_v1_llama3_8b resume=auto "$@"
