"""Llama-family decoder (Llama, Qwen2, Mistral) over a paged KV cache.

Parameter names mirror transformers' so an HF state dict loads without renaming; once loaded,
`CausalLM.fuse_projections` concatenates Q, K and V (and gate and up) into one matrix each, so a
layer runs two input matmuls instead of five.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine import cpu_fused_ops
from engine.attention import AttentionFn, batched_paged_attention, write_step_kv
from engine.attention_batch import AttentionBatch
from engine.config import ModelConfig
from engine.kv_cache import PagedKVCache
from engine.rope import RotaryEmbedding, apply_rotary_, rotary_factors


@dataclass(frozen=True)
class LastRows:
    """The rows of a step whose hidden states are wanted (each sequence's last token), and the
    step seen from them alone: one query each, at its position, over its whole context."""

    rows: Tensor  # [R] int64 indices into the step's T tokens
    batch: AttentionBatch


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        if x.dim() == 2 and x.is_contiguous() and cpu_fused_ops.applies(x):
            return cpu_fused_ops.rms_norm(x, self.weight, self.eps)
        if dtype == torch.float32:
            # One fused op instead of six: the same formula, ~60 per decode step.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add_forward(self, x: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        """The residual add before this norm and the norm: (x + delta, norm(x + delta)). On CPU
        in float32 one pass that adds into x in place (x must be the residual stream, owned by
        the caller); elsewhere a new sum, as transformers computes it."""
        if (x.dim() == 2 and x.is_contiguous() and delta.is_contiguous()
                and delta.dtype == x.dtype and cpu_fused_ops.applies(x)):
            return x, cpu_fused_ops.add_rms_norm(x, delta, self.weight, self.eps)
        x = x + delta
        return x, self(x)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        bias = config.attention_bias
        q_dim = config.num_heads * config.head_dim
        kv_dim = config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=bias)
        self.o_proj = nn.Linear(q_dim, config.hidden_size, bias=False)
        self.qkv_proj: nn.Linear | None = None
        self._split = (q_dim, kv_dim, kv_dim)

    def fuse_projections(self) -> None:
        """Replace q_proj, k_proj and v_proj by one Linear over their concatenated weights."""
        parts = (self.q_proj, self.k_proj, self.v_proj)
        self.qkv_proj = _fused(parts)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, batch: AttentionBatch, kv: PagedKVCache,
        attention_fn: AttentionFn, last: LastRows | None = None,
    ) -> Tensor:
        """[T, hidden] -> [T, hidden]; with `last`, every token's K/V is written but only the
        rows of `last` attend: -> [len(last.rows), hidden]."""
        q, k, v = self._project(x, cos, sin)
        k_cache, v_cache = kv.k[self.layer_idx], kv.v[self.layer_idx]
        if last is not None:
            write_step_kv(k, v, k_cache, v_cache, batch)
            rows = last.rows
            # The rows' own K/V are written again by the call: the same values.
            q, k, v, batch = q[rows], k[rows], v[rows], last.batch
        out = attention_fn(q, k, v, k_cache, v_cache, batch, self.scale)
        return self.o_proj(out.reshape(q.shape[0], self.num_heads * self.head_dim))

    def _project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Q [T, heads, hd] and K, V [T, kv heads, hd], Q and K rotated."""
        t = x.shape[0]
        if self.qkv_proj is None:
            qk = torch.cat((self.q_proj(x), self.k_proj(x)), dim=-1)
            v = self.v_proj(x)
        else:
            q_dim, kv_dim, _ = self._split
            qkv = self.qkv_proj(x)
            qk, v = qkv[:, : q_dim + kv_dim], qkv[:, q_dim + kv_dim :]
        # Q and K side by side are [T, heads + kv heads, head_dim]: rotated in one pass.
        # (in place on the projection's output where the CPU kernel takes it)
        qk = apply_rotary_(qk.view(t, self.num_heads + self.num_kv_heads, self.head_dim), cos,
                           sin)
        q, k = qk.split((self.num_heads, self.num_kv_heads), dim=1)
        return q, k, v.view(t, self.num_kv_heads, self.head_dim)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_proj: nn.Linear | None = None

    def fuse_projections(self) -> None:
        """Replace gate_proj and up_proj by one Linear over their concatenated weights."""
        self.gate_up_proj = _fused((self.gate_proj, self.up_proj))
        del self.gate_proj, self.up_proj

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate_up = self.gate_up_proj(x)
        if gate_up.dim() == 2 and gate_up.stride(1) == 1 and cpu_fused_ops.applies(gate_up):
            return self.down_proj(cpu_fused_ops.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def _fused(parts: tuple[nn.Linear, ...]) -> nn.Linear:
    weight = torch.cat([p.weight.detach() for p in parts], dim=0)
    has_bias = parts[0].bias is not None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias,
                      device="meta", dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]),  # type: ignore[misc]
                                  requires_grad=False)
    return fused


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: Tensor, delta: Tensor | None, cos: Tensor, sin: Tensor, batch: AttentionBatch,
        kv: PagedKVCache, attention_fn: AttentionFn, last: LastRows | None = None,
    ) -> tuple[Tensor, Tensor]:
        """x: the residual stream; delta: the previous layer's MLP output, not yet added (None
        in the first layer). Returns the residual stream and this layer's MLP output, to be
        added by the next layer's (or the final) norm: each residual add and the norm after
        it are one pass (`RMSNorm.add_forward`), the same sums as transformers'
        x + attn(norm1(x)), then x + mlp(norm2(x)). With `last`, only its rows go on past
        the K/V: both outputs are [len(last.rows), hidden]."""
        if delta is None:
            h = self.input_layernorm(x)
        else:
            x, h = self.input_layernorm.add_forward(x, delta)
        attn = self.self_attn(h, cos, sin, batch, kv, attention_fn, last)
        if last is not None:
            x = x[last.rows]
        x, h = self.post_attention_layernorm.add_forward(x, attn)
        return x, self.mlp(h)


