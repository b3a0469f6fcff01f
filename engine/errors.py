"""Named exceptions for the engine's expected failures."""


class EngineError(Exception):
    """Base class of every expected engine failure."""


class ModelNotFound(EngineError):
    """The model spec names neither the embedded default, an HF directory nor a .gguf file."""


class UnsupportedModel(EngineError):
    """The model exists but uses an architecture or feature the engine does not implement."""


class InvalidModelConfig(EngineError, ValueError):
    """A model config value is missing or out of range; the message names the setting."""


class OutOfBlocks(EngineError):
    """The block allocator cannot satisfy an allocation."""


class InvalidStep(EngineError, ValueError):
    """A SeqStep is inconsistent with the cache (e.g. its block table is too short)."""


class TokenizerError(EngineError):
    """The model's tokenizer files or metadata cannot be turned into a tokenizer."""


class ChatTemplateError(EngineError):
    """The chat template is missing or raised while rendering."""
