#!/usr/bin/env bash
# Download the wheels the GPU campaign installs offline (python -m benchmarks.gpu; see benchmarks/gpu/README.md)
# into wheels/gpu/ (git-ignored), to be carried to a lent GPU machine that has no internet.
#
#   scripts/fetch-gpu-wheels.sh [DIR]        (default DIR: wheels/gpu of the checkout)
#
# Peers (pure Python; --no-deps because their dependencies, torch / triton / transformers, are on the GPU image):
#   liger-kernel, cut-cross-entropy, trl (trl also needs datasets/pandas/pyarrow to import, ~60 MiB more: not
#   fetched; the campaign does not use trl).
# Test tools for the GPU tests (pure Python): pytest (+ pluggy, iniconfig, pygments; exceptiongroup and tomli for
#   Python 3.10), hypothesis (+ sortedcontainers).
# Build tools for `pip install --no-build-isolation -e .` (pyproject's build-system), in case the image lacks them:
#   setuptools>=77, wheel, pybind11>=2.12 (pure Python), cmake>=3.18 and ninja (binary, Python-independent
#   py3-none-manylinux wheels for PLATFORM, default manylinux2014_x86_64; set PLATFORM=manylinux2014_aarch64
#   for an ARM host).
# Fails if the folder ends up over 60 MiB (the carry limit is 64 MiB for everything together).
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-wheels/gpu}"
platform="${PLATFORM:-manylinux2014_x86_64}"
pip="${PIP:-$(command -v pip3 || command -v pip)}"
[ -x .venv/bin/pip ] && pip="${PIP:-.venv/bin/pip}"
mkdir -p "$dest"

# pure-Python wheels only (py3-none-any), so that they install on whatever Python (>= 3.10) the image has
"$pip" download --quiet --no-deps --only-binary=:all: --platform any --implementation py --abi none \
    --python-version 3.10 --dest "$dest" \
    "liger-kernel>=0.5" "cut-cross-entropy" "trl>=0.20" \
    "pytest>=8" "pluggy" "iniconfig" "pygments" "exceptiongroup" "tomli" "hypothesis>=6.100" "sortedcontainers" \
    "setuptools>=77" "wheel" "pybind11>=2.12"
"$pip" download --quiet --no-deps --only-binary=:all: --platform "$platform" --dest "$dest" \
    "cmake>=3.18,<5" "ninja"

ls -l "$dest"
size_kib=$(du -sk "$dest" | cut -f1)
echo "fetch-gpu-wheels: $(ls "$dest"/*.whl | wc -l) wheels, $((size_kib / 1024)) MiB in $dest"
if [ "$size_kib" -gt $((60 * 1024)) ]; then
    echo "fetch-gpu-wheels: error: $dest is over 60 MiB; remove stale wheels (rm -r $dest) and fetch again" >&2
    exit 1
fi
