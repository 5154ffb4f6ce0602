"""Ceilings: what each stage of the real-model path can reach on this machine when it runs alone.

Every function measures with real sockets, real files, real processes and real signals, and
returns a plain dict whose keys carry their unit (`mb_per_s`, `seconds`, `mb`). `fragsim bench`
sets the stages of a real run against these.

- `zmq_ceiling`: raw pyzmq DEALER→ROUTER over tcp loopback, one frame per piece, `copy=False`,
  a credit window (4 pieces, one credit back per piece), with or without CURVE; the sender is
  its own process sending from a read-only memory map of the same files the agents send from.
- `blake3_ceiling`, `write_fsync_ceiling`: hashing alone and pwrite + fsync alone of the same bytes.
- `in_process_floor`: one fresh Python process that imports torch and transformers, loads the
  source, generates the baseline and then the same tokens at each prefix of layers.
- `torch_runtime_rss`: what a process that imported torch and transformers holds already.
- `agent_profile`: agents spawned one by one against a real coordinator: spawn → first log line
  and → HELLO, peak USS (private memory, `psutil.memory_full_info().uss`) while they stream.
- `detection_latency`: SIGSTOP (hung: missed heartbeats) and SIGKILL (dead: pid check) of an
  agent mid-transfer, timed from the signal to the coordinator's `agent.dead` log line.

This module is also the zmq sender's entry point (`python -m coordinator.lab.ceilings zmq-sender`),
so its top level imports neither torch nor the launcher.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import zmq
from blake3 import blake3

from protocol import link
from protocol import log_events as E
from protocol.plan import DEFAULT_PIECE_SIZE
from protocol.run_settings import DEFAULT_DEAD_AFTER_S, DEFAULT_HEARTBEAT_MS, DEFAULT_PROBE
from sandbox import layout

CREDIT_PIECES = 4  # the credit window of a real run (coordinator.core.CoreSettings.credit)
MB = 1e6
TIMEOUT_S = 600.0
SAMPLE_S = 0.01  # memory sampling interval of agent_profile


def _mb(nbytes: float) -> float:
    return round(nbytes / MB, 1)


def _rate(nbytes: int, seconds: float) -> float | None:
    """MB/s, or None when nothing measurable elapsed (JSON has no infinity)."""
    return round(nbytes / seconds / MB, 1) if seconds > 0 else None


# ---- the bytes: the model's own files, read-only, in pieces -------------------------------


def weight_files(source_dir: Path) -> list[Path]:
    """The safetensors files a run's agents send from (the same selection the agents make)."""
    from agents.source import SourceCheckpoint

    source = SourceCheckpoint(source_dir)
    try:
        return [source.directory / name for name in source.files]
    finally:
        source.close()


def files_nbytes(files: list[Path]) -> int:
    return sum(p.stat().st_size for p in files)


def _pieces(files: list[Path] | None, nbytes: int, piece_size: int) -> Iterator[memoryview]:
    """`nbytes` in pieces of at most `piece_size`: zero-copy views of the files' read-only memory
    maps, file after file (cycling if asked for more), or one random piece over and over."""
    if not files:
        block = memoryview(os.urandom(piece_size))
        left = nbytes
        while left > 0:
            n = min(piece_size, left)
            yield block[:n]
            left -= n
        return
    maps = []
    for path in files:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size:
                maps.append(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))
    if not maps:
        raise ValueError(f"{[str(p) for p in files]}: every file is empty")
    left = nbytes
    while left > 0:
        for mapping in maps:
            view = memoryview(mapping)
            offset = 0
            while offset < len(mapping) and left > 0:
                n = min(piece_size, len(mapping) - offset, left)
                yield view[offset : offset + n]
                offset += n
                left -= n
            if left <= 0:
                break


# ---- (a) raw pyzmq DEALER -> ROUTER ------------------------------------------------------


