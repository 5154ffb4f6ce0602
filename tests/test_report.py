"""`fragsim report` and the report `simulate` writes: real runs, a real sweep and a real
ablation on tiny models; the page parsed as HTML and its SVGs as XML."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from coordinator.launch.cli import main
from coordinator.report import selfcheck
from coordinator.report import timeline as T
from coordinator.report.build import write_report
from coordinator.report.timeline import build_timeline

RUN_FIGURES = {"run-quality", "run-quality-time", "run-latency", "run-timeline", "run-residual", "run-census"}
GAPS_RUN_FIGURES = RUN_FIGURES | {"run-gaps"}  # --reassembly gaps with a gapped arrival adds the gaps figure
SWEEP_FIGURES = {"sweep-quality", "sweep-latency", "sweep-quality-time"}
ABLATION_FIGURES = {"ablation-layers"}
VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "wbr", "source", "path", "rect", "use"}
NETWORK = re.compile(
    r"""(?:\b(?:src|href|xlink:href)\s*=\s*["']?\s*(?:https?:|//)|url\(\s*["']?\s*(?:https?:|//))""", re.I
)


class Balanced(HTMLParser):
    """Parses the page and checks every element it opens is closed in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.figures: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        if tag == "figure":
            self.figures.append(dict(attrs).get("data-figure") or "")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        self.stack.pop()


def parse_page(path: Path) -> Balanced:
    text = path.read_text()
    parser = Balanced()
    parser.feed(text)
    parser.close()
    assert text.startswith("<!DOCTYPE html>")
    assert not parser.errors, parser.errors[:5]
    assert not parser.stack, f"unclosed: {parser.stack}"
    for svg in re.findall(r"<svg.*?</svg>", text, flags=re.S):
        ET.fromstring(svg)  # every figure is well-formed XML
    return parser


def assert_self_contained(path: Path) -> None:
    text = path.read_text()
    assert not NETWORK.findall(text), NETWORK.findall(text)[:3]
    assert "<script" not in text.lower() and "<link" not in text.lower() and "<img" not in text.lower()


@pytest.fixture(scope="module")
def plain_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, str]:
    """`fragsim simulate` through the command line, as a user runs it."""
    run_dir = tmp_path_factory.mktemp("report-run") / "run"
    argv = ["simulate", "--model", str(tiny_model), "--fragments", "3", "--order", "2,0,1", "--threads", "1"]
    argv += ["--max-new-tokens", "6", "--run-dir", str(run_dir), "--reassembly", "gaps"]
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, run_dir, out.getvalue()


@pytest.fixture(scope="module")
def faulted_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An agent SIGKILLed and respawned, the coordinator SIGKILLed and resumed."""
    run_dir = tmp_path_factory.mktemp("report-faults") / "run"
    argv = ["simulate", "--model", str(tiny_model), "--fragments", "3", "--order", "forward", "--threads", "1"]
    argv += ["--max-new-tokens", "4", "--run-dir", str(run_dir), "--kill", "1@0.5", "--respawn"]
    argv += ["--kill-coordinator", "0.8", "--resume"]
    assert main(argv) == 0
    return run_dir


@pytest.fixture(scope="module")
def sweep_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report-sweep") / "sweep"
    argv = ["sweep", "--model", str(tiny_model), "--fragments", "2", "--trials", "2", "--max-new-tokens", "4"]
    argv += ["--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def ablation_json(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report-ablation") / "ablation.json"
    assert main(["ablate", "--model", str(tiny_model), "--blocks", "1,2", "--threads", "1", "--out", str(out)]) == 0
    return out


# ---- simulate writes the report ------------------------------------------------------------


def test_simulate_writes_report_html_and_prints_its_path(plain_run: tuple[int, Path, str]) -> None:
    code, run_dir, output = plain_run
    assert code == 0
    assert (run_dir / "report.html").is_file()
    assert f"report: {run_dir / 'report.html'}" in " ".join(output.split())


def test_simulate_records_the_time_the_report_took(plain_run: tuple[int, Path, str]) -> None:
    _, run_dir, _ = plain_run
    launcher = json.loads((run_dir / "launcher.json").read_text())
    assert 0 < launcher["report_s"] < 120


def test_run_report_parses_and_holds_every_run_figure(plain_run: tuple[int, Path, str]) -> None:
    _, run_dir, _ = plain_run
    page = parse_page(run_dir / "report.html")
    assert set(page.figures) == GAPS_RUN_FIGURES
    assert {"table", "figcaption", "svg", "nav"} <= page.tags


def test_run_report_is_self_contained(plain_run: tuple[int, Path, str]) -> None:
    assert_self_contained(plain_run[1] / "report.html")


def test_run_report_says_the_final_checkpoint_is_bit_identical(plain_run: tuple[int, Path, str]) -> None:
    text = (plain_run[1] / "report.html").read_text()
    assert "bit-identical to the source" in text
    assert "logits max |Δ| = 0.0" in text


def test_run_report_marks_gap_checkpoints(plain_run: tuple[int, Path, str]) -> None:
    assert "Hollow diamonds" in (plain_run[1] / "report.html").read_text()


def test_a_gaps_run_report_draws_holes_skipped_against_the_prefix(plain_run: tuple[int, Path, str]) -> None:
    run_dir = plain_run[1]
    results = json.loads((run_dir / "results.json").read_text())
    gap = results["gap_checkpoints"][0]
    arrival = next(a for a in results["arrivals"] if a["index"] == gap["arrival"])
    assert gap["since_start_s"] == arrival["since_start_s"] is not None, "a gap model is timed by its arrival"
    text = (run_dir / "report.html").read_text()
    figure = re.search(r'<figure id="fig-run-gaps".*?</figure>', text, flags=re.S)
    assert figure is not None
    for words in ("(a) at equal layer count", "(b) over wall-clock time", "active layers", "seconds since the first"):
        assert words in figure.group(0), words
    assert "Holes skipped against the contiguous prefix" in text


def test_a_run_without_gap_checkpoints_has_no_gaps_figure(faulted_run: Path) -> None:
    assert 'id="fig-run-gaps"' not in write_report([faulted_run]).path.read_text()


def _self_check_rows(text: str) -> list[list[str]]:
    table = re.search(r"<table><caption><b>Table \d+\.</b> Self-check.*?</table>", text, flags=re.S)
    assert table is not None, "the self-check table"
    rows = re.findall(r"<tr>(.*?)</tr>", table.group(0), flags=re.S)
    return [re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S) for row in rows if "<td" in row]


