"""Tokenizer built from a model's own files: HF tokenizer.json or GGUF tokenizer.ggml.* metadata."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from engine.chat_template import ChatTemplate
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import ChatTemplateError, TokenizerError
from engine.gguf_file import GGUFFile

__all__ = ["IncrementalDetokenizer", "Tokenizer"]

_CONTROL = 3
_USER_DEFINED = 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre values whose split regex differs from GPT-2's; anything else (e.g.
# SmolLM2's "smollm") uses the plain GPT-2 byte-level regex, as transformers does.
_PRE_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


class Tokenizer:
    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_token: str | None,
        eos_tokens: Sequence[str],
        chat_template: str | None,
        special_tokens: Mapping[str, str | None],
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.bos_token_id: int | None = (
            None if bos_token is None else backend.token_to_id(bos_token)
        )
        ids = [backend.token_to_id(t) for t in eos_tokens]
        self.eos_token_ids: tuple[int, ...] = tuple(i for i in ids if i is not None)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self._chat_template = (
            None if chat_template is None else ChatTemplate(chat_template, special_tokens)
        )

    @property
    def chat_template(self) -> str | None:
        return None if self._chat_template is None else self._chat_template.source

    def encode(self, text: str) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> str:
        if self._chat_template is None:
            raise ChatTemplateError("this model's tokenizer has no chat template")
        return self._chat_template.render(messages, add_generation_prompt)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"{path} has no tokenizer.json")
        backend = HFTokenizer.from_file(str(tok_file))
        cfg_file = path / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        template = _hf_chat_template(path, cfg)
        special = {
            name: _token_content(cfg.get(name))
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        eos = special["eos_token"]
        return cls(
            backend,
            bos_token=special["bos_token"],
            eos_tokens=() if eos is None else (eos,),
            chat_template=template,
            special_tokens=special,
        )

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        gguf = GGUFFile.open(Path(path))
        kind = gguf.field("tokenizer.ggml.model")
        if kind != "gpt2":
            raise TokenizerError(
                f"GGUF tokenizer.ggml.model={kind!r} is not supported (only byte-level 'gpt2')"
            )
        tokens: list[str] = list(gguf.field("tokenizer.ggml.tokens"))
        types: list[int] = list(gguf.field("tokenizer.ggml.token_type") or [])
        merges: list[str] = list(gguf.field("tokenizer.ggml.merges") or [])
        backend = _byte_level_bpe(tokens, types, merges, gguf.field("tokenizer.ggml.pre"))

        def token(key: str) -> str | None:
            token_id = gguf.field(f"tokenizer.ggml.{key}")
            return None if token_id is None else tokens[int(token_id)]

        special = {
            "bos_token": token("bos_token_id"),
            "eos_token": token("eos_token_id"),
            "unk_token": token("unknown_token_id"),
            "pad_token": token("padding_token_id"),
        }
        if gguf.field("tokenizer.ggml.add_bos_token") and special["bos_token"] is not None:
            bos = special["bos_token"]
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                special_tokens=[(bos, tokens.index(bos))],
            )
        eos_tokens = [t for t in (special["eos_token"], token("eot_token_id")) if t is not None]
        return cls(
            backend,
            bos_token=special["bos_token"],
            eos_tokens=list(dict.fromkeys(eos_tokens)),
            chat_template=gguf.field("tokenizer.chat_template"),
            special_tokens=special,
        )


def _byte_level_bpe(
    tokens: list[str], types: list[int], merges: list[str], pre: str | None
) -> HFTokenizer:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Tokens outside the byte alphabet (e.g. raw unicode in some converters) are respelled.
    vocab = {
        (t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
        for i, t in enumerate(tokens)
    }
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))  # type: ignore[arg-type]
    split = _PRE_SPLITS.get(pre or "")
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    # Control tokens must stay whole and be skippable; a "control" token spelled outside the
    # byte alphabet is a llama.cpp mislabel and is left alone (as transformers does).
    backend.add_special_tokens([
        AddedToken(t, normalized=False, special=True)
        for t, kind in zip(tokens, types, strict=False)
        if kind == _CONTROL and set(t) <= alphabet
    ])
    backend.add_tokens([
        AddedToken(t, normalized=False, special=False)
        for t, kind in zip(tokens, types, strict=False)
        if kind == _USER_DEFINED and t in vocab
    ])
    return backend


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return str(value.get("content"))
    return None if value is None else str(value)


def _hf_chat_template(path: Path, cfg: Mapping[str, Any]) -> str | None:
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    template = cfg.get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        return named.get("default")
    if template is None and (path / "chat_template.json").is_file():
        return str(json.loads((path / "chat_template.json").read_text())["chat_template"])
    return template
