"""Rotary position embeddings, computed exactly the way transformers does (float32)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from engine import cpu_fused_ops
from engine.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> Tensor:
    dim = config.head_dim
    # Same expression as transformers so the float32 rounding matches bit for bit.
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim)
    )
    scaling = config.rope_scaling_dict
    rope_type = config.rope_type
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])  # type: ignore[arg-type]
    if rope_type == "llama3":
        return _llama3(inv_freq, scaling)
    return inv_freq


def _llama3(inv_freq: Tensor, scaling: dict[str, object]) -> Tensor:
    factor = float(scaling["factor"])  # type: ignore[arg-type]
    low_freq_factor = float(scaling["low_freq_factor"])  # type: ignore[arg-type]
    high_freq_factor = float(scaling["high_freq_factor"])  # type: ignore[arg-type]
    old_context_len = float(scaling["original_max_position_embeddings"])  # type: ignore[arg-type]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    inv_freq: Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # On the CPU even inside the loader's meta-device build: on the meta device this
        # arithmetic runs torch's reference decompositions, which import torch._dynamo (~2 s
        # of every engine's start). The loader puts it on the model's device.
        with torch.device("cpu"):
            inv_freq = inverse_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin of shape [T, head_dim] for integer positions [T]."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def rotary_factors(cos: Tensor, sin: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [T, head_dim] -> [T, 1, head_dim] in `dtype`, sin's first half negated: what
    `apply_rotary` takes, built once per step rather than once per layer and projection."""
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
    return cos[:, None, :].to(dtype), signed[:, None, :].to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """x: [T, heads, head_dim]; cos, signed_sin from `rotary_factors`. transformers'
    x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1): the halves swapped by one
    roll and the sign carried by the sine, so the same products, four ops instead of nine."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin


def apply_rotary_(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """`apply_rotary`, written over x where engine.cpu_fused_ops takes it (float32 on CPU, each
    row's heads contiguous: one pass instead of four ops and their temporaries), else a new
    tensor: use the result, and pass an x that may be overwritten (a projection's output)."""
    if cpu_fused_ops.applies(x) and cpu_fused_ops.rotary_takes(x, cos, signed_sin):
        return cpu_fused_ops.rotary_(x, cos, signed_sin)
    return apply_rotary(x, cos, signed_sin)
