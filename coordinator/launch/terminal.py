"""What the user sees while a run goes: per-agent byte bars, a line per arrival and
checkpoint, and the tables at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from coordinator.results import CHECKPOINT_HEADERS, checkpoint_rows, progressive_line
from protocol import link


def wide_console(stderr: bool = False) -> Console:
    """The terminal's console (on stderr when stdout carries data, e.g. `simulate --json`)."""
    console = Console(stderr=stderr)
    if not console.is_terminal:  # logs and CI: wide enough that tables and bars do not fold
        console.width = max(console.width, 160)
    return console


class LiveView:
    """Per-agent byte bars plus one printed line per arrival and checkpoint."""

    def __init__(self, console: Console, plan: Any) -> None:
        self.console = console
        self.plan = plan
        self.bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=console,
            transient=False,
            disable=not console.is_terminal,
        )
        self.tasks = {
            f.index: self.bars.add_task(f"fragment {f.index} ({f.label})", total=f.nbytes, start=False)
            for f in plan.fragments
        }

    def __enter__(self) -> LiveView:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bars.__exit__(*exc)

    def show(self, ev: dict[str, Any]) -> None:
        kind = ev.get("progress")
        if kind == link.HELLO:
            self.bars.start_task(self.tasks[ev["fragment"]])
            self.console.print(f"[cyan]agent {ev['fragment']}[/] connected (pid {ev['pid']}, attempt {ev['attempt']})")
        elif kind == link.BYTES:
            self.bars.update(self.tasks[ev["fragment"]], completed=ev["received"])
        elif kind == link.ARRIVAL:
            grew = "[green]prefix grew[/]" if ev["grew"] else "prefix unchanged"
            at = f" at {ev['since_start_s']:.2f}s" if ev.get("since_start_s") is not None else ""
            self.console.print(
                f"arrival {ev['index']}{at}: fragment {ev['fragment']} (layers {ev['fragment_layers']})"
                f" -> active layers {ev['layers']} {grew}"
            )
        elif kind == link.CHECKPOINT:
            q = ev.get("quality") or {}
            ppl = f" eval ppl {q['ppl']:.4g}" if q.get("ppl") is not None else ""
            self.console.print(
                f"  checkpoint {ev['checkpoint']}: {ev['layers']} layers "
                + escape(f"[{ev['label']}]{ppl} {ev['generate_s']:.2f}s {ev['text']!r}")
            )
        elif kind == link.DEAD:
            self.console.print(f"[red]agent of fragment {ev['fragment']} dead[/]: {ev['reason']}")
        elif kind == link.STORAGE_ERROR:
            self.console.print(
                "[bold red]storage error[/]: "
                + escape(ev["error"])
                + " (promoted fragments are intact; staged pieces are kept for `fragsim resume`)"
            )
        elif kind == link.QUARANTINED:
            self.console.print(
                f"[bold yellow]fragment {ev['fragment']} set aside[/]: "
                + escape(f"{', '.join(ev['items'])} no longer match the plan; kept in {ev['path']}, fetching it again")
            )
        elif kind == link.REJECTED:
            self.console.print("[yellow]rejected[/] " + escape(ev["reason"]))


def print_summary(console: Console, results: dict[str, Any], run_dir: Path) -> None:
    table = Table(title="checkpoints", show_lines=False)
    for header in CHECKPOINT_HEADERS:
        wide = header == "completion"
        table.add_column(header, overflow="ellipsis" if wide else "fold", no_wrap=wide, ratio=1 if wide else None)
    for row in checkpoint_rows(results):
        table.add_row(*[escape(str(v)) for v in row])
    console.print(table)
    progressive = progressive_line(results)
    if progressive:
        console.print(escape(progressive))
    arrivals = Table(title="arrivals")
    for header in ["#", "fragment", "its layers", "active layers", "prefix grew"]:
        arrivals.add_column(header)
    for a in results["arrivals"]:
        arrivals.add_row(str(a["index"]), str(a["fragment"]), a["fragment_layers"], str(a["layers"]), str(a["grew"]))
    console.print(arrivals)
    final = results["final"]
    if final.get("complete"):
        verdict = "[bold green]MATCHES[/]" if results["final_matches_baseline"] else "[bold red]DOES NOT MATCH[/]"
        console.print(
            f"final checkpoint {verdict} the baseline: tensor digests {final['tensor_digests_match']} "
            f"({final['tensors_checked']} tensors, {final['files_checked']} files), logits max abs diff "
            f"{final['logits_max_abs_diff']}, tokens identical {final['tokens_identical']}"
        )
    else:
        console.print(
            f"[bold yellow]incomplete[/]: missing fragments {final['missing']} "
            f"(layers {', '.join(final['missing_ranges'])})"
        )
    console.print(f"run directory: {run_dir}  (results.md, results.json, logs/)")
