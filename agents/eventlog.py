"""Structured JSON-lines event logs, one file per process under the run's logs/.

Every line carries ISO wall time, monotonic time, run id, role and fragment, so logs of
different processes merge by time and a replay can rebuild the run from them alone.
"""

from __future__ import annotations

import json
import time
from typing import Any, TextIO

import structlog

from protocol.version import PROTOCOL_VERSION


def _add_monotonic(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    event.setdefault("mono", round(time.monotonic(), 6))
    return event


def _dumps(obj: Any, **_kw: Any) -> str:
    return json.dumps(obj, default=_default, separators=(",", ":"))


def _default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value[:64]).hex()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def open_event_log(stream: TextIO, *, run_id: str, role: str, fragment: int | None = None,
                   **context: Any) -> structlog.typing.FilteringBoundLogger:
    """A logger writing one JSON object per line to `stream` (opened through the sandbox)."""
    logger = structlog.wrap_logger(
        structlog.WriteLogger(stream),
        processors=[
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
            _add_monotonic,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
    )
    bound = logger.bind(run=run_id, role=role, **({"fragment": fragment} if fragment is not None else {}), **context)
    return bound


def log_start(log: Any, **fields: Any) -> None:
    """The first line of every process log: versions a replay checks before trusting the rest."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("fragsim", "pyzmq", "msgpack", "structlog", "blake3"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    log.info("process.start", protocol_version=PROTOCOL_VERSION, versions=versions, **fields)
