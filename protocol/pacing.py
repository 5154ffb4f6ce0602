"""A token bucket over bytes, with the caller's clock: the coordinator's link budget (times
from its events, so a replay refills it identically) and an agent's paced uplink."""

from __future__ import annotations

from protocol.errors import PlanError

# A bucket holds at most this many seconds of its rate: after an idle spell a link may carry
# a burst this long, no more (the rate holds over any window longer than this).
BURST_S = 0.05


class TokenBucket:
    """`rate` bytes per second, kept as the moment its debt is paid (GCRA's theoretical arrival
    time): reading it never changes it, so a coordinator tick that grants nothing changes no
    state (such ticks are not logged, and a replay must reach the same decisions without them).
    Tokens may go negative: a piece is sent whole, and what it overdraws is repaid before the
    next one goes."""

    def __init__(self, rate: float, burst_s: float = BURST_S) -> None:
        if not rate > 0:
            raise ValueError(f"rate {rate!r}: expected bytes per second > 0")
        self.rate = float(rate)
        self.burst_s = burst_s
        self.capacity = self.rate * burst_s
        self.paid_at: float | None = None  # None: not started, no tokens

    def start(self, t: float) -> None:
        """Begin empty at `t`: the first bytes are paid for, not a free burst."""
        if self.paid_at is None:
            self.paid_at = t

    def tokens(self, t: float) -> float:
        if self.paid_at is None:
            return 0.0
        return min(self.capacity, (t - self.paid_at) * self.rate)

    def ready(self, t: float) -> bool:
        return self.paid_at is not None and t > self.paid_at

    def take(self, t: float, nbytes: float) -> None:
        self.start(t)
        assert self.paid_at is not None
        self.paid_at = max(self.paid_at, t - self.burst_s) + nbytes / self.rate

    def give(self, t: float, nbytes: float) -> None:
        """Bytes reserved and then not used (a smaller piece, a peer that died)."""
        if self.paid_at is not None:
            self.paid_at = max(max(self.paid_at, t - self.burst_s) - nbytes / self.rate, t - self.burst_s)

    def wait_s(self, t: float) -> float:
        """Seconds from `t` until the bucket is ready again."""
        return 0.0 if self.ready(t) or self.paid_at is None else self.paid_at - t + 1e-6


def uplinks(spec: str | None, fragments: int) -> dict[int, float]:
    """--bandwidth: "50" (MB/s for every agent) or "0:50,1:200" (per fragment; the others are
    unlimited) -> {fragment: bytes/s}."""
    if spec is None or not spec.strip():
        return {}
    if ":" not in spec:
        return {i: _rate(spec, spec) for i in range(fragments)}
    out: dict[int, float] = {}
    for part in spec.split(","):
        index, sep, rate = part.partition(":")
        if not sep or not index.strip().isdigit():
            raise PlanError("--bandwidth", spec, f'FRAGMENT:MB/s pairs like "0:50,1:200" ({part!r} is not one)')
        fragment = int(index)
        if not 0 <= fragment < fragments or fragment in out:
            raise PlanError("--bandwidth", spec, f"distinct fragments 0..{fragments - 1} (not {fragment})")
        out[fragment] = _rate(rate, spec)
    return out


def _rate(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise PlanError("--bandwidth", spec, f"rates in MB/s > 0 ({text!r} is not one)")
    return value * 1e6
