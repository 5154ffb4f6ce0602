"""CURVE on the coordinator's socket: pyzmq's ZAP authenticator admitting only the plan's
agent keys, and a socket monitor that reports failed handshakes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from protocol import link
from protocol import log_events as E
from protocol.plan import Plan
from sandbox import layout

_HANDSHAKE_EVENTS: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no detail",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "authentication",
}


class _PlanKeys:
    """ZAP credentials provider: a key is admitted only if the plan names it. Denials are
    queued, and logged by the loop's thread (the log's hash chain is single-threaded)."""

    def __init__(self, allowed: set[str]) -> None:
        self.allowed = allowed
        self.denied: list[str] = []

    def callback(self, domain: str, key: bytes) -> bool:
        text = key.decode(errors="replace")
        if text not in self.allowed:
            self.denied.append(text)
            return False
        return True


class CurveGuard:
    def __init__(self, ctx: zmq.Context[Any], sock: zmq.Socket[Any], plan: Plan, run_dir: Path) -> None:
        curve = plan.extra["curve"]
        public, secret = layout.read_key_pair(run_dir, None)
        if public.decode() != curve["coordinator"]:
            raise RuntimeError(
                f"{layout.public_key(None)} is {public.decode()!r}; the plan expects {curve['coordinator']!r}"
            )
        self.keys = _PlanKeys(set(curve["agents"].values()))
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        self.auth.configure_curve_callback(domain="*", credentials_provider=self.keys)
        sock.curve_server = True
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        self.sock = sock
        self.monitor = sock.get_monitor_socket(sum(_HANDSHAKE_EVENTS))

    def report(self, log: Any, progress: Any) -> None:
        """Log denied keys and failed handshakes since the last call."""
        while self.keys.denied:
            key = self.keys.denied.pop(0)
            log.warning(
                E.AUTH_DENIED, key=key, reason="CURVE key not in the plan", expected="one of the plan's agent keys"
            )
            progress(link.REJECTED, peer="?", reason=f"CURVE handshake refused: key {key[:12]}… is not in the plan")
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            name = _HANDSHAKE_EVENTS.get(event["event"], str(event["event"]))
            log.warning(
                E.AUTH_HANDSHAKE_FAILED,
                kind=name,
                code=event["value"],
                expected="a CURVE handshake with a key from the plan",
            )
            progress(link.REJECTED, peer="?", reason=f"handshake failed ({name})")

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close()
        self.auth.stop()
