"""Errors that carry the offending field, the value seen and what was expected."""

from __future__ import annotations

from typing import Any


class ProtocolError(ValueError):
    """A message that breaks the wire contract; it is refused before it has any effect."""

    def __init__(self, field: str, value: Any, expected: str) -> None:
        self.field = field
        self.value = _short(value)
        self.expected = expected
        super().__init__(f"{field}: got {self.value!r}, expected {expected}")

    def as_dict(self) -> dict[str, Any]:
        return {"field": self.field, "value": self.value, "expected": self.expected}


class PlanError(ValueError):
    """A fragment plan (or a request to make one) that cannot be honoured."""

    def __init__(self, what: str, value: Any, expected: str) -> None:
        self.what = what
        self.value = value
        self.expected = expected
        super().__init__(f"{what}: got {_short(value)!r}, expected {expected}")


def _short(value: Any, limit: int = 120) -> Any:
    # Hostile peers send huge values; an error message must stay a line, not a dump.
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value[:limit])
        return raw.hex() + ("…" if len(value) > limit else "")
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "…"
    if isinstance(value, (list, tuple, dict)) and len(repr(value)) > limit:
        return repr(value)[:limit] + "…"
    return value
