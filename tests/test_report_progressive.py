"""The report's "quality over time" figure: KL to the full model against seconds since the
first byte, from a real run on a limited link (tiny model), and its absence for results that
predate since_start_s."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_report import parse_page

from coordinator.launch.cli import main
from coordinator.report.build import write_report

LINK_MB_S = 1.0  # the tiny model's ~1 MB takes about a second


@pytest.fixture(scope="module")
def linked_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """`fragsim simulate --parallel --link 1 --schedule prefix` through the command line."""
    run_dir = tmp_path_factory.mktemp("report-link") / "run"
    argv = ["simulate", "--model", str(tiny_model), "--fragments", "3", "--parallel", "--link", str(LINK_MB_S)]
    argv += ["--schedule", "prefix", "--threads", "1", "--max-new-tokens", "4", "--run-dir", str(run_dir)]
    assert main(argv) == 0
    return run_dir, json.loads((run_dir / "results.json").read_text())


def _caption(text: str, figure: str) -> str:
    found = re.search(rf'data-figure="{figure}".*?<figcaption>(.*?)</figcaption>', text, flags=re.S)
    assert found, figure
    return found[1]


def test_linked_run_report_holds_the_quality_over_time_figure(linked_run: tuple[Path, dict[str, Any]]) -> None:
    run_dir, _ = linked_run
    page = parse_page(run_dir / "report.html")
    assert "run-quality-time" in page.figures
    text = (run_dir / "report.html").read_text()
    assert "seconds since the first byte streamed" in text and "KL to full (nats/token)" in text


def test_linked_run_figure_is_labelled_with_its_schedule_and_link(linked_run: tuple[Path, dict[str, Any]]) -> None:
    run_dir, _ = linked_run
    text = (run_dir / "report.html").read_text()
    assert "prefix, link 1 MB/s" in _caption(text, "run-quality-time")
    assert "no model yet (uniform guess)" in text  # the legend of the curve before the first checkpoint


def test_linked_run_caption_gives_the_kl_area(linked_run: tuple[Path, dict[str, Any]]) -> None:
    run_dir, results = linked_run
    caption = _caption((run_dir / "report.html").read_text(), "run-quality-time")
    assert f"KL area, {results['kl_area']:.3f} nats·s" in caption
    assert "nats/token" in caption and "seconds" in caption


def test_linked_run_figure_marks_each_checkpoint_with_its_active_layers(
    linked_run: tuple[Path, dict[str, Any]],
) -> None:
    run_dir, results = linked_run
    svg = re.search(r'data-figure="run-quality-time">(<svg.*?</svg>)', (run_dir / "report.html").read_text(), re.S)
    assert svg
    assert [c["layers"] for c in results["checkpoints"]] == [2, 4, 6]  # prefix: one checkpoint per fragment
    for layers in (2, 4, 6):
        assert f"{layers} L" in svg[1]


def test_linked_run_table_has_schedule_link_first_final_and_kl_area(linked_run: tuple[Path, dict[str, Any]]) -> None:
    run_dir, results = linked_run
    text = " ".join((run_dir / "report.html").read_text().split())
    p = results["progressive"]
    first, final, area = (f"{v:.3f}" for v in (p["first_checkpoint_s"], p["final_checkpoint_s"], results["kl_area"]))
    num = '<td class="num">'
    assert f"<td>prefix</td>{num}1</td>{num}{first}</td>{num}{final}</td>{num}{area}</td>" in text


def test_run_without_a_link_is_labelled_no_link_limit(tiny_model: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    argv = ["simulate", "--model", str(tiny_model), "--fragments", "2", "--threads", "1", "--max-new-tokens", "2"]
    assert main([*argv, "--run-dir", str(run_dir)]) == 0
    assert "no link limit" in _caption((run_dir / "report.html").read_text(), "run-quality-time")


def test_results_without_since_start_render_without_the_figure(
    linked_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """results.json from before since_start_s, kl_area and progressive existed."""
    run_dir, results = linked_run
    old_dir = tmp_path / "old"
    shutil.copytree(run_dir, old_dir, ignore=shutil.ignore_patterns("report.html"))
    old = json.loads(json.dumps(results))
    del old["kl_area"], old["progressive"]
    for c in old["checkpoints"]:
        del c["since_start_s"]
    (old_dir / "results.json").write_text(json.dumps(old))
    page = parse_page(write_report([old_dir]).path)
    assert "run-quality-time" not in page.figures and "run-quality" in page.figures
