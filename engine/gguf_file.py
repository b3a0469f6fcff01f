"""Reading a GGUF file: model config from metadata and dequantized, HF-named float32 arrays.

Torch-free on purpose: the conductor reads the tokenizer from the same file and never loads torch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from gguf import GGMLQuantizationType

from engine.config import ModelConfig
from engine.cpu_dequant import dequantize
from engine.errors import UnsupportedModel
from engine.gguf_reader import GGUFReader

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
# llama.cpp permutes Q/K rows only for these architectures (its RoPE is interleaved-pair style).
_PERMUTED_ARCHS = ("llama", "mistral")

# The quantizations engine.cpu_quant_linear computes from: 32 weights a block.
GROUP = 32
Q4_1, Q8_0 = 1, 2
_FORMATS = {GGMLQuantizationType.Q4_1: Q4_1, GGMLQuantizationType.Q8_0: Q8_0}


@dataclass(frozen=True)
class QuantRows:
    """Rows of a weight as the file stores them: `blocks` [rows, groups, block bytes], each
    block 32 weights in format `fmt` (Q4_1 or Q8_0)."""

    fmt: int
    blocks: np.ndarray


class RowIndex:
    """Every row of the file's Q4_1 and Q8_0 tensors, found by its float32 weights: a loaded
    weight's rows are looked up by value, so Q/K unpermuting and fused projections need no
    bookkeeping of where each row came from."""

    def __init__(self) -> None:
        self._rows: dict[bytes, tuple[int, np.ndarray]] = {}

    def add(self, raw: np.ndarray, qtype: GGMLQuantizationType, values: np.ndarray) -> None:
        """A tensor's stored rows (`raw`, [rows, bytes]) and their dequantization; skipped unless
        it is Q4_1 or Q8_0."""
        fmt = _FORMATS.get(qtype)
        if fmt is None:
            return
        values = values.reshape(raw.shape[0], -1)
        blocks = raw.reshape(raw.shape[0], values.shape[1] // GROUP, -1)
        for i in range(raw.shape[0]):
            self._rows[xxhash.xxh3_128_digest(values[i])] = (fmt, blocks[i])

    def __len__(self) -> int:
        return len(self._rows)

    def rows_of(self, weight: np.ndarray) -> QuantRows | None:
        """`weight`'s rows as stored ([out, in] float32), or None unless every row is a stored
        row of one format. A row is found by the 128-bit digest of its float32 bytes, so what
        is returned dequantizes to exactly `weight`."""
        weight = np.ascontiguousarray(weight, dtype=np.float32)
        found = [self._rows.get(xxhash.xxh3_128_digest(row)) for row in weight]
        if not found or any(f is None for f in found):
            return None
        fmts = {f[0] for f in found if f is not None}
        if len(fmts) != 1:
            return None
        return QuantRows(fmts.pop(), np.stack([f[1] for f in found if f is not None]))


class GGUFFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.reader = GGUFReader(path)

    @classmethod
    def open(cls, path: Path) -> GGUFFile:
        """Shared instance per file version: config, weights and tokenizer all read the same
        file."""
        st = os.stat(path)
        return _open_cached(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)

    def field(self, key: str, default: Any = None) -> Any:
        return self.reader.fields.get(key, default)

    @property
    def architecture(self) -> str:
        return str(self.field("general.architecture"))

    def has_tensor(self, name: str) -> bool:
        return any(t.name == name for t in self.reader.tensors)

    def model_config(self) -> ModelConfig:
        arch = self.architecture
        if arch not in ("llama", "qwen2", "mistral"):
            raise UnsupportedModel(f"GGUF general.architecture={arch!r} is not supported")
        if self.has_tensor("rope_freqs.weight"):
            raise UnsupportedModel("GGUF rope_freqs (llama3 rope scaling) is not supported yet")

        def req(key: str) -> Any:
            value = self.field(f"{arch}.{key}")
            if value is None:
                raise UnsupportedModel(f"GGUF metadata {arch}.{key} is missing")
            return value

        hidden = int(req("embedding_length"))
        num_heads = int(req("attention.head_count"))
        head_dim = int(self.field(f"{arch}.attention.key_length") or hidden // num_heads)
        scaling: tuple[tuple[str, object], ...] | None = None
        if self.field(f"{arch}.rope.scaling.type") == "linear":
            factor = float(self.field(f"{arch}.rope.scaling.factor"))
            scaling = (("factor", factor), ("rope_type", "linear"))
        tokens = self.field("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens is not None else int(req("vocab_size"))
        eos = self.field("tokenizer.ggml.eos_token_id")
        bos = self.field("tokenizer.ggml.bos_token_id")
        return ModelConfig(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(req("feed_forward_length")),
            num_layers=int(req("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(self.field(f"{arch}.attention.head_count_kv") or num_heads),
            head_dim=head_dim,
            rms_norm_eps=float(req("attention.layer_norm_rms_epsilon")),
            rope_theta=float(self.field(f"{arch}.rope.freq_base") or 10000.0),
            rope_scaling=scaling,
            max_position_embeddings=int(req("context_length")),
            attention_bias=self.has_tensor("blk.0.attn_q.bias"),
            tie_word_embeddings=not self.has_tensor("output.weight"),
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=() if eos is None else (int(eos),),
        )

    def tensors(self, config: ModelConfig, rows: RowIndex | None = None
                ) -> Iterator[tuple[str, np.ndarray]]:
        """(hf_name, C-contiguous float32 array) for every tensor, Q/K rows back in HF order.
        `rows`: each quantized tensor's stored rows are added to it as they are read."""
        permute = self.architecture in _PERMUTED_ARCHS
        for t in self.reader.tensors:
            name = _hf_name(t.name)
            if name is None:
                raise UnsupportedModel(f"unexpected GGUF tensor {t.name!r}")
            array = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            if rows is not None:
                rows.add(np.asarray(t.data), t.tensor_type, array)
            # GGML lists dims fastest-first; torch wants them slowest-first.
            array = array.reshape(tuple(int(d) for d in reversed(t.shape)))
            if permute and ".q_proj." in name:
                array = _unpermute(array, config.num_heads)
            elif permute and ".k_proj." in name:
                array = _unpermute(array, config.num_kv_heads)
            # Copy: unquantized tensors are read-only views of the memory-mapped file.
            yield name, np.array(array, dtype=np.float32, order="C", copy=True)


@lru_cache(maxsize=2)
def _open_cached(path: str, mtime_ns: int, size: int) -> GGUFFile:
    return GGUFFile(Path(path))


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp convert_hf_to_gguf's permute (which interleaves rotary halves)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)