def test_run_report_opens_with_a_self_check_that_passes(plain_run: tuple[int, Path, str]) -> None:
    text = (plain_run[1] / "report.html").read_text()
    assert text.index("Self-check") < text.index('id="fig-run-quality"'), "at the top, before the figures"
    rows = _self_check_rows(text)
    assert [row[0] for row in rows] == [
        "all-layer checkpoint = full model",
        "each prefix through the real final norm, on its own statistics",
        "evaluation protocol",
    ]
    assert [row[2] for row in rows] == ["pass", "pass", "pass"], rows
    assert "logits max |Δ| = 0.0" in rows[0][1]
    assert "max |Δ| = 0 over" in rows[1][1] and "model.norm.weight" in rows[1][1]
    assert "eval_text.txt" in rows[2][1] and "scored positions" in rows[2][1]


def test_every_checkpoint_records_its_final_norm_check(plain_run: tuple[int, Path, str]) -> None:
    results = json.loads((plain_run[1] / "results.json").read_text())
    plan = json.loads((plain_run[1] / "plan.json").read_text())
    source = {it["name"]: it["digest"] for f in plan["fragments"] for it in f["items"]}
    for record in results["checkpoints"] + results["gap_checkpoints"]:
        check = record["norm_check"]
        assert check["ok"] and check["max_abs_diff"] == 0.0 and check["kind"] == "rmsnorm"
        assert check["input_rms"] == record["hidden_states"][-1]["rms"], "the norm sees the model's own last state"
        assert check["weight_digest"] == source["model.norm.weight"]
    rms = {c["norm_check"]["input_rms"] for c in results["checkpoints"]}
    assert len(rms) == len(results["checkpoints"]), "each prefix is normalised on its own statistics"


