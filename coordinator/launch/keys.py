"""Per-run CURVE keys: one pair for the coordinator, one per agent.

Secret keys are written owner-only (0600) inside the run directory; the public keys go into
the plan, so the coordinator admits exactly the plan's agents and knows which key may speak
for which fragment.
"""

from __future__ import annotations

import zmq

from sandbox import Sandbox, layout


def make_run_keys(box: Sandbox, fragments: int) -> dict[str, object]:
    """Generate and store every key pair of a run; returns the public half for the plan."""
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq was built without CURVE; expected a pyzmq wheel with libsodium/tweetnacl")
    public: dict[str, object] = {}
    agents: dict[str, str] = {}
    for fragment in [None, *range(fragments)]:
        pub, secret = zmq.curve_keypair()
        box.write_bytes(layout.public_key(fragment), pub + b"\n")
        box.write_bytes(layout.secret_key(fragment), secret + b"\n", mode=0o600)
        if fragment is None:
            public["coordinator"] = pub.decode()
        else:
            agents[str(fragment)] = pub.decode()
    public["agents"] = agents
    return public
