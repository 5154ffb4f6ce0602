"""The wire contract between agents and the coordinator: pure code, no sockets, no files."""

from protocol.errors import PlanError, ProtocolError
from protocol.version import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION", "PlanError", "ProtocolError"]