def zmq_ceiling(
    nbytes: int,
    *,
    files: list[Path] | None = None,
    piece_size: int = DEFAULT_PIECE_SIZE,
    credit: int = CREDIT_PIECES,
    curve: bool = False,
    repeats: int = 1,
    timeout_s: float = TIMEOUT_S,
) -> dict[str, Any]:
    """Goodput of bare pyzmq on tcp loopback: a DEALER in its own process sends `nbytes` as one
    frame per piece (`copy=False`, from a read-only mmap of `files`) while it has credit; the
    ROUTER (this process) grants one credit back per piece received. Timed like a run's
    `transfer_s` (first piece to last piece received); the best of `repeats`."""
    samples = [_zmq_once(nbytes, files, piece_size, credit, curve, timeout_s) for _ in range(max(1, repeats))]
    for sample in samples:  # one piece has no first-to-last time: time it from the welcome instead
        sample["timed"] = "first to last piece" if sample["pieces"] > 1 else "welcome to last piece"
        if sample["pieces"] <= 1:
            sample["first_to_last_seconds"] = sample["from_welcome_seconds"]
    best = min(samples, key=lambda s: s["first_to_last_seconds"])
    return {
        "timed": best["timed"],
        "transport": "tcp loopback, DEALER -> ROUTER, one frame per piece, copy=False",
        "curve": curve,
        "nbytes": nbytes,
        "piece_bytes": piece_size,
        "credit_pieces": credit,
        "pieces": best["pieces"],
        "seconds": best["first_to_last_seconds"],
        "mb_per_s": _rate(nbytes, best["first_to_last_seconds"]),
        "from_welcome_seconds": best["from_welcome_seconds"],
        "from_welcome_mb_per_s": _rate(nbytes, best["from_welcome_seconds"]),
        "samples_mb_per_s": [_rate(nbytes, s["first_to_last_seconds"]) for s in samples],
        "repeats": len(samples),
    }