def test_the_self_check_fails_on_a_logits_difference_a_wrong_norm_and_another_protocol() -> None:
    base_row = {"index": 2, "rms": 3.0}
    check = {"ok": True, "max_abs_diff": 0.0, "tolerance": 1e-6, "input_rms": 3.0, "kind": "rmsnorm", "eps": 1e-5}
    check |= {"weight_name": "model.norm.weight", "weight_digest": "aa"}
    r: dict[str, Any] = {
        "final": {"complete": True, "logits_max_abs_diff": 0.5, "logits_positions": 4, "final_matches_baseline": False},
        "baseline": {"quality": {"tokens": 40}},
        "run": {"eval_text": None},
        "checkpoints": [
            {"checkpoint": 0, "hidden_states": [base_row], "norm_check": check, "quality": {"tokens": 40}},
            {
                "checkpoint": 1,
                "hidden_states": [base_row],
                "norm_check": {**check, "ok": False, "max_abs_diff": 0.1},
                "quality": {"tokens": 39},
            },
        ],
    }
    logits, norm, protocol = selfcheck.run_checks(r, {"model.norm.weight": "aa"})
    assert not logits.passed and "0.5" in logits.measured
    assert not norm.passed and "checkpoint 1: max |Δ| 0.1" in norm.measured
    assert not protocol.passed and "[39, 40]" in protocol.measured
    r["checkpoints"] = r["checkpoints"][:1]
    r["final"] |= {"logits_max_abs_diff": 0.0, "final_matches_baseline": True}
    assert all(c.passed for c in selfcheck.run_checks(r, {"model.norm.weight": "aa"}))
    assert not selfcheck.run_checks(r, {"model.norm.weight": "bb"})[1].passed, "a weight that is not the source's"
    r["quality_protocol"] = {"corpus": "wikitext-2 test", "tokens": 40}
    assert "corpus: wikitext-2 test" in selfcheck.protocol_check(r).measured


def test_every_figure_caption_names_its_units(plain_run: tuple[int, Path, str]) -> None:
    text = (plain_run[1] / "report.html").read_text()
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", text, flags=re.S)
    assert len(captions) == len(GAPS_RUN_FIGURES)
    units = ("nats", "seconds", "parameters", "log scale")
    for caption in captions:
        assert any(u in caption.lower() for u in units), caption


def test_every_axis_has_a_label(plain_run: tuple[int, Path, str]) -> None:
    # matplotlib writes axis labels as text elements; an axis without one would show bare ticks
    text = (plain_run[1] / "report.html").read_text()
    for label in ("active layers", "seconds", "hidden state", "parameters (millions)", "cross-entropy (nats/token)"):
        assert label in text, label


# ---- a faulted run -------------------------------------------------------------------------


def test_faulted_run_timeline_shows_kills_deaths_and_resumes(faulted_run: Path) -> None:
    tl = T.run_timeline(faulted_run)
    kills = tl.marks_of(T.KILLED)
    assert {m.lane for m in kills} == {"coordinator", "agent 1"}
    assert [m.lane for m in tl.marks_of(T.DEAD)] == ["agent 1"]
    assert "agent 1" in {m.lane for m in tl.marks_of(T.RESUMED)}
    assert len(tl.marks_of(T.RESTORED)) == 1
    coordinator_lives = [s for s in tl.spans if s.lane == "coordinator" and s.kind == T.ALIVE]
    assert len(coordinator_lives) == 2


def test_faulted_run_report_draws_the_faults(faulted_run: Path) -> None:
    written = write_report([faulted_run])
    page = parse_page(written.path)
    assert set(page.figures) == RUN_FIGURES
    text = written.path.read_text()
    assert "2 SIGKILL(s), 1 agent(s) declared dead" in text
    assert "1 coordinator restore(s)" in text
    assert "coordinator SIGKILLed at 0.8 of all bytes" in text


# ---- a sweep and an ablation ---------------------------------------------------------------


def test_sweep_report_parses_and_holds_the_sweep_figures(sweep_dir: Path) -> None:
    assert main(["report", str(sweep_dir)]) == 0
    page = parse_page(sweep_dir / "report.html")
    assert set(page.figures) == SWEEP_FIGURES
    assert_self_contained(sweep_dir / "report.html")
    assert "95 % CI" in (sweep_dir / "report.html").read_text()


def test_ablation_report_parses_and_holds_the_ablation_figure(ablation_json: Path) -> None:
    assert main(["report", str(ablation_json)]) == 0
    out = ablation_json.with_suffix(".html")
    page = parse_page(out)
    assert set(page.figures) == ABLATION_FIGURES
    text = out.read_text()
    assert "claim (seed 001)" in text and "critical core" in text


