"""`fragsim sweep`: repeated real runs on the tiny model, and its statistics on known data."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.lab.sweep import bootstrap_ci, check_determinism, summarise, trial_seed
from coordinator.launch.cli import main


@pytest.fixture(scope="module")
def small_sweep(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any], Path]:
    """One small sweep through the command line: 2 and 3 fragments, forward and random, 2 trials."""
    out = tmp_path_factory.mktemp("sweep") / "out"
    argv = ["sweep", "--model", str(tiny_model), "--fragments", "2,3", "--trials", "2"]
    argv += ["--orders", "forward,random", "--seed", "7", "--max-new-tokens", "4", "--threads", "1", "--out", str(out)]
    code = main(argv)
    return code, json.loads((out / "sweep.json").read_text()), out


def test_small_sweep_exits_zero_and_writes_json_and_markdown(small_sweep: tuple[int, dict[str, Any], Path]) -> None:
    code, summary, out = small_sweep
    assert code == 0
    assert summary["ok"] is True
    assert "generation seconds" in (out / "sweep.md").read_text().lower()


def test_small_sweep_runs_every_trial_bit_exact(small_sweep: tuple[int, dict[str, Any], Path]) -> None:
    _, summary, _ = small_sweep
    assert summary["trials_run"] == 2 * 2 * 2
    assert summary["trials_failed"] == []
    for config in summary["configs"]:
        assert config["exit_codes"] == [0, 0]
        assert config["final_matches_baseline"] == [True, True]
        assert Path(summary["per_trial"][0]["run_dir"]).parent == Path(summary["runs_dir"])


def test_small_sweep_groups_by_fragments_order_and_active_layers(
    small_sweep: tuple[int, dict[str, Any], Path],
) -> None:
    _, summary, _ = small_sweep
    keys = {(g["fragments"], g["order"], g["layers"]) for g in summary["groups"]}
    assert {(2, "forward", 3), (2, "forward", 6), (3, "forward", 2), (3, "forward", 4), (3, "forward", 6)} <= keys
    # A random order has a checkpoint at the prefixes its arrivals grew: always the full model.
    for n in (2, 3):
        assert (n, "random", 6) in keys
    for g in summary["groups"]:
        mine = [t for t in summary["per_trial"] if t["fragments"] == g["fragments"] and t["order"] == g["order"]]
        having = [t["trial"] for t in mine if any(c["layers"] == g["layers"] for c in t["checkpoints"])]
        assert g["trials"] == having and g["trials_counted"] == len(having)
    forward = [g for g in summary["groups"] if g["order"] == "forward"]
    assert all(g["trials_counted"] == 2 for g in forward)


def test_small_sweep_random_trials_use_different_seeds_and_forward_the_same_order(
    small_sweep: tuple[int, dict[str, Any], Path],
) -> None:
    _, summary, _ = small_sweep
    for config in summary["configs"]:
        if config["order"] == "random":
            assert len(set(config["seeds"])) == 2
            assert config["seeds"] == [trial_seed(7, "random", config["fragments"], t) for t in range(2)]
        else:
            assert config["launch_orders"] == [list(range(config["fragments"]))] * 2


def test_small_sweep_statistics_are_finite(small_sweep: tuple[int, dict[str, Any], Path]) -> None:
    _, summary, _ = small_sweep
    for g in summary["groups"]:
        s = g["generate_s"]
        assert s["n"] == g["trials_counted"]
        values = [s["median"], s["p95"], s["min"], s["max"], *s["ci95_of_median"]]
        assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in values), s
        assert s["min"] <= s["ci95_of_median"][0] <= s["median"] <= s["ci95_of_median"][1] <= s["max"]
        assert s["min"] <= s["p95"] <= s["max"]
        assert g["kl_to_baseline"]["identical"] and g["top1_agreement"]["identical"]
        if g["layers"] == 6:
            assert g["kl_to_baseline"]["value"] == 0.0 and g["top1_agreement"]["value"] == 1.0
    assert "MEDIAN" in summary["statistics"]["generate_s.ci95_of_median"]
    for config in summary["configs"]:
        for key in ("transfer_mb_per_s", "first_checkpoint_s", "verdict_s"):
            assert math.isfinite(config[key]["median"]) and config[key]["median"] > 0, (key, config[key])
            assert config[key]["min"] <= config[key]["median"] <= config[key]["max"]
        assert config["first_checkpoint_s"]["max"] <= config["verdict_s"]["max"]


def test_small_sweep_greedy_tokens_identical_across_trials_and_orders(
    small_sweep: tuple[int, dict[str, Any], Path],
) -> None:
    _, summary, _ = small_sweep
    assert summary["determinism_ok"] is True
    assert all(g["tokens_identical"] for g in summary["groups"])
    full = [d for d in summary["determinism"] if d["layers"] == 6]
    assert [d["fragments"] for d in full] == [2, 3]
    for d in full:
        assert d["tokens_identical"] and d["variants"] == 1 and d["disagreements"] == []
        assert d["trials"] == 4  # both orders' trials: every run ends with the full model


def test_determinism_check_reports_false_for_differing_tokens() -> None:
    records = [
        {"trial": 0, "order": "forward", "tokens": [5, 6, 7, 8]},
        {"trial": 1, "order": "forward", "tokens": [5, 6, 9, 8]},
    ]
    result = check_determinism(records)
    assert result["tokens_identical"] is False
    assert result["variants"] == 2
    [d] = result["disagreements"]
    assert d["trial"] == 1 and d["reference_trial"] == 0 and d["first_difference"] == 2


def test_determinism_check_reports_true_for_identical_tokens() -> None:
    records = [{"trial": t, "tokens": [1, 2, 3]} for t in range(3)]
    assert check_determinism(records) == {"trials": 3, "tokens_identical": True, "variants": 1, "disagreements": []}


def test_determinism_check_reports_a_shorter_sequence_as_different() -> None:
    result = check_determinism([{"trial": 0, "tokens": [1, 2, 3]}, {"trial": 1, "tokens": [1, 2]}])
    assert result["tokens_identical"] is False and result["disagreements"][0]["first_difference"] == 2


def test_summary_fails_when_a_trial_was_not_bit_exact_or_tokens_differ() -> None:
    def trial(t: int, tokens: list[int], exact: bool) -> dict[str, Any]:
        checkpoint = {"layers": 6, "generate_s": 0.1 + t / 100, "tokens": tokens, "kl_to_baseline": 0.0}
        return {"fragments": 2, "order": "forward", "trial": t, "seed": 0, "exit_code": 0 if exact else 1,
                "final_matches_baseline": exact, "checkpoints": [checkpoint]}  # fmt: skip

    good = summarise([trial(0, [1, 2], True), trial(1, [1, 2], True)], [2], ["forward"], 0)
    assert good["ok"] and good["determinism_ok"]
    differ = summarise([trial(0, [1, 2], True), trial(1, [1, 3], True)], [2], ["forward"], 0)
    assert not differ["ok"] and not differ["determinism_ok"] and not differ["groups"][0]["tokens_identical"]
    inexact = summarise([trial(0, [1, 2], True), trial(1, [1, 2], False)], [2], ["forward"], 0)
    assert not inexact["ok"] and [f["trial"] for f in inexact["trials_failed"]] == [1]


def test_summary_aggregates_quality_when_present_and_tolerates_its_absence() -> None:
    quality = {"ce": 2.5, "ppl": math.exp(2.5), "kl": 0.1, "top1": 0.9, "tokens": 200}
    rows = [
        {"layers": 3, "generate_s": 0.2, "tokens": [1], "quality": quality, "quality_s": 0.05},
        {"layers": 3, "generate_s": 0.3, "tokens": [1], "quality": {**quality, "ce": 2.6}, "quality_s": 0.07},
    ]
    trials = [
        {"fragments": 2, "order": "forward", "trial": t, "seed": 0, "exit_code": 0, "final_matches_baseline": True,
         "checkpoints": [row]}
        for t, row in enumerate(rows)
    ]  # fmt: skip
    [group] = summarise(trials, [2], ["forward"], 0)["groups"]
    assert group["quality"]["ppl"]["identical"] and group["quality"]["ppl"]["value"] == quality["ppl"]
    assert not group["quality"]["ce"]["identical"] and group["quality"]["ce"]["distinct"] == [2.5, 2.6]
    assert group["quality_s"]["median"] == pytest.approx(0.06)
    for t in trials:
        del t["checkpoints"][0]["quality"], t["checkpoints"][0]["quality_s"]
    [bare] = summarise(trials, [2], ["forward"], 0)["groups"]
    assert "quality" not in bare and "quality_s" not in bare


def test_bootstrap_ci_contains_the_median_of_known_data() -> None:
    data = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
    ci = bootstrap_ci(data, seed=1)
    assert ci is not None
    low, high = ci
    assert low <= 6.0 <= high and 1.0 <= low < high <= 11.0


def test_bootstrap_ci_narrows_with_more_data() -> None:
    rng = np.random.default_rng(0)
    small = rng.normal(1.0, 0.1, size=10).tolist()
    large = rng.normal(1.0, 0.1, size=1000).tolist()
    small_ci, large_ci = bootstrap_ci(small, seed=3), bootstrap_ci(large, seed=3)
    assert small_ci is not None and large_ci is not None
    assert large_ci[1] - large_ci[0] < (small_ci[1] - small_ci[0]) / 3
    assert large_ci[0] <= float(np.median(large)) <= large_ci[1]


def test_bootstrap_ci_is_reproducible_with_its_seed() -> None:
    data = np.random.default_rng(5).exponential(1.0, size=25).tolist()
    assert bootstrap_ci(data, seed=11) == bootstrap_ci(data, seed=11)
    assert bootstrap_ci(data, seed=11) != bootstrap_ci(data, seed=12)


def test_bootstrap_ci_of_one_value_is_that_value_and_of_none_is_none() -> None:
    assert bootstrap_ci([0.25]) == (0.25, 0.25)
    assert bootstrap_ci([]) is None


# ---- a schedule axis on a shared link --------------------------------------------------------

SCHEDULE_LINK_MB_S = 1.0  # the tiny model's ~1 MB takes about a second


@pytest.fixture(scope="module")
def schedule_sweep(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any], Path]:
    """`--schedules prefix,fair --link 1`: 3 fragments, one trial of each schedule."""
    out = tmp_path_factory.mktemp("sweep-schedules") / "out"
    argv = ["sweep", "--model", str(tiny_model), "--fragments", "3", "--trials", "1", "--schedules", "prefix,fair"]
    argv += ["--link", str(SCHEDULE_LINK_MB_S), "--max-new-tokens", "4", "--threads", "1", "--out", str(out)]
    code = main(argv)
    return code, json.loads((out / "sweep.json").read_text()), out


def test_schedule_sweep_makes_each_schedule_a_configuration(
    schedule_sweep: tuple[int, dict[str, Any], Path],
) -> None:
    code, summary, _ = schedule_sweep
    assert code == 0 and summary["ok"] is True
    assert summary["schedules"] == ["prefix", "fair"]
    assert [(c["fragments"], c["order"], c["schedule"]) for c in summary["configs"]] == [
        (3, "forward", "prefix"),
        (3, "forward", "fair"),
    ]
    assert {g["schedule"] for g in summary["groups"]} == {"prefix", "fair"}
    # prefix serves fragment 0 first: a checkpoint per fragment; the full model ends both
    prefix_layers = [g["layers"] for g in summary["groups"] if g["schedule"] == "prefix"]
    assert prefix_layers == [2, 4, 6]
    assert 6 in [g["layers"] for g in summary["groups"] if g["schedule"] == "fair"]


def test_schedule_sweep_runs_every_trial_on_the_link_with_its_schedule_and_agents_at_once(
    schedule_sweep: tuple[int, dict[str, Any], Path],
) -> None:
    _, summary, _ = schedule_sweep
    assert summary["link_mb_s"] == SCHEDULE_LINK_MB_S and summary["parallel"] is True
    assert [t["schedule"] for t in summary["per_trial"]] == ["prefix", "fair"]
    for t in summary["per_trial"]:
        assert t["progressive"]["schedule"] == t["schedule"]
        assert t["progressive"]["link_mb_s"] == SCHEDULE_LINK_MB_S
        assert Path(t["run_dir"]).name == f"f3-forward-{t['schedule']}-t0"
        run = json.loads((Path(t["run_dir"]) / "results.json").read_text())["run"]
        assert run["parallel"] is True and run["schedule"] == t["schedule"]


def test_schedule_sweep_has_first_final_and_kl_area_statistics_per_configuration(
    schedule_sweep: tuple[int, dict[str, Any], Path],
) -> None:
    _, summary, _ = schedule_sweep
    for config in summary["configs"]:
        p = config["progressive"]
        [trial] = [t for t in summary["per_trial"] if t["schedule"] == config["schedule"]]
        for key, value in (
            ("first_checkpoint_s", trial["progressive"]["first_checkpoint_s"]),
            ("final_checkpoint_s", trial["progressive"]["final_checkpoint_s"]),
            ("kl_area", trial["kl_area"]),
        ):
            stats = p[key]
            assert stats["n"] == 1 and stats["samples"] == [pytest.approx(value)], (key, stats)
            assert stats["median"] == stats["p95"] == stats["min"] == stats["max"] == pytest.approx(value)
            assert stats["ci95_of_median"] == [pytest.approx(value)] * 2
        assert 0 < p["first_checkpoint_s"]["median"] <= p["final_checkpoint_s"]["median"]
        assert p["kl_area"]["median"] > 0 and p["median_trial"] == 0 and p["link_mb_s"] == SCHEDULE_LINK_MB_S
    # the link's ~1 s: the final checkpoint cannot be there before the bytes are
    assert all(c["progressive"]["final_checkpoint_s"]["median"] > 0.5 for c in summary["configs"])


def test_schedule_sweep_markdown_has_the_progressive_table_with_a_schedule_column(
    schedule_sweep: tuple[int, dict[str, Any], Path],
) -> None:
    _, summary, out = schedule_sweep
    text = (out / "sweep.md").read_text()
    assert "## Progressive arrival" in text
    assert "| fragments | order | schedule | link MB/s | trials | first checkpoint s median [95% CI] |" in text
    for config in summary["configs"]:
        area = config["progressive"]["kl_area"]["median"]
        assert f"| 3 | forward | {config['schedule']} | 1.0 | 1 |" in text and f"{area:.3f}" in text


def test_schedule_sweep_report_draws_quality_over_time_per_schedule(
    schedule_sweep: tuple[int, dict[str, Any], Path],
) -> None:
    _, summary, out = schedule_sweep
    text = (out / "report.html").read_text()
    assert 'data-figure="sweep-quality-time"' in text and "Quality over time, per schedule" in text
    assert "seconds since the first byte streamed" in text and "KL to full (nats/token)" in text
    for config in summary["configs"]:
        assert f"{config['schedule']}: median KL area {config['progressive']['kl_area']['median']:.3f}" in text


def test_sweep_report_without_progressive_figures_leaves_the_figure_out(
    schedule_sweep: tuple[int, dict[str, Any], Path], tmp_path: Path
) -> None:
    """A sweep.json written before since_start_s and kl_area existed still renders."""
    from coordinator.report.build import write_report

    _, summary, _ = schedule_sweep
    old = json.loads(json.dumps(summary))
    for config in old["configs"]:
        del config["progressive"]
    for trial in old["per_trial"]:
        del trial["progressive"], trial["kl_area"]
    (tmp_path / "sweep.json").write_text(json.dumps(old))
    written = write_report([tmp_path])
    text = written.path.read_text()
    assert "sweep-quality-time" not in text and 'data-figure="sweep-latency"' in text


def test_sweep_without_schedules_keeps_its_configuration_keys(small_sweep: tuple[int, dict[str, Any], Path]) -> None:
    _, summary, out = small_sweep
    assert summary["schedules"] is None and summary["link_mb_s"] is None and summary["parallel"] is False
    assert all("schedule" not in c for c in summary["configs"]) and all("schedule" not in g for g in summary["groups"])
    assert all(Path(t["run_dir"]).name == f"f{t['fragments']}-{t['order']}-t{t['trial']}" for t in summary["per_trial"])
    assert "| fragments | order | layers |" in (out / "sweep.md").read_text()


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--schedules", "prefix,fastest", "--link", "1"], "--schedules"),
        (["--schedules", "prefix,prefix", "--link", "1"], "distinct schedules among arrival, fair, prefix"),
        (["--schedules", "prefix,fair"], "--link MB/s too"),
        (["--schedules", "fair", "--link", "0"], "--link"),
        (["--bandwidth", "0:5,9:5"], "--bandwidth"),
    ],
)
def test_sweep_refuses_bad_schedules_and_links_before_any_run(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], words: str
) -> None:
    out = tmp_path / "out"
    assert main(["sweep", "--model", str(tiny_model), "--fragments", "2", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fragsim sweep: ") and words in err, err
    assert not out.exists()


def test_parse_schedules_names_the_choices() -> None:
    from coordinator.lab.sweep import parse_schedules
    from protocol.errors import PlanError

    assert parse_schedules("prefix, fair") == ["prefix", "fair"]
    with pytest.raises(PlanError, match="arrival, fair, prefix"):
        parse_schedules("lowest")
