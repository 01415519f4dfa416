#!/bin/bash
# The GPU check (benchmarks/gpu_check.py) with what the GPU machine lacks carried in .gpu/ (git-ignored).
#   bash benchmarks/gpu_check.sh --fetch   # here (pip reaches the registry): .gpu/whl (wheels for Python 3.12,
#                                          # our pinned versions) and .gpu/tokenizer (the embedded tokenizer)
#   bash benchmarks/gpu_check.sh [args]    # on the GPU machine (carry .gpu): installs .gpu/whl into /tmp/site,
#                                          # then runs gpu_check.py [args] (tests, 8B-shape decode, ZeRO-2 fit)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fetch" ]; then
  PY=${PY:-.venv/bin/python}
  rm -rf .gpu && mkdir -p .gpu/whl .gpu/tokenizer
  # missing from the GPU image, or there in another version than we pin (versions read from our .venv)
  names="hydra-core omegaconf transformers tokenizers huggingface_hub safetensors hjson pydantic pydantic_core
         annotated-types typing-inspection"
  pins=$($PY -c "import importlib.metadata as m, sys; print(' '.join(f'{n}=={m.version(n)}' for n in sys.argv[1:]))" $names)
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl $pins
  # sdist-only packages: built here into pure-Python wheels
  $PY -m pip wheel -q --no-deps -w .gpu/whl "antlr4-python3-runtime==4.9.3" \
    "deepspeed==$($PY -c 'import importlib.metadata as m; print(m.version("deepspeed"))')"
  tok=$($PY -c "from src.models.embedded import ensure_converted; print(ensure_converted('bfloat16'))")
  cp "$tok"/tokenizer.json "$tok"/tokenizer_config.json .gpu/tokenizer/
  cp "$tok"/chat_template.jinja .gpu/tokenizer/ 2>/dev/null || true
  du -sh .gpu
  exit 0
fi
if [ -d .gpu/whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -d .gpu/tokenizer ]; then export FLEXIDEPTH_GPU_TOKENIZER=$PWD/.gpu/tokenizer; fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
exec python3 benchmarks/gpu_check.py "$@"
