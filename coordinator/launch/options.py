"""What the launcher holds for one run: its options and what planning made of them."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from agents.source import SourceCheckpoint
from coordinator.schedule import ARRIVAL, SCHEDULES
from protocol.errors import PlanError
from protocol.pacing import uplinks
from protocol.plan import Plan
from protocol.run_settings import RunOptions
from sandbox import Sandbox

SimulateOptions = RunOptions  # `fragsim simulate`'s options are the run's options (one definition)
DTYPES = ("float32", "bfloat16")
REASSEMBLIES = ("prefix", "gaps")


@dataclass
class PreparedRun:
    run_dir: Path
    box: Sandbox
    plan: Plan
    order: list[int]
    source_dir: Path


LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
_TCP = re.compile(r"tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.*_-]+):(?P<port>\d+|\*)")


def check_bind(endpoint: str) -> str:
    """`tcp://HOST:PORT` (PORT 0 = a free one) or `ipc://PATH`; returns the host ('' for ipc)."""
    if endpoint.startswith("ipc://") and len(endpoint) > len("ipc://"):
        return ""
    match = _TCP.fullmatch(endpoint)
    if not match or (match["port"] != "*" and not 0 <= int(match["port"]) <= 65535):
        raise PlanError("--bind", endpoint, "tcp://HOST:PORT (PORT 0..65535; 0 = a free port) or ipc://PATH")
    return match["host"]


def check_options(opts: SimulateOptions) -> None:
    """Every option a run takes, checked before anything is created (one line per problem)."""
    if opts.fragments < 1:
        raise PlanError("--fragments", opts.fragments, "at least 1")
    if not opts.prompt.strip():
        raise PlanError("--prompt", opts.prompt, "some text to generate from")
    if opts.max_new_tokens < 1:
        raise PlanError("--max-new-tokens", opts.max_new_tokens, "at least 1")
    if not opts.probe.strip():
        raise PlanError("--probe", opts.probe, "some text whose residual stream is measured")
    if opts.eval_text is not None:
        check_eval_text(Path(opts.eval_text))
    if opts.eval_corpus is not None:
        from coordinator.corpus.documents import read_corpus

        read_corpus(opts.eval_corpus, opts.eval_documents)
    elif opts.eval_documents is not None:
        raise PlanError("--eval-documents", opts.eval_documents, "--eval-corpus too (it cuts the corpus's eval set)")
    if opts.threads < 1:
        raise PlanError("--threads", opts.threads, "at least 1")
    for name in ("stagger", "respawn_delay"):
        if getattr(opts, name) < 0:
            raise PlanError(f"--{name.replace('_', '-')}", getattr(opts, name), "seconds >= 0")
    if opts.heartbeat_ms < 10:
        raise PlanError("--heartbeat-ms", opts.heartbeat_ms, "at least 10 ms")
    if opts.dead_after < 2 * opts.heartbeat_ms / 1000:
        two_beats = 2 * opts.heartbeat_ms / 1000
        raise PlanError("--dead-after", opts.dead_after, f"at least two heartbeats ({two_beats:g} s)")
    if opts.connect_timeout <= 0:
        raise PlanError("--connect-timeout", opts.connect_timeout, "seconds > 0")
    if opts.resume and opts.kill_coordinator is None:
        raise PlanError("--resume", True, "--kill-coordinator too (--resume restarts the coordinator it kills)")
    if opts.reassembly not in REASSEMBLIES:
        raise PlanError("--reassembly", opts.reassembly, f"one of {', '.join(REASSEMBLIES)}")
    check_link(opts)
    if opts.dtype is not None and opts.dtype not in DTYPES:
        raise PlanError("--dtype", opts.dtype, f"one of {', '.join(DTYPES)}")
    host = check_bind(opts.bind)
    if not opts.curve and host not in LOOPBACK_HOSTS and not opts.insecure:
        raise PlanError(
            "--no-curve with --bind",
            opts.bind,
            "a loopback address: unencrypted and unauthenticated on a network needs --insecure too",
        )
    target = Path(opts.run_dir) if opts.run_dir else Path(opts.artifacts) / "runs"
    check_writable_dir(target, "--run-dir" if opts.run_dir else "--artifacts")


def check_link(opts: SimulateOptions) -> None:
    """--link, --schedule and --bandwidth: a schedule shares a limited link, so it needs one."""
    if opts.link is not None and not 0 < opts.link < float("inf"):
        raise PlanError("--link", opts.link, "the coordinator's ingress in MB/s, > 0")
    if opts.schedule not in SCHEDULES:
        raise PlanError("--schedule", opts.schedule, f"one of {', '.join(SCHEDULES)}")
    if opts.schedule != ARRIVAL and opts.link is None:
        raise PlanError(
            "--schedule", opts.schedule, "--link MB/s too (a schedule decides who a limited link serves first)"
        )
    if opts.bandwidth is not None:
        uplinks(opts.bandwidth, len(opts.ranges.split(",")) if opts.ranges else opts.fragments)


def check_eval_text(path: Path) -> None:
    """A readable UTF-8 file with enough words to score: a tokenizer makes at least one token
    of a word, so MIN_EVAL_TOKENS + 1 words always give enough positions (the tokenizer
    itself is not loaded this early)."""
    from coordinator.quality import MIN_EVAL_TOKENS, read_eval_text

    what = "a UTF-8 text file of held-out prose to score every checkpoint on"
    if not path.is_file():
        raise PlanError("--eval-text", str(path), f"{what} ({'a directory' if path.is_dir() else 'no such file'})")
    try:
        text = read_eval_text(path)
    except UnicodeDecodeError as exc:
        raise PlanError("--eval-text", str(path), f"{what} (not UTF-8 at byte {exc.start})") from None
    except OSError as exc:
        raise PlanError("--eval-text", str(path), f"{what} ({exc.strerror or exc})") from None
    except ValueError:
        raise PlanError("--eval-text", str(path), f"{what} (it is empty)") from None
    words = len(text.split())
    if words < MIN_EVAL_TOKENS + 1:
        raise PlanError("--eval-text", str(path), f"at least {MIN_EVAL_TOKENS + 1} words of text (it has {words})")


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def check_dtype(wanted: str | None, source: SourceCheckpoint, source_dir: Path) -> str:
    """The dtype the run really has: the source's own. Asking for another is refused, not ignored."""
    dtypes = sorted({_SAFETENSORS_DTYPES.get(t.dtype, t.dtype) for t in source.tensors.values()})
    have = dtypes[0] if len(dtypes) == 1 else "+".join(dtypes)
    if wanted is not None and wanted != have:
        raise PlanError(
            "--dtype",
            wanted,
            f"the source's own dtype ({have}) for --model {source_dir}; convert it "
            f"first: fragsim prepare --model {source_dir} --dtype {wanted}, then --model that output",
        )
    return have


def check_writable_dir(path: Path, option: str) -> None:
    """`path` is (or can be made) an empty-or-new directory on a writable filesystem."""
    path = path.absolute()
    if path.exists() and not path.is_dir():
        raise PlanError(option, str(path), "a directory (it is a file)")
    if option == "--run-dir" and path.is_dir() and any(path.iterdir()):
        raise PlanError(option, str(path), "a new or empty directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise PlanError(option, str(path), f"a path below a directory ({existing} is a file)")
    if os.statvfs(existing).f_flag & os.ST_RDONLY or not os.access(existing, os.W_OK | os.X_OK):
        raise PlanError(option, str(path), f"a writable place ({existing} is read-only)")
