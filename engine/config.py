"""Typed, validated model configuration shared by every loader."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.errors import InvalidModelConfig, UnsupportedModel

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, object], ...] | None
    max_position_embeddings: int
    attention_bias: bool
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # Mistral's sliding window: a query sees only the last `sliding_window` positions (itself
    # included). None: every earlier position.
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModel(
                f"architecture={self.architecture!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise InvalidModelConfig(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise InvalidModelConfig(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.sliding_window is not None and (
                not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise InvalidModelConfig(
                f"sliding_window must be a positive int or null, got {self.sliding_window!r}")
        if self.head_dim % 2 != 0:
            raise InvalidModelConfig(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise InvalidModelConfig(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise InvalidModelConfig(f"rope_theta must be > 0, got {self.rope_theta}")
        rope_type = self.rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModel(
                f"rope_scaling rope_type={rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        scaling = self.rope_scaling_dict
        required = {"linear": ("factor",),
                    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                               "original_max_position_embeddings")}.get(rope_type, ())
        for key in required:
            if key not in scaling:
                raise InvalidModelConfig(
                    f"rope_scaling.{key} is required for rope_type={rope_type}"
                )

    @property
    def rope_scaling_dict(self) -> dict[str, object]:
        return dict(self.rope_scaling) if self.rope_scaling else {}

    @property
    def rope_type(self) -> str:
        scaling = self.rope_scaling_dict
        return str(scaling.get("rope_type", scaling.get("type", "default")))

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """From a transformers config.json dict (v4 `rope_scaling` or v5 `rope_parameters`)."""
        model_type = d.get("model_type")
        if model_type is None:
            raise InvalidModelConfig("model_type is missing from config.json")
        try:
            hidden = int(d["hidden_size"])
            num_heads = int(d["num_attention_heads"])
            head_dim = d.get("head_dim") or hidden // num_heads
            rope_params: dict[str, object] = dict(d.get("rope_parameters") or {})
            legacy_scaling = d.get("rope_scaling")
            if legacy_scaling:
                rope_params.update(legacy_scaling)
            rope_theta = float(rope_params.pop("rope_theta", d.get("rope_theta", 10000.0)))  # type: ignore[arg-type]
            rope_params.pop("partial_rotary_factor", None)
            rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
            scaling = None if rope_type == "default" else _freeze(rope_params)
            eos = d.get("eos_token_id")
            eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
            return cls(
                architecture=str(model_type),
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=scaling,
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                # Qwen2 always has qkv bias; its config has no attention_bias key.
                attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=eos_ids,
                # Qwen2 configs carry a sliding_window that only applies with use_sliding_window
                # (off in every released model); Mistral's applies whenever it is set.
                sliding_window=(int(d["sliding_window"]) if model_type == "mistral"
                                and d.get("sliding_window") is not None else None),
            )
        except KeyError as exc:
            raise InvalidModelConfig(f"{exc.args[0]} is missing from config.json") from exc


def _freeze(d: Mapping[str, object]) -> tuple[tuple[str, object], ...]:
    return tuple(sorted(d.items()))
