"""Per-run CURVE keys: one pair for the coordinator, one per agent.

Secret keys are written owner-only (0600) inside the run directory; the public keys go into
the plan, so the coordinator admits exactly the plan's agents and knows which key may speak
for which fragment.
"""

from __future__ import annotations

from pathlib import Path

import zmq

KEYS_DIR = "keys"


def _name(fragment: int | None) -> str:
    return "coordinator" if fragment is None else f"agent_{fragment:02d}"


def make_run_keys(box, fragments: int) -> dict[str, object]:
    """Generate and store every key pair of a run; returns the public half for the plan."""
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq was built without CURVE; expected a pyzmq wheel with libsodium/tweetnacl")
    public: dict[str, object] = {}
    agents: dict[str, str] = {}
    for fragment in [None, *range(fragments)]:
        pub, secret = zmq.curve_keypair()
        box.write_bytes(f"{KEYS_DIR}/{_name(fragment)}.public", pub + b"\n")
        box.write_bytes(f"{KEYS_DIR}/{_name(fragment)}.secret", secret + b"\n", mode=0o600)
        if fragment is None:
            public["coordinator"] = pub.decode()
        else:
            agents[str(fragment)] = pub.decode()
    public["agents"] = agents
    return public


def load_keys(run_dir: Path, fragment: int | None) -> tuple[bytes, bytes]:
    """(public, secret) of the coordinator (fragment None) or of one agent."""
    base = run_dir / KEYS_DIR / _name(fragment)
    return base.with_suffix(".public").read_bytes().strip(), base.with_suffix(".secret").read_bytes().strip()


def configure_client(sock: zmq.Socket, run_dir: Path, fragment: int, server_public: str) -> None:
    public, secret = load_keys(run_dir, fragment)
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_serverkey = server_public.encode()
