"""How a replay is shown: the story, a per-agent timeline, JSON, and model re-evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from coordinator.replay import Replay
from protocol import log_events as E

WIDTH = 100


def show(replay: Replay, console: Console) -> None:
    if not replay.story:
        return
    t0 = replay.story[0][0]
    for t, text in replay.story:
        console.print(f"[dim]{t - t0:8.3f}s[/] " + escape(text))


def timeline(replay: Replay) -> list[str]:
    """A text Gantt: one row per process life (agent attempts, coordinator runs)."""
    spans: list[tuple[str, float, float, list[tuple[float, str]]]] = []
    by_file: dict[str, list[dict[str, Any]]] = {}
    for line in replay.lines:
        by_file.setdefault(line.file, []).append(line.data)
    for name, events in sorted(by_file.items()):
        life: list[dict[str, Any]] = []
        for d in events + [{"event": E.PROCESS_START}]:
            if d.get("event") == E.PROCESS_START and life:
                label = _label(name, life)
                marks = _marks(life)
                spans.append((label, life[0]["mono"], life[-1]["mono"], marks))
                life = []
            if "mono" in d:
                life.append(d)
    if not spans:
        return []
    start = min(s[1] for s in spans)
    end = max(s[2] for s in spans)
    scale = (WIDTH - 1) / max(end - start, 1e-6)
    rows = [f"{'':24} 0s{' ' * (WIDTH - 12)}{end - start:8.2f}s"]
    for label, a, b, marks in spans:
        row = [" "] * WIDTH
        for i in range(int((a - start) * scale), int((b - start) * scale) + 1):
            row[i] = "─"
        for t, mark in marks:
            row[min(WIDTH - 1, int((t - start) * scale))] = mark
        rows.append(f"{label:24} {''.join(row)}")
    rows.append("legend: ▶ connected  █ streaming  ✓ committed  ✗ killed/ended early  ◆ checkpoint  ↻ restored")
    return rows


def _label(name: str, life: list[dict[str, Any]]) -> str:
    role = "coordinator" if name.startswith("coordinator") else f"agent {life[0].get('fragment')}"
    return f"{role} pid {life[0].get('pid', '?')}"


def _marks(life: list[dict[str, Any]]) -> list[tuple[float, str]]:
    marks: list[tuple[float, str]] = []
    committed = any(d.get("event") == E.AGENT_COMMITTED for d in life)
    for d in life:
        ev = d.get("event")
        if ev == E.AGENT_WELCOME:
            marks.append((d["mono"], "▶"))
        elif ev == E.AGENT_COMMITTED:
            marks.append((d["mono"] - d.get("seconds", 0), "█"))
            marks.append((d["mono"], "✓"))
        elif ev == E.CHECKPOINT_EVALUATED:
            marks.append((d["mono"], "◆"))
        elif ev == E.RESTORE:
            marks.append((d["mono"], "↻"))
    role_agent = life[0].get("role") == "agent"
    finished = any(d.get("event") in (E.RUN_FINISHED, E.PROCESS_EXIT) for d in life)
    if (role_agent and not committed and not finished) or (not role_agent and not finished):
        marks.append((life[-1]["mono"], "✗"))
    return marks


def as_json(replay: Replay) -> str:
    return json.dumps(
        {
            "run_dir": str(replay.run_dir),
            "agrees": replay.agrees,
            "differences": replay.differences,
            "notes": replay.notes,
            "coordinator_processes": replay.segments,
            "story": [{"mono": t, "text": s} for t, s in replay.story],
            "rebuilt": replay.rebuilt,
        },
        indent=1,
    )


def verify_model(replay: Replay, console: Console) -> list[str]:
    """Re-evaluate every snapshot with stock from_pretrained; completions must equal the logged ones."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from coordinator.evaluate import generate, set_determinism

    settings = next((ln.data["settings"] for ln in replay.lines if ln.data.get("event") == E.RUN_SETTINGS), None)
    if settings is None:
        return ["no run.settings event in the coordinator log: cannot re-evaluate with the run's prompt"]
    set_determinism(int(settings["threads"]))
    problems = []
    for ck in replay.rebuilt["checkpoints"]:
        snapshot = Path(replay.run_dir) / ck["snapshot"]
        model = AutoModelForCausalLM.from_pretrained(snapshot, local_files_only=True, dtype="auto").eval()
        tokenizer = AutoTokenizer.from_pretrained(snapshot, local_files_only=True)
        gen = generate(model, tokenizer, settings["prompt"], int(settings["max_new_tokens"]))
        same = gen.tokens == ck["tokens"] and gen.text == ck["text"]
        console.print(
            f"checkpoint {ck['checkpoint']} ({ck['layers']} layers) re-evaluated from {ck['snapshot']}: "
            + ("[green]identical[/]" if same else "[red]DIFFERENT[/]")
        )
        if not same:
            problems.append(f"checkpoint {ck['checkpoint']}: logged {ck['text']!r}, re-evaluated {gen.text!r}")
    return problems
