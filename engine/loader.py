"""Locating and loading a model (HF directory or GGUF file) into a float32 CausalLM."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine import cpu_quant_linear
from engine.config import ModelConfig
from engine.digest import weights_digest
from engine.errors import InvalidModelConfig, ModelNotFound
from engine.gguf_file import GGUFFile, RowIndex
from engine.model import CausalLM
from engine.model_files import (
    hf_config,
    is_gguf,
    load_tokenizer,
    model_id_for,
    resolve_model_path,
)
from engine.packed_linear import can_pack, pack_linears, read_ahead_in_order
from engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    model: CausalLM
    tokenizer: Tokenizer | None
    model_id: str
    weights_digest: str
    dtype: torch.dtype


def load_model(
    spec: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
    few_rows: bool = True, quantized: bool = True,
) -> LoadedModel:
    """`few_rows`: on CPU, keep each linear's copy for decode-sized inputs
    (engine.packed_linear); an engine that computes only prompts does without it.
    `quantized`: for a GGUF file, that copy is the file's quantized rows where the weight is
    stored so and the kernel is available (engine.cpu_quant_linear), not float32."""
    path = resolve_model_path(spec)
    if is_gguf(path):
        gguf = GGUFFile.open(path)
        config = gguf.model_config()
        # Only where the quantized kernel would compute from them (engine.cpu_quant_linear).
        rows = (RowIndex() if quantized and few_rows and device == "cpu"
                and dtype == torch.float32 and cpu_quant_linear.available() else None)
        arrays = gguf.tensors(config, rows)
        model = _build(config, ((n, torch.from_numpy(a)) for n, a in arrays), dtype, device,
                       few_rows, rows)
        files = [path]
    else:
        config = hf_config(path)
        files = _safetensors_files(path)
        model = _build(config, _iter_safetensors(files), dtype, device, few_rows)
    return LoadedModel(
        config=config,
        model=model,
        tokenizer=load_tokenizer(path),
        model_id=model_id_for(path),
        weights_digest=weights_digest(files),
        dtype=dtype,
    )


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / name for name in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFound(f"model directory {path} has no *.safetensors weights")
    return files


def _iter_safetensors(files: list[Path]) -> Iterable[tuple[str, torch.Tensor]]:
    for file in files:
        yield from load_file(str(file)).items()


def _build(
    config: ModelConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    device: str,
    few_rows: bool = True,
    rows: RowIndex | None = None,
) -> CausalLM:
    """`rows`: the quantized rows of the file the tensors came from (filled as `tensors` is
    read); decode-sized inputs compute from them where a weight is stored so."""
    # Built on the meta device so no time is spent on random init that is overwritten anyway.
    with torch.device("meta"):
        model = CausalLM(config)
    expected = set(model.state_dict().keys())
    state: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name not in expected:
            raise InvalidModelConfig(f"unexpected weight {name!r} for {config.architecture}")
        state[name] = tensor.to(device=device, dtype=dtype)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing = expected - set(state)
    if missing:
        raise InvalidModelConfig(f"weights missing from checkpoint: {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Non-persistent buffer: never in a checkpoint. RotaryEmbedding computed it on the CPU even
    # inside the meta-device build (float32, kept so); it only moves to the model's device.
    rope = model.model.rotary_emb
    rope.inv_freq = rope.inv_freq.to(device)
    model.fuse_projections()
    if can_pack(model):
        pack_linears(model, few_rows=few_rows, rows=rows)
        read_ahead_in_order(model.linears_in_step_order())
    return model.eval()
