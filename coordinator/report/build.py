"""`fragsim report`: one HTML page for any runs, sweeps and ablations, written through the
sandbox of the directory it lands in."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from coordinator.report import sections
from coordinator.report.page import Page
from coordinator.report.sources import AblationSource, RunSource, Source, SweepSource, load_source
from protocol.errors import PlanError
from sandbox import Sandbox, layout

ABLATION_REPORT_SUFFIX = ".html"


@dataclass(frozen=True)
class Written:
    path: Path
    seconds: float
    figures: int
    tables: int


def default_out(target: Path) -> Path:
    """A run or sweep directory gets report.html inside it; an ablation JSON one beside it."""
    if target.is_dir():
        return target / layout.REPORT_HTML
    return target.with_suffix(ABLATION_REPORT_SUFFIX)


def render(sources: Sequence[Source]) -> Page:
    if not sources:
        raise PlanError("report inputs", [], "at least one run directory, sweep directory or ablation JSON")
    titles = [_title(s) for s in sources]
    if len(sources) == 1:
        page = Page(*titles[0])
    else:
        page = Page("fragsim report", "; ".join(t for t, _ in titles))
    for n, src in enumerate(sources):
        prefix = f"s{n}" if len(sources) > 1 else ""
        if len(sources) > 1:
            page.parts.append(f'<p class="lede"><b>{titles[n][0]}.</b> {titles[n][1]}</p>')
        if isinstance(src, RunSource):
            sections.run_sections(page, src, prefix + "run")
        elif isinstance(src, SweepSource):
            sections.sweep_sections(page, src, prefix + "sweep")
        else:
            sections.ablation_sections(page, src, prefix + "ablation")
    return page


def _title(src: Source) -> tuple[str, str]:
    if isinstance(src, RunSource):
        return sections.run_title(src)
    if isinstance(src, SweepSource):
        return sections.sweep_title(src)
    assert isinstance(src, AblationSource)
    return sections.ablation_title(src)


def write_report(targets: Sequence[Path], out: Path | None = None) -> Written:
    """Read every target, draw the page, write it (one atomic write inside out's directory)."""
    started = time.perf_counter()
    targets = [Path(t) for t in targets]
    if out is None:
        if len(targets) != 1:
            raise PlanError("--out", None, "a file name when the report has several inputs")
        out = default_out(targets[0])
    sources = [load_source(t) for t in targets]
    page = render(sources)
    inputs = ", ".join(str(t) for t in targets)
    footer = f"written by fragsim report from {inputs} at {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
    text = page.render(footer)
    out = Path(out).resolve()
    if not out.parent.is_dir():
        raise PlanError("--out", str(out), "a file in an existing directory")
    Sandbox(out.parent).write_text(out.name, text)
    return Written(out, round(time.perf_counter() - started, 3), page.figures, page.tables)
