"""Linear layers with their weights handed to oneDNN once, at load time (CPU, float32).

On this CPU torch's default float32 matmul (MKL) is slow for the few-row inputs of a decode step:
measured over the 121 matmuls of one SmolLM2 step (bench/decode_throughput.py's model, 2 threads),
8 rows took ~1.5x as long through `F.linear` as through oneDNN's inner product, and prefill-sized
inputs (64 and 512 rows) took the same time either way. The outputs differ only in float32
rounding (~1e-6), the same kind of difference as between two BLAS builds.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PackedLinear(nn.Module):
    """`F.linear` through oneDNN, the weight reordered once into oneDNN's blocked layout.

    The input and output stay ordinary dense tensors (`_linear_pointwise`, the op inductor
    lowers a CPU linear to): converting them to and from oneDNN tensors around each call
    (`mkldnn_linear`) cost ~40 us a matmul, ~5 ms of a ~55 ms SmolLM2 decode step."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.out_features = weight.shape[0]
        self.weight_packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
        bias = linear.bias
        self.bias = None if bias is None else bias.detach().contiguous()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2 and x.is_contiguous():
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


def pack_linears(module: nn.Module) -> int:
    """Replaces every nn.Linear below `module` by a PackedLinear; returns how many. A weight an
    nn.Linear shares with another module (tied embeddings) is copied, the original kept."""
    count = 0
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count
