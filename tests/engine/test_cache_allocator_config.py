from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import ModelConfig
from engine.errors import (
    InvalidModelConfig,
    InvalidStep,
    ModelNotFound,
    UnsupportedModel,
)
from engine.kv_cache import PagedKVCache
from engine.loader import load_model
from engine.model_files import load_model_config, resolve_model_path
from engine.runner import ModelRunner, SeqStep
from tests.helpers.tiny_models import smollm2_gguf_path


def test_read_write_block_roundtrip_layout() -> None:
    kv = PagedKVCache(num_layers=3, num_blocks=4, block_size=2, num_kv_heads=2, head_dim=4,
                      dtype=torch.float32)
    kv.k.copy_(torch.randn_like(kv.k))
    kv.v.copy_(torch.randn_like(kv.v))
    data = kv.read_block(1)
    assert data.shape == (3, 2, 2, 2, 4) and data.is_contiguous()
    assert torch.equal(data[2, 0], kv.k[2, 1]) and torch.equal(data[2, 1], kv.v[2, 1])
    assert kv.block_nbytes == data.numel() * 4
    kv.write_block(3, data)
    assert torch.equal(kv.read_block(3), data)
    with pytest.raises(ValueError):
        kv.write_block(0, data[:2])


def hf_dict(**over: object) -> dict:
    base = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                rope_theta=5000.0, eos_token_id=[2, 3], max_position_embeddings=64)
    return {**base, **over}


def test_config_from_hf_dict_legacy_and_v5_rope() -> None:
    legacy = ModelConfig.from_hf_dict(hf_dict(rope_scaling={"type": "linear", "factor": 2.0}))
    v5 = ModelConfig.from_hf_dict(hf_dict(rope_theta=None, rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}))
    assert legacy.rope_type == v5.rope_type == "linear" and v5.rope_theta == 5000.0
    assert legacy.eos_token_ids == (2, 3) and legacy.head_dim == 16
    assert ModelConfig.from_hf_dict(hf_dict(model_type="qwen2")).attention_bias


@pytest.mark.parametrize("over,exc,name", [
    ({"num_key_value_heads": 3}, InvalidModelConfig, "num_kv_heads"),
    ({"model_type": "gpt2"}, UnsupportedModel, "architecture"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, UnsupportedModel, "rope_type"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 2.0}}, InvalidModelConfig,
     "low_freq_factor"),
    ({"hidden_size": None}, InvalidModelConfig, "hidden_size"),
])
def test_config_errors_name_the_setting(over: dict, exc: type, name: str) -> None:
    d = hf_dict(**over)
    if over.get("hidden_size", 1) is None:
        del d["hidden_size"]
    with pytest.raises(exc, match=name):
        ModelConfig.from_hf_dict(d)


def test_resolve_model_path(tmp_path: Path) -> None:
    assert resolve_model_path("smollm2") == smollm2_gguf_path()
    with pytest.raises(ModelNotFound):
        resolve_model_path(tmp_path / "nope")
    with pytest.raises(ModelNotFound, match="config.json"):
        resolve_model_path(tmp_path)


def test_hf_dir_load_identity(tiny_model_dirs: dict[str, Path]) -> None:
    path = tiny_model_dirs["llama_tied"]
    loaded = load_model(path)
    assert loaded.model_id == "llama_tied"
    assert loaded.config == load_model_config(path)
    # Tied: the logits are the hidden state against the embedding matrix (the packed lm_head is
    # a oneDNN copy of it, not a second weight from the checkpoint).
    hidden = torch.randn(3, loaded.config.hidden_size)
    embed = loaded.model.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.compute_logits(hidden), hidden @ embed.T,
                                   atol=1e-5, rtol=1e-5)
    other = load_model(tiny_model_dirs["llama"])
    assert len(loaded.weights_digest) == 32 and loaded.weights_digest != other.weights_digest


def test_runner_rejects_short_block_table(tiny_model_dirs: dict[str, Path]) -> None:
    runner = ModelRunner(load_model(tiny_model_dirs["llama"]), num_blocks=4, block_size=16)
    with pytest.raises(InvalidStep, match="block_table"):
        runner.step([SeqStep(tuple(range(3, 20)), 0, (0,))])
