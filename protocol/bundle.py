"""An agent bundle: everything one host needs to serve one fragment, in one file.

`fragsim plan` writes one per fragment (owner-only): the plan, that fragment's CURVE key pair
and the coordinator's public key, nothing else. The agent reads it with `read_bundle`, which
checks it against itself: the plan's digest, the fragment's index, and that the keys are the
ones the plan admits for that fragment.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.errors import PlanError
from protocol.plan import Plan, plan_from_json

BUNDLE_FORMAT = 1
Z85_KEY = re.compile(r"[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")


@dataclass(frozen=True)
class Bundle:
    fragment: int
    plan: Plan
    agent_public: bytes | None  # None: a plan without CURVE (loopback measurements only)
    agent_secret: bytes | None
    coordinator_public: bytes | None


def bundle_bytes(
    plan: Plan, fragment: int, keys: tuple[bytes, bytes] | None, coordinator_public: bytes | None
) -> bytes:
    doc: dict[str, Any] = {
        "fragsim_bundle": BUNDLE_FORMAT,
        "fragment": fragment,
        "plan": plan.to_json(),
        "agent_public": keys[0].decode() if keys else None,
        "agent_secret": keys[1].decode() if keys else None,
        "coordinator_public": coordinator_public.decode() if coordinator_public else None,
    }
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def read_bundle(path: Path, fragment: int | None = None) -> Bundle:
    """The bundle at `path`, checked; `fragment`, when given, must be the bundle's."""
    where = str(path)
    try:
        doc = json.loads(Path(path).read_bytes())
    except OSError as exc:
        raise PlanError("--bundle", where, f"a readable bundle file ({exc.strerror})") from None
    except ValueError:
        raise PlanError("--bundle", where, "a bundle written by fragsim plan (JSON)") from None
    if not isinstance(doc, dict) or doc.get("fragsim_bundle") != BUNDLE_FORMAT:
        raise PlanError("--bundle", where, f"a fragsim bundle of format {BUNDLE_FORMAT} (written by fragsim plan)")
    if not isinstance(doc.get("plan"), dict):
        raise PlanError("bundle plan", type(doc.get("plan")).__name__, "the run's plan (an object)")
    plan = plan_from_json(doc["plan"])  # checks the plan's own digest
    index = doc.get("fragment")
    if not isinstance(index, int) or not 0 <= index < len(plan.fragments):
        raise PlanError("bundle fragment", index, f"a fragment of the plan, 0..{len(plan.fragments) - 1}")
    if fragment is not None and fragment != index:
        raise PlanError("--fragment", fragment, f"{index}: the bundle {where} is for fragment {index}")
    keys = [doc.get(k) for k in ("agent_public", "agent_secret", "coordinator_public")]
    curve = plan.extra.get("curve")
    if not curve:
        if any(k is not None for k in keys):
            raise PlanError("bundle keys", "present", "none: the plan runs without CURVE")
        return Bundle(index, plan, None, None, None)
    for name, value in zip(("agent_public", "agent_secret", "coordinator_public"), keys, strict=True):
        if not isinstance(value, str) or not Z85_KEY.fullmatch(value):
            raise PlanError(f"bundle {name}", value if not name.endswith("secret") else "…", "a 40-character Z85 key")
    if keys[0] != curve["agents"].get(str(index)):
        raise PlanError("bundle agent_public", keys[0], f"the key the plan admits for fragment {index}")
    if keys[2] != curve["coordinator"]:
        raise PlanError("bundle coordinator_public", keys[2], "the plan's coordinator key")
    public, secret, server = (str(k) for k in keys)
    return Bundle(index, plan, public.encode(), secret.encode(), server.encode())
