#!/usr/bin/env bash
# Issue 8's GPU checks in one go, on a machine with a CUDA device:
#   1. the Triton kernels compiled (no interpreter) against their torch references, and the CUDA
#      oracle tests (greedy equals transformers; float32 and bfloat16; batched decode through the
#      kernel; a forward that never waits on the device; pool round trips, int8 too),
#   2. the e2e oracle tests through real processes (`pantry local --device cuda`: kvstore master
#      and node, prefill, decode, conductor), float32, against transformers,
#   3. `pantry local --device cuda --dtype bfloat16` serving a SmolLM2-135M-shaped model over
#      HTTP: TTFT cold/repeated and decode tok/s, transformers on the same GPU as the same-run
#      baseline (bench/gpu_serve.py),
#   4. decode tok/s through the engine's runner, float32 and bfloat16, 1/8/64 streams: steps
#      replayed as CUDA graphs, against the same steps launched eagerly, and eagerly with the
#      torch reference attention, in the same run (bench/gpu_check.py),
#   5. int8 KV in the pool on CUDA: bytes saved and greedy agreement (bench/int8_kv.py, tiny).
# Each stage has its own time limit, so one that hangs does not take the others' time; STAGES
# picks some ("tests e2e"). Logs and JSON figures go to $OUT (or /tmp/pantry-gpu-check).
#
#   bench/gpu_check.sh            run the checks (python3 with a CUDA torch, or PY=...)
#   bench/gpu_check.sh prepare    here, before: fetch the packages this repo needs that a bare
#                                 GPU image may lack into .whl/, and SmolLM2's tokenizer into
#                                 .gpu/ (git-ignore both, carry both)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}

if [ "${1:-}" = "prepare" ]; then
    # Versions as in this repo's venv; cp312 manylinux, the GPU image's Python.
    mkdir -p .whl .gpu/smollm2-tokenizer
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl \
        gguf==0.19.0 grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
        protobuf==7.36.2 redis==8.1.0 hiredis==3.5.0 xxhash==4.1.0 prometheus-client==0.26.0 \
        pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.8.0 \
        typing-inspection==0.4.5 typing-extensions==4.16.0 pytest-timeout==2.4.0 || exit 1
    exec "$PY" -c "import sys; sys.path[:0] = ['bench', '.']; from pathlib import Path
from gpu_serve import save_tokenizer
save_tokenizer('smollm2', Path('.gpu/smollm2-tokenizer'))
print('wheels in .whl/, SmolLM2 tokenizer in .gpu/smollm2-tokenizer/')"
fi

if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/pantry-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/pantry-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET  # compiled kernels on the GPU
OUT=${OUT:-/tmp/pantry-gpu-check}
TOKENIZER=${TOKENIZER:-.gpu/smollm2-tokenizer}
[ -d "$TOKENIZER" ] || TOKENIZER=smollm2
mkdir -p "$OUT"

"$PY" - <<'EOF' || exit 2
import importlib, sys
import torch
assert torch.cuda.is_available(), "no CUDA device: torch.cuda.is_available() is False"
missing = [m for m in ("triton", "transformers", "grpc", "grpc_health", "grpc_reflection",
                       "google.protobuf", "gguf", "redis", "xxhash", "prometheus_client",
                       "pydantic", "aiohttp", "httpx", "safetensors", "numpy", "pytest")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {missing}; run `bench/gpu_check.sh prepare` where pip "
             "works and carry .whl and .gpu")
import triton
print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
EOF

status=0
STAGES=${STAGES:-tests e2e serve decode int8}
stage() {  # stage NAME SECONDS COMMAND...: one check under its own limit, logged to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    [[ " $STAGES " == *" $name "* ]] || return 0
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: rc $rc in $((SECONDS - start)) s"
    [ "$rc" = 0 ] || status=1
}
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rs)
stage tests 130 "${PYTEST[@]}" tests/engine/test_triton_kernels.py tests/engine/test_gpu_path.py \
    tests/engine/test_cuda_graphs.py tests/engine/test_kv_int8.py
stage e2e 120 env PANTRY_E2E_ARGS="--device cuda" "${PYTEST[@]}" tests/e2e/test_tiny_oracle.py
stage serve 140 "$PY" bench/gpu_serve.py --tokenizer "$TOKENIZER" --reps 2 --json "$OUT/serve.json"
stage decode 100 "$PY" bench/gpu_check.py --reps 2 --json "$OUT/decode.json"
stage int8 40 "$PY" bench/int8_kv.py --models tiny --device cuda --dtype bfloat16
echo "gpu_check: $([ $status = 0 ] && echo all passed || echo FAILED), logs in $OUT"
exit $status