def _zmq_once(
    nbytes: int, files: list[Path] | None, piece_size: int, credit: int, curve: bool, timeout_s: float
) -> dict[str, Any]:
    if nbytes <= 0:
        raise ValueError(f"zmq ceiling: nbytes {nbytes}, expected > 0")
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    config: dict[str, Any] = {
        "nbytes": nbytes,
        "piece_size": piece_size,
        "files": [str(p) for p in files or []],
        "timeout_s": timeout_s,
    }
    if curve:
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = server_public, server_secret
        config["curve"] = {
            "server_public": server_public.decode(),
            "public": client_public.decode(),
            "secret": client_secret.decode(),
        }
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    config["endpoint"] = f"tcp://127.0.0.1:{port}"
    sender = subprocess.Popen(
        [sys.executable, "-m", "coordinator.lab.ceilings", "zmq-sender"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert sender.stdin is not None
    sender.stdin.write(json.dumps(config))  # the throwaway keys go by pipe, not on the command line
    sender.stdin.close()
    received = pieces = 0
    peer = b""
    welcomed = first = last = 0.0
    deadline = time.monotonic() + timeout_s
    try:
        while received < nbytes:
            if not sock.poll(1000):
                if sender.poll() is not None:
                    err = sender.stderr.read() if sender.stderr else ""
                    raise RuntimeError(f"zmq ceiling: the sender exited with {sender.returncode}: {err[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"zmq ceiling: not all bytes arrived within {timeout_s:g}s")
                continue
            frames = sock.recv_multipart(copy=False)
            peer, payload = frames[0].bytes, frames[1]
            if len(frames) == 3:  # [READY, ""]: the sender's hello (a piece is always one frame)
                welcomed = time.monotonic()
                sock.send_multipart([peer, str(credit).encode()])
                continue
            now = time.monotonic()
            first = first or now
            last = now
            received += payload.buffer.nbytes
            pieces += 1
            sock.send_multipart([peer, b"1"])
        sock.send_multipart([peer, b"D"])
        code = sender.wait(timeout=30)
        if code != 0:
            raise RuntimeError(
                f"zmq ceiling: the sender exited with {code}: {sender.stderr.read() if sender.stderr else ''}"
            )
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
        if sender.stderr is not None:
            sender.stderr.close()
        sock.close()
        ctx.term()
    return {
        "first_to_last_seconds": round(last - first, 6),
        "from_welcome_seconds": round(last - welcomed, 6),
        "pieces": pieces,
    }


def _zmq_sender(config: dict[str, Any]) -> int:
    """The DEALER side of zmq_ceiling (its own process, like an agent)."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 2000)
    keys = config.get("curve")
    if keys:
        sock.curve_publickey, sock.curve_secretkey = keys["public"].encode(), keys["secret"].encode()
        sock.curve_serverkey = keys["server_public"].encode()
    sock.connect(config["endpoint"])
    files = [Path(p) for p in config["files"]] or None
    pieces = _pieces(files, int(config["nbytes"]), int(config["piece_size"]))
    pending = next(pieces, None)
    credit = 0
    timeout_ms = int(float(config["timeout_s"]) * 1000)
    sock.send_multipart([b"READY", b""])
    while True:
        while credit > 0 and pending is not None:
            sock.send(pending, copy=False)
            credit -= 1
            pending = next(pieces, None)
        if not sock.poll(timeout_ms):
            return 3
        msg = sock.recv()
        if msg == b"D":
            break
        credit += int(msg)
    sock.close()
    ctx.term()
    return 0


# ---- (b) BLAKE3 alone, (c) write + fsync alone ------------------------------------------


def blake3_ceiling(
    nbytes: int, *, files: list[Path] | None = None, piece_size: int = DEFAULT_PIECE_SIZE, repeats: int = 1
) -> dict[str, Any]:
    """BLAKE3 of the same bytes, one digest per piece as the coordinator computes them, one
    thread; each piece is first copied into a reused buffer (untimed): only hashing is timed."""
    buffer = bytearray(piece_size)
    samples = []
    for _ in range(max(1, repeats)):
        hashing = 0.0
        for piece in _pieces(files, nbytes, piece_size):
            n = piece.nbytes
            buffer[:n] = piece
            view = memoryview(buffer)[:n]
            started = time.perf_counter()
            blake3(view).hexdigest()
            hashing += time.perf_counter() - started
        samples.append(hashing)
    best = min(samples)
    return {
        "nbytes": nbytes,
        "piece_bytes": piece_size,
        "threads": 1,
        "seconds": round(best, 6),
        "mb_per_s": _rate(nbytes, best),
        "samples_mb_per_s": [_rate(nbytes, s) for s in samples],
        "repeats": len(samples),
    }


def write_fsync_ceiling(
    nbytes: int,
    directory: Path,
    *,
    files: list[Path] | None = None,
    piece_size: int = DEFAULT_PIECE_SIZE,
    repeats: int = 1,
) -> dict[str, Any]:
    """pwrite of the same bytes piece by piece into a pre-allocated file in a temporary directory
    under `directory` (the run directories' filesystem), then fsync: as the store writes a
    fragment. Pieces are copied into a reused buffer first (untimed)."""
    buffer = bytearray(piece_size)
    samples = []
    directory.mkdir(parents=True, exist_ok=True)
    for _ in range(max(1, repeats)):
        with tempfile.TemporaryDirectory(prefix="write-ceiling-", dir=directory) as tmp:
            fd = os.open(os.path.join(tmp, "weights.bin"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                started = time.perf_counter()
                try:
                    os.posix_fallocate(fd, 0, nbytes)
                except OSError:
                    os.ftruncate(fd, nbytes)
                allocate = time.perf_counter() - started
                writing = 0.0
                offset = 0
                for piece in _pieces(files, nbytes, piece_size):
                    n = piece.nbytes
                    buffer[:n] = piece
                    view = memoryview(buffer)[:n]
                    started = time.perf_counter()
                    done = 0
                    while done < n:
                        done += os.pwrite(fd, view[done:], offset + done)
                    writing += time.perf_counter() - started
                    offset += n
                started = time.perf_counter()
                os.fsync(fd)
                syncing = time.perf_counter() - started
            finally:
                os.close(fd)
        samples.append({"allocate": allocate, "write": writing, "fsync": syncing})
    best = min(samples, key=lambda s: s["write"] + s["fsync"])
    seconds = best["write"] + best["fsync"]
    return {
        "nbytes": nbytes,
        "piece_bytes": piece_size,
        "directory": str(directory),
        "seconds": round(seconds, 6),
        "write_seconds": round(best["write"], 6),
        "fsync_seconds": round(best["fsync"], 6),
        "fallocate_seconds": round(best["allocate"], 6),
        "mb_per_s": _rate(nbytes, seconds),
        "write_mb_per_s": _rate(nbytes, best["write"]),
        "samples_mb_per_s": [_rate(nbytes, s["write"] + s["fsync"]) for s in samples],
        "repeats": len(samples),
    }


# ---- child processes: the in-process floor and the torch runtime -------------------------

_FLOOR_SCRIPT = r"""
import gc, json, sys, time
marks = {"started_mono": time.monotonic()}
cfg = json.loads(sys.stdin.read())
import torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from coordinator.snapshot import truncated_config
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
from coordinator.evaluate import residual_stream_stats, sequence_logits, set_determinism
from coordinator.quality import eval_ids, eval_limit, full_reference, read_eval_text, text_quality
set_determinism(cfg["threads"])  # the flag fragsim sets, not the public call's 2 s torch._inductor import
marks["imported_mono"] = time.monotonic()
src = cfg["model"]

@torch.inference_mode()
def generate(model, tok):
    ids = tok(cfg["prompt"], return_tensors="pt")["input_ids"]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    t = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=cfg["max_new_tokens"], min_new_tokens=0, pad_token_id=pad,
                         num_beams=1, temperature=None, top_p=None, top_k=None)
    return out[0, ids.shape[1]:].tolist(), time.perf_counter() - t

t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(src, local_files_only=True, dtype="auto").eval()
tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
load_s = time.perf_counter() - t
def score(model, tokens, reference=None):
    # What a fragsim checkpoint reports besides its generation: the teacher-forced pass over
    # prompt + baseline tokens (KL to baseline), the eval text's quality, the probe's residual stream.
    prompt = tok(cfg["prompt"])["input_ids"]
    sequence_logits(model, prompt + tokens)
    logits = sequence_logits(model, scored)
    quality = text_quality(logits, scored, reference)
    residual_stream_stats(model, tok(cfg["probe"])["input_ids"])
    return logits, quality

scored = eval_ids(tok, read_eval_text(), eval_limit(model.config))
baseline, baseline_s = generate(model, tok)
full_logits, _ = score(model, baseline)
reference = full_reference(full_logits, scored)
marks["baseline_mono"] = time.monotonic()
full = AutoConfig.from_pretrained(src, local_files_only=True)
prefixes = []
for k in cfg["layers"]:
    del model
    gc.collect()
    t = time.perf_counter()
    config = type(full).from_dict(truncated_config(full.to_dict(), k))
    model = AutoModelForCausalLM.from_pretrained(src, config=config, local_files_only=True, dtype="auto").eval()
    prefix_load_s = time.perf_counter() - t
    tokens, gen_s = generate(model, tok)
    score(model, baseline, reference)
    prefixes.append({"layers": k, "load_seconds": round(prefix_load_s, 6), "generate_seconds": round(gen_s, 6),
                     "agree_tokens": sum(a == b for a, b in zip(tokens, baseline)), "done_mono": time.monotonic()})
print(json.dumps({"marks": marks, "load_seconds": round(load_s, 6), "baseline_generate_seconds": round(baseline_s, 6),
                  "baseline_tokens": baseline, "num_layers": full.num_hidden_layers, "prefixes": prefixes}))
"""

_RUNTIME_SCRIPT = r"""
import json, time
t = time.monotonic()

def memory():
    out = {}
    with open("/proc/self/smaps_rollup") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return {"rss": out["Rss"], "uss": out["Private_Clean"] + out["Private_Dirty"], "anonymous": out["Anonymous"]}

bare = memory()
import torch, transformers
after_import = memory()
imported_s = time.monotonic() - t
from transformers import AutoModelForCausalLM, AutoTokenizer
import transformers.models.llama.modeling_llama
after_model_code = memory()
print(json.dumps({"bare": bare, "torch_transformers": after_import, "with_llama_code": after_model_code,
                  "import_seconds": imported_s}))
"""


def _child_env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }


def _run_child(script: str, stdin: str, timeout_s: float) -> tuple[dict[str, Any], float, float]:
    """Run `python -c script` (a fresh process): (its last stdout line as JSON, spawn mono, wall s)."""
    spawned = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=_child_env(),
    )
    wall = time.monotonic() - spawned
    if proc.returncode != 0:
        raise RuntimeError(f"child process exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), spawned, wall


def in_process_floor(
    model: Path,
    layers: list[int],
    *,
    prompt: str,
    max_new_tokens: int,
    threads: int,
    timeout_s: float = TIMEOUT_S,
) -> dict[str, Any]:
    """The least any tool could do for what a forward run reports, in one fresh Python process:
    import torch and transformers, load the source with from_pretrained, generate the baseline's
    tokens, then the same number of greedy tokens at each prefix in `layers` (each loaded with a
    config whose num_hidden_layers is k, as fragsim's snapshots are), and score the baseline and
    each prefix as a checkpoint is scored (KL pass, eval-text quality, probe statistics). `seconds` is the wall time
    from spawning that process to its exit."""
    cfg = {
        "model": str(model),
        "layers": layers,
        "prompt": prompt,
        "probe": DEFAULT_PROBE,
        "max_new_tokens": max_new_tokens,
        "threads": threads,
    }
    out, spawned, wall = _run_child(_FLOOR_SCRIPT, json.dumps(cfg), timeout_s)
    marks = out["marks"]
    prefixes = [
        {**{k: v for k, v in p.items() if k != "done_mono"}, "done_seconds": round(p["done_mono"] - spawned, 6)}
        for p in out["prefixes"]
    ]
    return {
        "model": str(model),
        "layers": layers,
        "max_new_tokens": max_new_tokens,
        "threads": threads,
        "seconds": round(wall, 6),
        "interpreter_start_seconds": round(marks["started_mono"] - spawned, 6),
        "import_seconds": round(marks["imported_mono"] - marks["started_mono"], 6),
        "load_seconds": out["load_seconds"],
        "baseline_generate_seconds": out["baseline_generate_seconds"],
        "baseline_done_seconds": round(marks["baseline_mono"] - spawned, 6),
        "first_prefix_done_seconds": prefixes[0]["done_seconds"] if prefixes else None,
        "last_prefix_done_seconds": prefixes[-1]["done_seconds"] if prefixes else None,
        "prefixes": prefixes,
        "full_prefix_matches_baseline": bool(
            prefixes
            and prefixes[-1]["layers"] == out["num_layers"]
            and prefixes[-1]["agree_tokens"] == len(out["baseline_tokens"])
        ),
    }


def torch_runtime_rss(timeout_s: float = 300.0) -> dict[str, Any]:
    """Resident memory of a fresh process that imported torch and transformers and nothing else
    (`rss_mb`), and after importing the Llama modelling code too (for comparison)."""
    out, _, wall = _run_child(_RUNTIME_SCRIPT, "", timeout_s)
    return {
        "rss_mb": _mb(out["torch_transformers"]["rss"]),
        "uss_mb": _mb(out["torch_transformers"]["uss"]),
        "bare_python_rss_mb": _mb(out["bare"]["rss"]),
        "rss_with_llama_code_mb": _mb(out["with_llama_code"]["rss"]),
        "import_seconds": round(out["import_seconds"], 6),
        "seconds": round(wall, 6),
    }


def bare_agent_process(timeout_s: float = 120.0) -> dict[str, Any]:
    """What an agent costs before it does anything: a fresh process that imports what the agent
    imports (zmq, msgpack, blake3, structlog, the protocol). Spawn to exit, and its USS/RSS."""
    script = (
        "import time; t = time.monotonic()\n"
        "import zmq, msgpack, blake3, structlog, json\n"
        "import agents.agent\n"
        "import psutil; m = psutil.Process().memory_full_info()\n"
        "print(json.dumps({'uss': m.uss, 'rss': m.rss, 'import_seconds': time.monotonic() - t}))\n"
    )
    best: dict[str, Any] | None = None
    for _ in range(3):
        out, _, wall = _run_child(script, "", timeout_s)
        if best is None or wall < best["seconds"]:
            best = {
                "seconds": round(wall, 6),
                "import_seconds": round(out["import_seconds"], 6),
                "uss_mb": _mb(out["uss"]),
                "rss_mb": _mb(out["rss"]),
            }
    _, _, bare = _run_child("print('{}')", "", timeout_s)
    assert best is not None
    best["bare_python_seconds"] = round(bare, 6)
    return best


# ---- a coordinator and agents started by hand: start-up, memory, dead-agent detection -----


class _Session:
    """A planned run whose coordinator and agents this code starts itself (no Driver), so that
    it can time spawns, sample memory and send signals of its own choosing."""

    def __init__(
        self,
        model: Path,
        run_dir: Path,
        *,
        fragments: int,
        faults: dict[str, Any] | None = None,
        max_new_tokens: int,
        threads: int,
        curve: bool = True,
        heartbeat_ms: int = DEFAULT_HEARTBEAT_MS,
        dead_after: float = DEFAULT_DEAD_AFTER_S,
    ) -> None:
        from coordinator.launch.agents import AgentLauncher
        from coordinator.launch.baseline import SourceModel
        from coordinator.launch.driver import CoordinatorProcess
        from coordinator.launch.options import SimulateOptions
        from coordinator.launch.simulate import plan_run

        opts = SimulateOptions(
            model=str(model),
            run_dir=str(run_dir),
            fragments=fragments,
            order="forward",
            max_new_tokens=max_new_tokens,
            threads=threads,
            curve=curve,
            heartbeat_ms=heartbeat_ms,
            dead_after=dead_after,
        )
        self.run = plan_run(opts, model, model.name)
        SourceModel(model, threads).record(self.run.box, opts.prompt, opts.max_new_tokens)
        self.events: list[dict[str, Any]] = []
        self.coordinator = CoordinatorProcess(self.run.run_dir, self.run.box, faults or {})
        self.agents: dict[int, subprocess.Popen[bytes]] = {}
        try:
            endpoint = self.coordinator.await_ready(self.events)
            self.launcher = AgentLauncher(self.run.run_dir, endpoint)
            if not any(ev.get("progress") == link.WARM for ev in self.events):
                self.wait_for(lambda ev: ev.get("progress") == link.WARM, 300.0)  # a quiet coordinator
        except BaseException:
            self.close()
            raise

    def spawn(self, fragment: int) -> tuple[subprocess.Popen[bytes], float]:
        spawned = time.monotonic()
        proc = self.launcher.spawn(fragment)
        self.agents[fragment] = proc
        self.coordinator.control(link.SPAWNED, f"{fragment} {proc.pid}")  # as the Driver does: pids are checked
        return proc, spawned

    def wait_for(
        self,
        match: Callable[[dict[str, Any]], bool],
        timeout_s: float,
        tick: Callable[[], None] | None = None,
        poll_s: float = 0.05,
    ) -> dict[str, Any]:
        """The next progress event `match` accepts (events before it are kept in self.events)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if tick is not None:
                tick()
            ev = self.coordinator.next_event(poll_s)
            if ev is None:
                raise RuntimeError(f"the coordinator exited ({self.coordinator.proc.wait()}); see {self.run.run_dir}")
            if ev.get("progress") == link.IDLE:
                continue
            self.events.append(ev)
            if match(ev):
                return ev
        raise RuntimeError(f"no matching progress event within {timeout_s:g}s; see {self.run.run_dir}")

    def log_lines(self, rel: str) -> list[dict[str, Any]]:
        return read_log(self.run.run_dir / rel)

    def close(self, timeout_s: float = 120.0) -> int | None:
        for proc in self.agents.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        coordinator = self.coordinator.proc
        if coordinator.poll() is None:
            self.coordinator.control(link.END, "measurement over")
            try:
                self.wait_for(lambda ev: ev.get("progress") == link.FINISHED, timeout_s)
                coordinator.wait(timeout=60)
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        if coordinator.poll() is None:
            coordinator.kill()
        return coordinator.wait()


def read_log(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of one process log (a truncated last line is skipped)."""
    out: list[dict[str, Any]] = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _first(lines: list[dict[str, Any]], event: str, **fields: Any) -> dict[str, Any] | None:
    for line in lines:
        if line.get("event") == event and all(line.get(k) == v for k, v in fields.items()):
            return line
    return None


def _memory(pid: int) -> dict[str, int] | None:
    """USS (psutil), RSS and the anonymous part of the private memory (smaps_rollup) of a process."""
    try:
        proc = psutil.Process(pid)
        full = proc.memory_full_info()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return None
    anon = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Anonymous:"):
                    anon = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"uss": full.uss, "rss": full.rss, "anonymous": anon}


class _Peak:
    """Peak memory of one process over repeated samples."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = {"uss": 0, "rss": 0, "anonymous": 0}
        self.samples = 0

    def sample(self) -> None:
        mem = _memory(self.pid)
        if mem is not None:
            self.samples += 1
            for k, v in mem.items():
                self.peak[k] = max(self.peak[k], v)


def agent_profile(
    model: Path,
    run_dir: Path,
    *,
    fragments: int = 4,
    max_new_tokens: int = 24,
    threads: int = 2,
    sample_s: float = SAMPLE_S,
    timeout_s: float = TIMEOUT_S,
) -> dict[str, Any]:
    """Agents of a real forward run, started by hand one at a time against a real coordinator
    (each once the previous fragment is committed and its checkpoint evaluated, so the agent
    starts on a quiet machine): spawn → its first log line (`process.start`) and → `agent.hello`,
    and its peak USS / RSS / anonymous memory, sampled every `sample_s` while it lives."""
    session = _Session(model, run_dir, fragments=fragments, max_new_tokens=max_new_tokens, threads=threads)
    rows: list[dict[str, Any]] = []
    try:
        for fragment in range(len(session.run.plan.fragments)):
            proc, spawned = session.spawn(fragment)
            peak = _Peak(proc.pid)
            sample = peak.sample

            def committed(ev: dict[str, Any], fragment: int = fragment) -> bool:
                return ev.get("progress") == link.COMMITTED and ev.get("fragment") == fragment

            session.wait_for(committed, timeout_s, tick=sample, poll_s=sample_s)
            while proc.poll() is None and time.monotonic() < spawned + timeout_s:
                sample()
                time.sleep(sample_s)
            code = proc.wait()
            lines = session.log_lines(layout.agent_log(fragment))
            start, hello = _first(lines, E.PROCESS_START), _first(lines, E.AGENT_HELLO)
            done = _first(lines, E.AGENT_COMMITTED)
            rows.append(
                {
                    "fragment": fragment,
                    "nbytes": session.run.plan.fragments[fragment].nbytes,
                    "exit_code": code,
                    "spawn_to_process_start_seconds": round(start["mono"] - spawned, 6) if start else None,
                    "spawn_to_hello_seconds": round(hello["mono"] - spawned, 6) if hello else None,
                    "stream_seconds": done.get("seconds") if done else None,
                    "peak_uss_mb": _mb(peak.peak["uss"]),
                    "peak_rss_mb": _mb(peak.peak["rss"]),
                    "peak_anonymous_mb": _mb(peak.peak["anonymous"]),
                    "memory_samples": peak.samples,
                }
            )
            ckpts = sum(1 for ev in session.events if ev.get("progress") == link.CHECKPOINT)
            if ckpts < fragment + 1:  # forward order: every arrival makes a checkpoint
                session.wait_for(lambda ev: ev.get("progress") == link.CHECKPOINT, timeout_s)
    finally:
        session.close()
    hellos = [r["spawn_to_hello_seconds"] for r in rows if r["spawn_to_hello_seconds"] is not None]
    starts = [r["spawn_to_process_start_seconds"] for r in rows if r["spawn_to_process_start_seconds"] is not None]
    return {
        "run_dir": str(session.run.run_dir),
        "fragments": len(rows),
        "sample_seconds": sample_s,
        "agents": rows,
        "spawn_to_process_start_seconds_median": round(statistics.median(starts), 6) if starts else None,
        "spawn_to_hello_seconds_median": round(statistics.median(hellos), 6) if hellos else None,
        "spawn_to_hello_seconds_max": round(max(hellos), 6) if hellos else None,
        "peak_uss_mb_max": max((r["peak_uss_mb"] for r in rows), default=None),
        "peak_anonymous_mb_max": max((r["peak_anonymous_mb"] for r in rows), default=None),
        "peak_rss_mb_max": max((r["peak_rss_mb"] for r in rows), default=None),
    }


def heartbeat_settings(coordinator_log: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The liveness settings: the coordinator's (from its process.start line when given, else the
    defaults), the server's pid/deadline tick and the agent's heartbeat interval (the
    coordinator's own: WELCOME carries it)."""
    from coordinator.core import CoreSettings

    settings = dict(CoreSettings().__dict__)
    start = _first(coordinator_log or [], E.PROCESS_START)
    if start and isinstance(start.get("settings"), dict):
        settings.update(start["settings"])
    try:
        from coordinator.server import TICK_S

        tick: float | None = TICK_S
    except Exception:  # the server module is not importable right now: report what is known
        tick = None
    return {
        "heartbeat_ms": settings.get("heartbeat_ms"),
        "dead_after_s": settings.get("dead_after_s"),
        "tick_s": tick,
        "agent_heartbeat_s": settings["heartbeat_ms"] / 1000 if settings.get("heartbeat_ms") else None,
    }


def detection_latency(
    model: Path,
    run_dir: Path,
    *,
    fraction: float = 0.5,
    max_new_tokens: int = 24,
    threads: int = 2,
    timeout_s: float = 60.0,
    heartbeat_ms: int = DEFAULT_HEARTBEAT_MS,
    dead_after: float = DEFAULT_DEAD_AFTER_S,
) -> dict[str, Any]:
    """Dead-agent detection on loopback, against a real coordinator (3 fragments, CURVE on):
    fragment 1's agent is SIGSTOPped once `fraction` of its bytes arrived (it still exists:
    only missed heartbeats can tell), then fragment 2's is SIGKILLed at the same point (a
    launcher-spawned pid: the pid check tells). Each is timed from the signal to the
    coordinator's `agent.dead` log line (`mono`, the same clock) and to the launcher's receipt
    of the `dead` progress line. Nothing else runs meanwhile (fragment 0 is never started)."""
    faults = {"kills": [[1, fraction], [2, fraction]], "kill_coordinator": None}
    session = _Session(
        model,
        run_dir,
        fragments=3,
        faults=faults,
        max_new_tokens=max_new_tokens,
        threads=threads,
        heartbeat_ms=heartbeat_ms,
        dead_after=dead_after,
    )
    cases: dict[str, dict[str, Any]] = {}
    try:
        for fragment, name, sig in ((1, "hung_sigstop", signal.SIGSTOP), (2, "dead_sigkill", signal.SIGKILL)):
            proc, _ = session.spawn(fragment)

            def kill_point(ev: dict[str, Any], fragment: int = fragment) -> bool:
                return ev.get("progress") == link.KILL_POINT and ev.get("fragment") == fragment

            session.wait_for(kill_point, timeout_s)
            signalled = time.monotonic()
            os.kill(proc.pid, sig)
            if sig == signal.SIGKILL:
                proc.wait()  # as the launcher's own kill does: the pid is gone, not a zombie
            session.coordinator.control(link.KILLED)  # the kill point lets the coordinator go on

            def dead(ev: dict[str, Any], fragment: int = fragment) -> bool:
                return ev.get("progress") == link.DEAD and ev.get("fragment") == fragment

            seen = session.wait_for(dead, timeout_s)
            seen_at = time.monotonic()
            if proc.poll() is None:  # the stopped one: end it now that it was declared dead
                proc.kill()
                proc.wait()
            line = _first(session.log_lines(layout.COORDINATOR_LOG), E.AGENT_DEAD, fragment=fragment)
            cases[name] = {
                "signal": signal.Signals(sig).name,
                "fragment": fragment,
                "fraction": fraction,
                "seconds": round(line["mono"] - signalled, 6) if line else None,
                "launcher_saw_seconds": round(seen_at - signalled, 6),
                "reason": seen.get("reason"),
            }
    finally:
        session.close()
    settings = heartbeat_settings(session.log_lines(layout.COORDINATOR_LOG))
    return {"run_dir": str(session.run.run_dir), "settings": settings, **cases}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["zmq-sender"]:
        return _zmq_sender(json.loads(sys.stdin.read()))
    print("usage: python -m coordinator.lab.ceilings zmq-sender  (config as JSON on stdin)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
