"""Command-line flags built from a role's config dataclass, so each default is written once.

A field becomes `--field-name` with the field's default; its metadata may add `help`, a `flag`
name other than the field's, `size=True` (accepts 64KiB, 1GiB, ...), `cpus=True` (a
comma-separated list of CPU numbers) or `repeat=True` (a tuple given by repeating the flag).
`config_from_args` builds the dataclass back from the parsed namespace, so validation stays in
the dataclass's `__post_init__`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

from pantry.common.errors import ConfigError

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
_UNITS = {"": 1, "B": 1, "K": KIB, "KB": KIB, "KIB": KIB, "M": MIB, "MB": MIB, "MIB": MIB,
          "G": GIB, "GB": GIB, "GIB": GIB}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")

T = TypeVar("T")


def parse_size(text: str | int) -> int:
    """'256MiB' -> 268435456. Binary units; KB/MB/GB are treated as KiB/MiB/GiB too."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ConfigError(f"not a size: {text!r} (use e.g. 4096, 64KiB, 256MiB, 1GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_size(n: int) -> str:
    """268435456 -> '256MiB': how a size default reads in --help."""
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def parse_cpus(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError as exc:
        raise ConfigError(f"cpus: {text!r} is not a comma-separated list of CPU numbers") from exc


def flag_name(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("flag", f.name)).replace("_", "-")


def add_config_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type[Any],
    *,
    skip: Collection[str] = (),
    required: Collection[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """One flag per field of `cls` not in `skip`. `defaults` overrides a field's default for
    this command only (pantry local's smaller KV cache, say); `required` fields have none."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        default = _default(f)
        if defaults and f.name in defaults:
            default = defaults[f.name]
        kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata.get("help")}
        hint = hints[f.name]
        if f.metadata.get("repeat"):
            kwargs.update(action="append", type=str)
        elif f.metadata.get("size"):
            kwargs.update(type=_argument_type(parse_size))
        elif f.metadata.get("cpus"):
            kwargs.update(type=_argument_type(parse_cpus))
        elif hint is bool:
            kwargs.update(action=argparse.BooleanOptionalAction)
        else:
            kwargs.update(type=_scalar_type(hint))
        if f.name in required or default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
            shown = format_size(default) if f.metadata.get("size") else _shown(default)
            if "default" not in (kwargs["help"] or ""):  # the help may say it better
                kwargs["help"] = f"{kwargs['help'] or ''} (default: {shown})".lstrip()
        parser.add_argument(f"--{flag_name(f)}", **kwargs)


def default_of(cls: type[Any], name: str) -> Any:
    """Another config's default for the same setting, so it is written once."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = _default(field)
    assert default is not dataclasses.MISSING, f"{cls.__name__}.{name} has no default"
    return default


def field_like(cls: type[Any], name: str) -> Any:
    """A field with another config's default and help for the same setting (a role's flag that
    `pantry local` passes on): both written once, where the role defines them."""
    source = next(f for f in dataclasses.fields(cls) if f.name == name)
    return dataclasses.field(default=default_of(cls, name), metadata=source.metadata)


def config_from_args(cls: type[T], ns: argparse.Namespace, **overrides: Any) -> T:
    """The config dataclass from parsed flags; `overrides` win over the namespace."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif hasattr(ns, f.name):
            value = getattr(ns, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse shows an ArgumentTypeError's own message ("not a size: 'lots' (use e.g. ...)")
    instead of "invalid parse_size value"."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    convert.__name__ = parse.__name__
    return convert


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _scalar_type(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args:  # Optional[X] / X | None
        return _scalar_type(args[0])
    return hint if hint in (int, float, str) else str


def _shown(value: Any) -> str:
    if value is None or value == "" or value == ():
        return "none"
    return str(value)
