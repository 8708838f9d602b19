#!/usr/bin/env bash
# Checks anyattn on a CUDA GPU (issue 17): installs the CUDA extras, runs the whole test suite on the
# GPU (ANYATTN_TEST_DEVICE=cuda) and the GPU benchmark workloads (`anyattn bench ... --device cuda`),
# writing the table, results.json and bench.png. On a machine without a GPU it says so and exits 0.
#
#   scripts/gpu-check.sh [OUT_DIR]          (default OUT_DIR: gpu-out)
#
# Environment: PYTHON (default python3; must hold a CUDA build of torch), ANYATTN_GPU_TESTS=0 to skip the
# tests, ANYATTN_GPU_BENCH=0 to skip the benchmarks, ANYATTN_GPU_BUDGET (timing seconds per case and
# mode, default 3), ANYATTN_GPU_BUILD=1 to build NATTEN / mamba-ssm from source distributions (CUDA
# compilation: many minutes; restricted to this GPU's architecture).
# Extras come from ./.whl (wheels or sdists carried to an offline machine: scripts/gpu-wheels.sh fetches
# them) when it exists, else from PyPI. A peer that cannot be installed is reported as missing by the
# tests (skipped) and the benchmarks (missing column), never faked.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu-check: no CUDA GPU visible to $PY (no torch, or torch.cuda.is_available() is False): nothing to check."
    exit 0
fi
"$PY" -c "import torch; print('gpu-check:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)" | tee "$OUT/device.txt"

# --- 1. CUDA extras (each optional) -----------------------------------------------------------------
install() {  # install NAME...: from ./.whl when present, else PyPI; --no-deps keeps the GPU image's torch
    if [ -d .whl ]; then
        "$PY" -m pip install -q --no-index --no-deps --find-links .whl "$@"
    else
        "$PY" -m pip install -q --no-deps "$@"
    fi
}
have() { "$PY" -c "import $1" >/dev/null 2>&1; }
have triton || install triton || echo "gpu-check: triton not installed"
have fla || install fla-core || echo "gpu-check: fla-core not installed"
have einops || install einops || true
if [ "${ANYATTN_GPU_BUILD:-0}" = 1 ]; then
    arch=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')")
    have natten || NATTEN_CUDA_ARCH="$arch" NATTEN_N_WORKERS="$(nproc)" install --no-build-isolation natten \
        || echo "gpu-check: natten build failed"
    have mamba_ssm || TORCH_CUDA_ARCH_LIST="$arch" MAMBA_FORCE_BUILD=TRUE install --no-build-isolation mamba-ssm \
        || echo "gpu-check: mamba-ssm build failed"
else
    have natten || install natten 2>/dev/null || echo "gpu-check: natten not installed (ANYATTN_GPU_BUILD=1 builds it)"
    have mamba_ssm || install mamba-ssm 2>/dev/null || echo "gpu-check: mamba-ssm not installed (ANYATTN_GPU_BUILD=1 builds it)"
fi
"$PY" -c "from anyattn.backends import report; import json; print(json.dumps(report('cuda'), indent=1))" \
    | tee "$OUT/backends.json"

status=0
# --- 2. the whole test suite on the GPU ----------------------------------------------------------------
if [ "${ANYATTN_GPU_TESTS:-1}" != 0 ]; then
    ANYATTN_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider -rs --maxfail=50 tests 2>&1 \
        | tee "$OUT/tests.log" | tail -40
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

# --- 3. GPU benchmarks: table, results.json, bench.png ---------------------------------------------------
if [ "${ANYATTN_GPU_BENCH:-1}" != 0 ]; then
    "$PY" -m anyattn.cli bench gpu_masked gpu_alibi gpu_neighborhood gpu_linear gpu_scan --device cuda \
        --budget "${ANYATTN_GPU_BUDGET:-3}" --no-progress --out "$OUT" 2>&1 | tee "$OUT/bench.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
echo "gpu-check: wrote $OUT/ (device.txt, backends.json, tests.log, bench.txt, results.json, bench.png); status $status"
exit $status