def test_one_page_for_a_run_a_sweep_and_an_ablation(
    plain_run: tuple[int, Path, str], sweep_dir: Path, ablation_json: Path, tmp_path: Path
) -> None:
    out = tmp_path / "paper.html"
    assert main(["report", str(plain_run[1]), str(sweep_dir), str(ablation_json), "--out", str(out)]) == 0
    page = parse_page(out)
    assert len(page.figures) == len(GAPS_RUN_FIGURES) + len(SWEEP_FIGURES) + len(ABLATION_FIGURES)
    assert len(set(page.figures)) == len(page.figures), "anchors are unique on a combined page"


def test_a_run_that_never_finished_still_gets_its_timeline(tiny_model: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    argv = ["simulate", "--model", str(tiny_model), "--fragments", "2", "--threads", "1", "--max-new-tokens", "2"]
    argv += ["--run-dir", str(run_dir), "--kill-coordinator", "0.5"]
    assert main(argv) != 0
    page = parse_page(run_dir / "report.html")
    assert page.figures == ["run-timeline"]
    assert "did not finish" in (run_dir / "report.html").read_text()


# ---- bad input -----------------------------------------------------------------------------


def test_report_of_a_directory_that_is_no_run_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "expected a run directory" in err
    assert list(tmp_path.iterdir()) == []


def test_report_of_json_that_is_no_ablation_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "other.json"
    bad.write_text('{"hello": 1}')
    assert main(["report", str(bad)]) == 2
    assert "expected a run directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.json"]


def test_several_inputs_need_an_out_file(
    sweep_dir: Path, ablation_json: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(sweep_dir), str(ablation_json)]) == 2
    assert "--out" in capsys.readouterr().err


# ---- the timeline, from log lines alone ----------------------------------------------------


def _line(event: str, second: float, **fields: Any) -> dict[str, Any]:
    stamp = f"2026-12-02T10:00:{second:09.6f}Z"
    return {"event": event, "time": stamp, "mono": 1000.0 + second, **fields}


def test_timeline_splits_a_log_into_one_life_per_process_start() -> None:
    agent = [
        _line("process.start", 1, role="agent", fragment=0, pid=10),
        _line("agent.welcome", 2, role="agent", fragment=0, pieces_wanted=4, pieces_total=4),
        _line("process.start", 5, role="agent", fragment=0, pid=11),
        _line("agent.welcome", 6, role="agent", fragment=0, pieces_wanted=1, pieces_total=4),
        _line("agent.committed", 7, role="agent", fragment=0, seconds=1.0),
    ]
    tl = build_timeline({"agent_00.jsonl": agent})
    lives = [s for s in tl.spans if s.kind == T.ALIVE]
    assert [(s.start, s.end) for s in lives] == [(0.0, 1.0), (4.0, 6.0)]
    assert [m.t for m in tl.marks_of(T.RESUMED)] == [5.0]
    assert [m.t for m in tl.marks_of(T.COMMITTED)] == [6.0]


def test_timeline_puts_an_agent_kill_logged_by_the_coordinator_on_the_agents_lane() -> None:
    coordinator = [
        _line("process.start", 0, role="coordinator", pid=1),
        _line("fault.killed", 3, role="coordinator", target="agent", fragment=2, fraction=0.5),
        _line("agent.dead", 3.5, role="coordinator", fragment=2, reason="process 9 exited"),
    ]
    tl = build_timeline({"coordinator.jsonl": coordinator})
    assert [(m.lane, m.t) for m in tl.marks_of(T.KILLED)] == [("agent 2", 3.0)]
    assert [(m.lane, m.t) for m in tl.marks_of(T.DEAD)] == [("agent 2", 3.5)]


def test_timeline_evaluation_span_ends_at_its_event_and_lasts_its_monotonic_time() -> None:
    coordinator = [
        _line("process.start", 0, role="coordinator", pid=1),
        {**_line("checkpoint.evaluated", 10, role="coordinator", checkpoint=1, layers=2), "started_mono": 1007.5},
    ]
    tl = build_timeline({"coordinator.jsonl": coordinator})
    [span] = [s for s in tl.spans if s.kind == T.EVALUATING]
    assert (span.start, span.end) == (7.5, 10.0)


def test_timeline_skips_a_torn_last_line(tmp_path: Path) -> None:
    log = tmp_path / "agent_00.jsonl"
    log.write_text(json.dumps(_line("process.start", 1, role="agent", fragment=0, pid=3)) + '\n{"event": "agent.we')
    assert len(T.read_log_lines(log)) == 1
