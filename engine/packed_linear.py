"""Linear layers with their weights handed to oneDNN once, at load time (CPU, float32), and
few-row inputs (decode steps) on our own thread pool (engine.cpu_linear_pool, or
engine.cpu_quant_linear for a GGUF file's quantized weights).

On this CPU torch's default float32 matmul (MKL) is slow for the few-row inputs of a decode step:
measured over the 121 matmuls of one SmolLM2 step (bench/decode_throughput.py's model, 2 threads),
8 rows took ~1.5x as long through `F.linear` as through oneDNN's inner product, and prefill-sized
inputs (64 and 512 rows) took the same time either way. The outputs differ only in float32
rounding (~1e-6), the same kind of difference as between two BLAS builds.

Up to `cpu_linear_pool.MAX_ROWS` rows go through the pool instead, on a second, blocked copy of
the weight (memory for speed: ~540 MB more resident on SmolLM2). With the engines' passive
OpenMP waits, oneDNN's second thread is woken for every matmul; the pool's helper spins
between a step's matmuls and splits each into blocks. Measured on this 2-core machine, 2
threads, OMP_WAIT_POLICY=PASSIVE, each weight in 30 copies so that it streams from memory as
in a step (lm_head one), us per matmul, oneDNN -> pool (a shared machine: indicative):

    rows  QKV 960x576  o 576x576  gate/up 3072x576  down 576x1536  lm_head 49152x576
    1     175 -> 77    129 -> 57   408 -> 260        244 -> 135     5848 -> 4090
    8     172 -> 89    116 -> 62   410 -> 273        224 -> 142     6307 -> 4348

From 16 rows the pool computes rather than streams: 16 rows about even to 1.5x, 24 and 32 rows
1.2-1.4x, 64 rows 1.1x (QKV, gate/up, down); prefill chunks (more than MAX_ROWS) stay on
oneDNN. A whole SmolLM2 decode step (bench/decode_throughput.py --baseline-tree, the commit
before against this, alternated, PASSIVE): 2 threads, 1 stream 23.6 -> 35.0 tok/s, 8 streams
158.8 -> 224.8; 1 thread, 1 stream 22.2 -> 32.1, 8 streams 120.1 -> 161.2. On one thread the
pool (the caller alone) also beat the one-row weight copies this module kept before (MKL on a
transposed wide weight, oneDNN on a plain narrow one), so its copy replaced them. For a GGUF
model the copy is the file's quantized rows wherever a weight is stored so
(engine.cpu_quant_linear): the same outputs, bit for bit, from about a sixth of the memory.
Where the pool is unavailable (no compiler, PANTRY_CPU_LINEAR_POOL=0) every input goes through
oneDNN.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from engine import cpu_linear_pool, cpu_pool, cpu_quant_linear
from engine.gguf_file import RowIndex

FewRows = cpu_linear_pool.PoolWeight | cpu_quant_linear.QuantWeight


class PackedLinear(nn.Module):
    """`F.linear` through oneDNN, the weight reordered once into oneDNN's blocked layout; with
    `few_rows`, inputs of up to `cpu_linear_pool.MAX_ROWS` rows through the pool.

    The input and output stay ordinary dense tensors (`_linear_pointwise`, the op inductor
    lowers a CPU linear to): converting them to and from oneDNN tensors around each call
    (`mkldnn_linear`) cost ~40 us a matmul, ~5 ms of a ~55 ms SmolLM2 decode step."""

    def __init__(self, linear: nn.Linear, *, few_rows: bool = True,
                 rows: RowIndex | None = None) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.out_features = weight.shape[0]
        self.weight_packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
        bias = linear.bias
        self.bias = None if bias is None else bias.detach().contiguous()
        self.few_rows: FewRows | None = None
        if few_rows and cpu_linear_pool.available():
            stored = (rows.rows_of(weight.numpy()) if rows is not None
                      and cpu_quant_linear.available() else None)
            self.few_rows = (cpu_linear_pool.pack(weight, self.bias) if stored is None
                             else cpu_quant_linear.pack(stored, self.bias))
        self.then: Tensor | None = None  # see `read_ahead_in_order`

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2 and x.is_contiguous():
            if (self.few_rows is not None and x.shape[0] <= cpu_linear_pool.MAX_ROWS
                    and x.dtype == torch.float32):
                if isinstance(self.few_rows, cpu_quant_linear.QuantWeight):
                    y = cpu_quant_linear.linear(x, self.few_rows)
                else:
                    y = cpu_linear_pool.linear(x, self.few_rows)
                if self.then is not None:
                    cpu_pool.prefetch(self.then)
                return y
            # The engine's case ([tokens, features]): no reshape around the call, three fewer
            # dispatches a matmul, 121 matmuls a step.
            return torch.ops.mkldnn._linear_pointwise(  # type: ignore[no-any-return]
                x, self.weight_packed, self.bias, "none", [], "")
        lead = x.shape[:-1]
        y = torch.ops.mkldnn._linear_pointwise(
            x.reshape(-1, x.shape[-1]).contiguous(), self.weight_packed, self.bias, "none",
            [], "")
        return y.view(*lead, self.out_features)


def can_pack(module: nn.Module) -> bool:
    params = list(module.parameters())
    return (torch.backends.mkldnn.is_available() and bool(params)
            and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params))


def pack_linears(module: nn.Module, *, few_rows: bool = True,
                 rows: RowIndex | None = None) -> int:
    """Replaces every nn.Linear below `module` by a PackedLinear; returns how many. A weight an
    nn.Linear shares with another module (tied embeddings) is copied, the original kept.
    `few_rows`: keep each weight's pool copy for decode-sized inputs, where the pool is
    available; `rows`: a GGUF file's quantized rows, for weights the pool may then compute
    from (engine.cpu_quant_linear) instead of a float32 copy."""
    count = 0
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child, few_rows=few_rows, rows=rows))
                count += 1
    return count


def read_ahead_in_order(linears: Sequence[nn.Module]) -> int:
    """`linears` in the order a step runs them (the last followed by the first, next step):
    after each pool linear, the pool's idle helpers read the next one's weight into cache
    while the caller runs the Python between them. A decode step on CPU streams every weight
    from memory (540 MB on SmolLM2); this uses the gaps the memory would otherwise sit idle.
    Returns the links made: none unless PANTRY_CPU_READ_AHEAD=1, or where a linear has no pool
    weight.

    Off by default. Measured on 2 cores, on and off alternated in one process: 4 streams 3-7%
    faster a step (25.5 -> 24.0, 31.2 -> 28.9, 29.3 -> 28.3 ms), 1 stream 2.5%, 8 streams 4%.
    But a helper reading ahead keeps its core through the gaps, where it would yield it to
    prefill: with `pantry local` sharing both cores, bench/interference.py went from p99/p50
    TBT 1.71-1.75 and TTFT p50 36 s to 1.84-2.00 and 56 s (yielding between chunks: 1.82-1.83
    and 40 s, and most of the gain gone). For decode engines with cores of their own."""
    packed = [m for m in linears if isinstance(m, PackedLinear) and m.few_rows is not None]
    if os.environ.get("PANTRY_CPU_READ_AHEAD", "0") != "1" or len(packed) != len(linears):
        return 0
    for current, following in zip(packed, packed[1:] + packed[:1], strict=True):
        assert following.few_rows is not None
        current.then = following.few_rows.blocked
    return len(packed)
