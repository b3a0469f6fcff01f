#!/usr/bin/env bash
# Issue 8's GPU checks in one go, on a machine with a CUDA device:
#   1. the Triton kernels compiled (no interpreter) against their torch references,
#   2. the CUDA oracle tests (greedy equals transformers; float32 and bfloat16; batched decode
#      through the kernel; a forward that never waits on the device; pool round trips, int8 too),
#   3. decode tok/s of a SmolLM2-135M-shaped model, float32 and bfloat16, 1/8/64 streams, with
#      the torch reference attention as the same-run baseline (bench/gpu_check.py),
#   4. int8 KV in the pool on CUDA: bytes saved and greedy agreement (bench/int8_kv.py, tiny).
# Logs and a JSON of the figures go to $OUT (or /tmp/pantry-gpu-check).
#
#   bench/gpu_check.sh            run the checks (python3 with a CUDA torch, or PY=...)
#   bench/gpu_check.sh wheels     here, before: fetch the packages this repo needs that a bare
#                                 GPU image may lack into .whl/ (git-ignore it, carry it)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}

if [ "${1:-}" = "wheels" ]; then
    # Versions as in this repo's venv; cp312 manylinux, the GPU image's Python.
    mkdir -p .whl
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl \
        gguf==0.19.0 grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
        protobuf==7.36.2 redis==8.1.0
fi

if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/pantry-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/pantry-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
unset TRITON_INTERPRET  # compiled kernels on the GPU
OUT=${OUT:-/tmp/pantry-gpu-check}
mkdir -p "$OUT"

"$PY" - <<'EOF' || exit 2
import importlib, sys
import torch
assert torch.cuda.is_available(), "no CUDA device: torch.cuda.is_available() is False"
missing = [m for m in ("triton", "transformers", "grpc", "grpc_health", "grpc_reflection",
                       "google.protobuf", "gguf", "redis", "xxhash", "prometheus_client",
                       "safetensors", "numpy", "pytest")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {missing}; run `bench/gpu_check.sh wheels` where pip "
             "works and carry .whl")
import triton
print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
EOF

status=0
"$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rs \
    tests/engine/test_triton_kernels.py tests/engine/test_gpu_path.py \
    tests/engine/test_kv_int8.py 2>&1 | tee "$OUT/tests.log" || status=1
"$PY" bench/gpu_check.py --json "$OUT/decode.json" 2>&1 | tee "$OUT/decode.log" || status=1
"$PY" bench/int8_kv.py --models tiny --device cuda --dtype bfloat16 2>&1 \
    | tee "$OUT/int8_kv.log" || status=1
echo "gpu_check: $([ $status = 0 ] && echo all passed || echo FAILED), logs in $OUT"
exit $status
