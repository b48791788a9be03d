"""Reading a JSON request body one field at a time, with OpenAI-style 400s that name the field.

`Body` remembers which fields were read, so that whatever a parser did not read is, by
construction, a field it does not know: `reject_unknown()` turns those into a 400. That is how
the server keeps its promise never to drop a parameter silently.
"""

from __future__ import annotations

import json
import math
from typing import Any

from llmserve.server.errors import bad_request

_MISSING = object()


class Body:
    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data
        self._read: set[str] = set()

    def raw(self, name: str) -> Any:
        """The value, or None when absent or JSON null (OpenAI treats the two alike)."""
        self._read.add(name)
        return self._data.get(name)

    def has(self, name: str) -> bool:
        return self._data.get(name) is not None

    def int_(
        self, name: str, default: int | None, *, low: int | None = None, high: int | None = None
    ) -> int | None:
        value = self.raw(name)
        return default if value is None else check_int(name, value, low=low, high=high)

    def number(
        self, name: str, default: float, *, low: float | None = None, high: float | None = None
    ) -> float:
        value = self.raw(name)
        return default if value is None else check_number(name, value, low=low, high=high)

    def bool_(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise bad_request(f"'{name}' must be a boolean, got {_show(value)}", param=name)
        return value

    def str_(self, name: str, default: str | None) -> str | None:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise bad_request(f"'{name}' must be a string, got {_show(value)}", param=name)
        return value

    def object_(self, name: str) -> dict[str, Any] | None:
        value = self.raw(name)
        if value is not None and not isinstance(value, dict):
            raise bad_request(f"'{name}' must be an object, got {_show(value)}", param=name)
        return value

    def reject_unknown(self, unsupported: dict[str, str]) -> None:
        """400 for the first field nobody read; `unsupported` gives a better message for known ones."""
        for name in self._data:
            if name in self._read:
                continue
            if name in unsupported:
                raise bad_request(
                    f"'{name}' is not supported by this server: {unsupported[name]}", param=name
                )
            raise bad_request(f"Unrecognized request argument supplied: {name}", param=name)


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    # JSON has one number type: accept 16.0 as 16, but never true as 1.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer, got {_show(value)}", param=name)
    _check_range(name, value, low, high)
    return value


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"'{name}' must be a number, got {_show(value)}", param=name)
    _check_range(name, value, low, high)
    return float(value)


def _check_range(name: str, value: float, low: float | None, high: float | None) -> None:
    if low is not None and value < low:
        raise bad_request(f"'{name}' must be >= {low}, got {value}", param=name)
    if high is not None and value > high:
        raise bad_request(f"'{name}' must be <= {high}, got {value}", param=name)


_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    kind = "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)
    return f"{text[:60]}{'...' if len(text) > 60 else ''} ({kind})"


__all__ = ["Body", "check_int", "check_number"]
