"""The options of a run, with their defaults defined once, and run.json: the options the
launcher recorded before anything started, which the coordinator and a resume read back."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from protocol.errors import PlanError
from protocol.plan import DEFAULT_PIECE_SIZE

DEFAULT_PROMPT = "The capital of France is"
DEFAULT_MAX_NEW_TOKENS = 24
DEFAULT_PROBE = "47 + 86"  # the input whose residual stream is measured at every checkpoint
DEFAULT_THREADS = 2
DEFAULT_FRAGMENTS = 4
DEFAULT_BIND = "tcp://127.0.0.1:0"  # loopback, a free port: another address only when asked
# Liveness (the ZeroMQ Guide's Paranoid Pirate): the coordinator beats every HEARTBEAT_MS and
# tells agents to beat as often; a peer silent for DEAD_AFTER_S is dead. 3 s is six missed
# beats: a loaded 2-core machine can stall a process for over a second without it being gone.
DEFAULT_HEARTBEAT_MS = 500
DEFAULT_DEAD_AFTER_S = 3.0


@dataclass
class RunOptions:
    """Everything a user can choose about one run (`fragsim simulate`'s options)."""

    model: str | None = None
    dtype: str | None = None  # None: the source's own (float32 for the embedded model)
    fragments: int = DEFAULT_FRAGMENTS
    ranges: str | None = None
    order: str = "random"
    seed: int = 0
    stagger: float = 0.0
    parallel: bool = False
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    eval_text: str | None = None  # held-out text file of the quality metrics; None: the shipped one
    eval_corpus: str | None = None  # "lee" or a file of one document per line: lm-eval units, floors, KL tail
    eval_documents: int | None = None  # the first N documents of the corpus's eval set (None: all)
    lens: bool = True  # read every checkpoint through the model's tuned lens too, when one is cached
    probe: str = DEFAULT_PROBE
    run_dir: str | None = None
    artifacts: str = "artifacts"
    threads: int = DEFAULT_THREADS
    piece_size: int = DEFAULT_PIECE_SIZE
    kill: list[str] = field(default_factory=list)
    kill_random: int = 0
    respawn: bool = False
    respawn_delay: float = 0.0
    connect_timeout: float = 30.0  # seconds a started agent has to say HELLO before the launcher ends it
    heartbeat_ms: int = DEFAULT_HEARTBEAT_MS
    dead_after: float = DEFAULT_DEAD_AFTER_S
    kill_coordinator: str | None = None
    resume: bool = False
    bind: str = DEFAULT_BIND
    quota_bytes: int | None = None
    curve: bool = True
    insecure: bool = False  # allow --no-curve on a non-loopback address
    reassembly: str = "prefix"  # "gaps": also evaluate every arrived layer, holes skipped
    link: float | None = None  # the coordinator's total ingress, MB/s (None: unlimited)
    schedule: str = "arrival"  # who the limited link serves first: arrival, fair or prefix
    bandwidth: str | None = None  # each agent's own uplink, MB/s: "50" or "0:50,1:200"


_OPTION_NAMES = frozenset(f.name for f in fields(RunOptions))


@dataclass(frozen=True)
class RunSettings:
    """run.json: the options plus what planning decided (the launch order, the source)."""

    options: RunOptions
    order: list[int]  # the launch order the option's spec resolved to
    source_dir: str

    @property
    def prompt(self) -> str:
        return self.options.prompt

    @property
    def max_new_tokens(self) -> int:
        return self.options.max_new_tokens

    @property
    def threads(self) -> int:
        return self.options.threads

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self.options), "order": list(self.order), "source_dir": self.source_dir}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSettings:
        if not isinstance(data, dict):
            raise PlanError("run.json", type(data).__name__, "a JSON object")
        order = data.get("order")
        if not isinstance(order, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in order):
            raise PlanError("run.json order", order, "a list of fragment indices")
        source_dir = data.get("source_dir")
        if not isinstance(source_dir, str):
            raise PlanError("run.json source_dir", source_dir, "the source checkpoint's path")
        options = RunOptions(**{k: v for k, v in data.items() if k in _OPTION_NAMES and k != "order"})
        options.order = ",".join(str(i) for i in order)  # the resolved order is an explicit spec
        for name, typ in (
            ("prompt", str),
            ("probe", str),
            ("max_new_tokens", int),
            ("threads", int),
            ("heartbeat_ms", int),
            ("dead_after", float),
        ):
            if not isinstance(getattr(options, name), typ):
                raise PlanError(f"run.json {name}", getattr(options, name), f"a {typ.__name__}")
        return cls(options, list(order), source_dir)
