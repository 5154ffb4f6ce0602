"""Build an object in a background thread and hand it over on first use."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Background(Generic[T]):
    """torch and transformers take seconds to import: the coordinator builds its
    reassembler while the first agents stream, and `get()` waits for it."""

    def __init__(self, build: Callable[[], T], name: str) -> None:
        self._build = build
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._build()
        except BaseException as exc:  # surfaced on first use, in the caller's thread
            self._error = exc

    def get(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"building in the background ({self._thread.name}) failed") from self._error
        assert self._value is not None
        return self._value