class DecoderStack(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # No random init: every weight is loaded, and nn.Embedding's normal_ on the meta device
        # (the loader's) imports torch._dynamo, ~2 s of every engine's start.
        self.embed_tokens = nn.Embedding.from_pretrained(
            torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class CausalLM(nn.Module):
    # Swappable so a Triton paged-attention kernel can replace the torch reference.
    attention_fn: AttentionFn = staticmethod(batched_paged_attention)  # type: ignore[assignment]

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Called after each layer but the last (prefill's CPU split polls here).
        self.between_layers: Callable[[], None] | None = None
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def fuse_projections(self) -> None:
        """Done once after the weights are loaded (the checkpoint names stay transformers')."""
        for layer in self.model.layers:
            assert isinstance(layer, DecoderLayer)
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()

    def linears_in_step_order(self) -> list[nn.Module]:
        """Every linear in the order a step runs them (fused projections)."""
        order: list[nn.Module] = []
        for layer in self.model.layers:
            assert isinstance(layer, DecoderLayer)
            attn, mlp = layer.self_attn, layer.mlp
            assert attn.qkv_proj is not None and mlp.gate_up_proj is not None, "fuse first"
            order += [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]
        return [*order, self.lm_head]

    def forward(
        self, input_ids: Tensor, positions: Tensor, batch: AttentionBatch, kv: PagedKVCache,
        last: LastRows | None = None,
    ) -> Tensor:
        """Hidden states [T, hidden] for flattened tokens of several sequences; with `last`,
        only those rows' [len(last.rows), hidden]: the last layer then writes every token's
        K/V, but attends, projects and runs its MLP for those rows alone. Nothing reads the
        other rows' output of the last layer; on SmolLM2 that is 1/36 of a prompt's compute."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(positions)
        cos, sin = rotary_factors(cos, sin, x.dtype)
        delta: Tensor | None = None
        final = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            x, delta = layer(x, delta, cos, sin, batch, kv, self.attention_fn,
                             last if i == final else None)
            if self.between_layers is not None and i != final:
                self.between_layers()
        if delta is None:
            return self.model.norm(x)
        return self.model.norm.add_forward(x, delta)[1]

    def compute_logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden)
