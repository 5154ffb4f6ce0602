"""Structured JSON-lines event logs, one file per process under the run's logs/.

Every line carries ISO wall time, monotonic time (system-wide on Linux, so logs of different
processes merge by it), run id, role and fragment. Lines are numbered (`seq`) and chained:
`prev` is the BLAKE3 of the previous line this process wrote, so a removed or edited line
is found exactly where it happened. A replay rebuilds the run from these files alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import MutableMapping
from typing import Any, TextIO, cast

import structlog
from blake3 import blake3

from protocol.log_events import PROCESS_START
from protocol.version import PROTOCOL_VERSION


def _add_monotonic(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event.setdefault("mono", round(time.monotonic(), 6))
    return event


def _default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value[:64]).hex()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


class ChainedJSONRenderer:
    """Render one JSON line with its sequence number and the digest of the line before it."""

    def __init__(self) -> None:
        self.seq = 0
        self.prev: str | None = None

    def __call__(self, _logger: Any, _name: str, event: MutableMapping[str, Any]) -> str:
        event["seq"] = self.seq
        event["prev"] = self.prev
        line = json.dumps(event, default=_default, separators=(",", ":"))
        self.seq += 1
        self.prev = line_digest(line)
        return line


def line_digest(line: str) -> str:
    return blake3(line.encode()).hexdigest()[:32]


def open_event_log(
    stream: TextIO, *, run_id: str, role: str, fragment: int | None = None, **context: Any
) -> structlog.typing.FilteringBoundLogger:
    """A logger writing one JSON object per line to `stream` (`Sandbox.open_log`)."""
    logger = structlog.wrap_logger(
        structlog.WriteLogger(stream),
        processors=[
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
            _add_monotonic,
            structlog.processors.format_exc_info,
            ChainedJSONRenderer(),
        ],
    )
    bound = logger.bind(run=run_id, role=role, **({"fragment": fragment} if fragment is not None else {}), **context)
    return cast(structlog.typing.FilteringBoundLogger, bound)


def log_start(log: Any, **fields: Any) -> None:
    """The first line of every process log: versions a replay checks before trusting the rest."""
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for package in ("fragsim", "pyzmq", "msgpack", "structlog", "blake3"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    log.info(PROCESS_START, protocol_version=PROTOCOL_VERSION, versions=versions, **fields)
