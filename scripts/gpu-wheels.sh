#!/usr/bin/env bash
# Fetches the CUDA extras into ./.whl for a GPU machine without network (run where pip reaches PyPI).
# Python version of the GPU machine: PYVER (default 3.12). fla-core and einops are pure-Python wheels;
# natten and mamba-ssm publish source distributions only (built there with ANYATTN_GPU_BUILD=1).
set -eu
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
PY=${PYTHON:-python3}
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-common-dir)/info/exclude"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl fla-core einops
"$PY" -m pip download -q --no-deps --no-binary=:all: -d .whl natten mamba-ssm || true
ls -la .whl
