"""Linear layers with their weights handed to oneDNN once, at load time (CPU, float32).

On this CPU torch's default float32 matmul (MKL) is slow for the few-row inputs of a decode step:
measured over the 121 matmuls of one SmolLM2 step (bench/decode_throughput.py's model, 2 threads),
8 rows took ~1.5x as long through `F.linear` as through oneDNN's inner product, and prefill-sized
inputs (64 and 512 rows) took the same time either way. The outputs differ only in float32
rounding (~1e-6), the same kind of difference as between two BLAS builds.

One row (a decode step of one sequence) is the exception when oneDNN runs on one core: one
thread streams the reordered weight at only ~10-13 GB/s. Measured at one row, 1 thread,
SmolLM2's shapes (~17-19 GB/s is this machine's single-core read bandwidth):
- a layer wider than it is deep is faster as MKL's product with the weight stored transposed
  ([in, out], each input feature's row contiguous): lm_head 49152x576 10.0 -> 6.0 ms, gate/up
  3072x576 0.57 -> 0.40 ms, QKV 960x576 0.18 -> 0.15 ms;
- the others are faster through oneDNN on the weight as loaded ([out, in], not reordered):
  down 576x1536 0.35 -> 0.25 ms, output 576x576 0.15 -> 0.13 ms.
A one-sequence SmolLM2 decode step on 1 thread: 56 -> 47 ms. On 2 threads oneDNN splits each
matmul over both cores and streams ~18 GB/s, and the copies lose (spinning waits 38 -> 48 ms,
passive 45 -> 49 ms, quiet machine): so they are made and used on one thread only
(`one_row_pays`). From two rows on the reordered weight is as fast or faster (8 rows: 1.4-2x),
so a layer with the copy keeps both: memory for speed, ~400 MB more resident on SmolLM2.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def one_row_pays() -> bool:
    """Whether one-row inputs go through the second weight copy: on one thread, where oneDNN
    cannot split the matmul over cores (module docstring)."""
    return torch.get_num_threads() == 1


class PackedLinear(nn.Module):
    """`F.linear` through oneDNN, the weight reordered once into oneDNN's blocked layout.

    The input and output stay ordinary dense tensors (`_linear_pointwise`, the op inductor
    lowers a CPU linear to): converting them to and from oneDNN tensors around each call
    (`mkldnn_linear`) cost ~40 us a matmul, ~5 ms of a ~55 ms SmolLM2 decode step."""

    def __init__(self, linear: nn.Linear, *, one_row: bool = True) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.out_features = weight.shape[0]
        self.weight_packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
        bias = linear.bias
        self.bias = None if bias is None else bias.detach().contiguous()
        # For one-row inputs (the module's docstring): a wide layer's weight transposed,
        # [in, out], for MKL; any other layer's weight as loaded, [out, in], for oneDNN.
        self.wide = weight.shape[0] > weight.shape[1]
        self.one_row: Tensor | None = None
        if one_row:
            self.one_row = weight.t().contiguous() if self.wide else weight.contiguous()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2 and x.is_contiguous():
            if x.shape[0] == 1 and self.one_row is not None and one_row_pays():
                if not self.wide:
                    return torch.ops.mkldnn._linear_pointwise(  # type: ignore[no-any-return]
                        x, self.one_row, self.bias, "none", [], "")
                if self.bias is None:
                    return torch.mm(x, self.one_row)
                return torch.addmm(self.bias, x, self.one_row)
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


def pack_linears(module: nn.Module, *, one_row: bool | None = None) -> int:
    """Replaces every nn.Linear below `module` by a PackedLinear; returns how many. A weight an
    nn.Linear shares with another module (tied embeddings) is copied, the original kept.
    `one_row`: keep each weight's copy for one-row inputs (faster single-sequence decode);
    None: where they pay with the threads set now (`one_row_pays`)."""
    if one_row is None:
        one_row = one_row_pays()
    count = 0
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child, one_row=one_row))
                count += 1
    return count
