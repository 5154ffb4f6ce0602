"""`--eval-corpus` in a real run: the baseline records the floors and the reference, every
checkpoint is scored on the corpus and paired with the one before, and the report shows it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from conftest import simulate
from coordinator.launch.cli import main
from coordinator.replay import run_replay
from coordinator.report.build import write_report
from protocol.exit_codes import RunExit

DOCUMENTS = [
    "The harbour was quiet before the boats came in, and the gulls waited on the posts by the water.",
    "A baker opened her shop at six; the smell of warm bread reached the far end of the street.",
    "Rain fell all afternoon. Children ran home from school with their coats over their heads.",
    "By evening the lamps were lit along the quay, and the town went slowly to sleep.",
    "The fishermen mended their nets on the stones while the tide came in again.",
    "An old dog lay in the sun outside the inn and watched the carts go past.",
]


@pytest.fixture(scope="module")
def corpus_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("corpus-run")
    corpus = root / "docs.txt"
    corpus.write_text("\n".join(DOCUMENTS) + "\n")
    result = simulate(tiny_model, root / "run", fragments=3, order="0,2,1", max_new_tokens=4, eval_corpus=str(corpus))
    assert result.code == 0, result.output
    OUTPUT.append(result.output)
    return result.run_dir, result.results


OUTPUT: list[str] = []  # the corpus run's terminal output


def test_a_corpus_run_without_a_lens_says_how_to_fit_one(corpus_run: tuple[Path, dict[str, Any]]) -> None:
    assert "no tuned lens for" in OUTPUT[0] and "fragsim lens fit --model" in OUTPUT[0]
    assert all("tuned" not in c["corpus"] for c in corpus_run[1]["checkpoints"])


def test_the_results_name_the_protocol_and_hash_both_sets(corpus_run: tuple[Path, dict[str, Any]]) -> None:
    protocol = corpus_run[1]["corpus"]["protocol"]
    assert protocol["scoring"] == "lm-eval loglikelihood_rolling (HFLM)"
    assert protocol["corpus"]["eval_documents"] == 2 and protocol["corpus"]["fit_documents"] == 4
    assert len(protocol["corpus"]["eval_sha256"]) == 64 and protocol["window"] > 0


def test_the_floors_are_recorded_with_units_and_the_kl_block(corpus_run: tuple[Path, dict[str, Any]]) -> None:
    corpus = corpus_run[1]["corpus"]
    assert set(corpus["floors"]) == {"uniform", "unigram", "embeddings"}
    uniform = corpus["floors"]["uniform"]
    assert uniform["ce"] == pytest.approx(math.log(384))  # the tiny model's vocabulary
    for summary in corpus["floors"].values():
        assert summary["bits_per_byte"] > 0 and "p99" in summary["kl"]
    assert corpus["full"]["kl"]["max"] == 0.0


def test_the_eval_text_has_floors_fitted_on_the_runs_own_fit_set(corpus_run: tuple[Path, dict[str, Any]]) -> None:
    floors = corpus_run[1]["baseline"]["quality_floors"]
    assert list(floors) == ["uniform", "unigram", "embeddings"]
    assert floors["uniform"]["ce"] == pytest.approx(math.log(384))
    assert floors["unigram"]["fit"]["fit_sha256"] == corpus_run[1]["corpus"]["protocol"]["corpus"]["fit_sha256"]


def test_every_checkpoint_is_scored_and_paired_with_the_one_before(corpus_run: tuple[Path, dict[str, Any]]) -> None:
    checkpoints = corpus_run[1]["checkpoints"]
    assert [c["layers"] for c in checkpoints] == [2, 6]  # fragment 2 arrives before 1: one growth to 6
    first, last = checkpoints[0]["corpus"], checkpoints[-1]["corpus"]
    assert "change_from_previous" not in first
    change = last["change_from_previous"]["kl"]
    assert change["value"] == pytest.approx(-first["kl"]["mean"])  # the last one is the full model: KL 0
    assert last["kl"]["max"] == 0.0 and last["same_top1"]["mean"] == 1.0
    assert last["bits_per_byte"] == corpus_run[1]["corpus"]["full"]["bits_per_byte"]


def test_results_md_and_the_report_show_the_corpus(corpus_run: tuple[Path, dict[str, Any]]) -> None:
    run_dir = corpus_run[0]
    assert "## Checkpoint quality on the eval corpus" in (run_dir / "results.md").read_text()
    html = write_report([run_dir]).path.read_text()
    assert 'id="run-corpus"' in html and "unigram (fit set)" in html
    assert "Lines: the floors, a uniform guess" in html  # the short text's quality figure has them too
    assert "| unigram (fit set of docs.txt) | – |" in (run_dir / "results.md").read_text()


def test_a_corpus_run_replays_from_its_log(corpus_run: tuple[Path, dict[str, Any]]) -> None:
    replay = run_replay(corpus_run[0])
    assert replay.agrees, replay.differences


def test_the_run_keeps_its_own_copy_of_the_corpus(corpus_run: tuple[Path, dict[str, Any]]) -> None:
    kept = json.loads((corpus_run[0] / "eval_corpus.json").read_text())
    assert kept["eval"] == DOCUMENTS[:2] and kept["fit"] == DOCUMENTS[2:]


def test_eval_documents_without_a_corpus_is_refused_before_anything_is_created(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["simulate", "--model", str(tiny_model), "--run-dir", str(tmp_path / "run"), "--eval-documents", "3"])
    assert code == RunExit.USAGE
    assert "--eval-corpus too" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
