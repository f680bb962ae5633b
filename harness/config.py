"""Configuration of the command-line entry points."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from harness.errors import HarnessError


# Field type (as written in the dataclass) -> converter of the command-line text; tuples are comma-separated.
def _bool(text: str) -> bool:
    if text.lower() not in {"true", "false", "1", "0"}:
        raise ValueError(text)
    return text.lower() in {"true", "1"}


_CONVERTERS: dict[str, Callable[[str], object]] = {
    "bool": _bool,
    "int": int,
    "float": float,
    "str": str,
    "tuple[int, ...]": lambda text: tuple(int(item) for item in text.split(",") if item),
    "tuple[str, ...]": lambda text: tuple(item for item in text.split(",") if item),
}


def parse_overrides(overrides: list[str], base: Any) -> Any:
    """``key=value`` words -> a copy of ``base`` (a frozen config dataclass) with those fields replaced, each
    converted to its field's type."""
    types = {f.name: f.type for f in dataclasses.fields(base)}
    values: dict[str, object] = {}
    for word in overrides:
        key, sep, value = word.partition("=")
        if not sep or key not in types:
            raise HarnessError(f"bad argument {word!r}; use key=value with key one of: {', '.join(types)}")
        try:
            values[key] = _CONVERTERS[types[key]](value)
        except ValueError:
            raise HarnessError(f"bad value {value!r} for {key} (a {types[key]})") from None
    return dataclasses.replace(base, **values)
