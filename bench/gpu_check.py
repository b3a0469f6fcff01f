"""Decode tokens per second on CUDA through the engine's ModelRunner, for a model of SmolLM2-135M's
shape (random weights: the embedded GGUF is too large to travel to a lent GPU machine, and speed
does not depend on the weights' values), float32 and bfloat16, at 1, 8 and 64 streams.

Three ways in the same run and process, each step bringing the sampled ids back to the host as
serving does:
  graphs     each step replayed as a CUDA graph (engine/cuda_graphs.py), what decode engines run;
  eager      the same step launched kernel by kernel (the baseline);
  torch-ref  eager, with the torch reference attention (`reference_paged_decode_attention`,
             gather + einsum) instead of the Triton kernel.

    python3 bench/gpu_check.py [--context 256] [--steps 64] [--streams 1 8 64]
                               [--variants graphs eager torch-ref] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from decode_throughput import decode_rate  # noqa: E402

import engine.attention as attention  # noqa: E402
from engine import triton_kernels  # noqa: E402
from engine.loader import load_model  # noqa: E402
from engine.runner import ModelRunner  # noqa: E402

# SmolLM2-135M's config.json, the fields that set the work per token.
SMOLLM2_SHAPE: dict[str, Any] = dict(
    vocab_size=49152, hidden_size=576,
    intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
)


def smollm2_shaped(root: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE))
    path = root / "smollm2-shaped"
    model.save_pretrained(path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=["graphs", "eager", "torch-ref"],
                    choices=["graphs", "eager", "torch-ref"])
    ap.add_argument("--json", default=None)
    ns = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, SmolLM2-135M shape, "
          f"context {ns.context}, {ns.steps} steps, median of {ns.reps}")
    rows: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = smollm2_shaped(Path(tmp))
        for dtype in (torch.float32, torch.bfloat16):
            dname = str(dtype).removeprefix("torch.")
            loaded = load_model(path, dtype=dtype, device="cuda")
            blocks = max(ns.streams) * (-(-(ns.context + ns.steps + 1) // 16)) + 1
            runners = {graphs: ModelRunner(loaded, num_blocks=blocks, block_size=16,
                                           cuda_graphs=graphs) for graphs in (True, False)}
            for runner in runners.values():  # warm-up: compiles the kernels
                decode_rate(runner, 2, 32, 4, seed=0, sync=torch.cuda.synchronize)
            for streams in ns.streams:
                for name in ns.variants:
                    runner = runners[name == "graphs"]
                    if name == "torch-ref":
                        attention.paged_decode_attention = (  # type: ignore[assignment]
                            triton_kernels.reference_paged_decode_attention)
                    try:
                        # This shape's warm-up (and capture, for graphs).
                        decode_rate(runner, streams, 32, 2, seed=1, sync=torch.cuda.synchronize)
                        rows[f"{dname} {streams} {name}"] = statistics.median(
                            decode_rate(runner, streams, ns.context, ns.steps, seed=r,
                                        sync=torch.cuda.synchronize)
                            for r in range(ns.reps))
                    finally:
                        attention.paged_decode_attention = triton_kernels.paged_decode_attention
                base = rows.get(f"{dname} {streams} eager")
                print(f"{dname:9} {streams:3} streams: " + ", ".join(
                    f"{name} {rows[f'{dname} {streams} {name}']:8.1f} tok/s"
                    + (f" ({rows[f'{dname} {streams} {name}'] / base:.2f}x eager)"
                       if base and name != "eager" else "")
                    for name in ns.variants), flush=True)
            del runners, runner, loaded
            torch.cuda.empty_cache()
    if ns.json:
        Path(ns.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
