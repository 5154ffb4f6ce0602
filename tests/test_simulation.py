"""Real runs on tiny checkpoints: a coordinator process and agent processes over real ZeroMQ
sockets, writing into a temporary sandbox."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import psutil
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import expected_prefix, simulate
from protocol.plan import Plan


def check_exact(result, run_dir: Path) -> None:
    final = result.results["final"]
    assert result.code == 0, result.output
    assert result.results["final_matches_baseline"] is True
    assert final["tensor_digests_match"] and final["logits_max_abs_diff"] == 0.0 and final["tokens_identical"]
    assert not list(run_dir.rglob("*.partial")), "no staging leftovers after a successful run"


# Every permutation goes through the pure core (test_core); with real processes, all 6 orders
# of 3 fragments, and for 4 a cyclic Latin square (each fragment arrives once in each position)
# plus reverse and an interleaved order: each way a prefix can grow late, early or in steps.
FOUR_FRAGMENT_ORDERS = [(0, 1, 2, 3), (1, 2, 3, 0), (2, 3, 0, 1), (3, 0, 1, 2), (3, 2, 1, 0), (1, 3, 0, 2)]


@pytest.mark.parametrize(
    "fragments,orders",
    [
        (3, list(itertools.permutations(range(3)))),
        (4, FOUR_FRAGMENT_ORDERS),
    ],
)
def test_every_arrival_order_with_real_processes(
    tiny_model: Path, tmp_path: Path, fragments: int, orders: list[tuple[int, ...]]
) -> None:
    for n, order in enumerate(orders):
        run_dir = tmp_path / f"run{n}"
        result = simulate(tiny_model, run_dir, fragments=fragments, order=",".join(map(str, order)))
        plan = Plan.loads((run_dir / "plan.json").read_bytes())
        arrivals = result.results["arrivals"]
        assert [a["fragment"] for a in arrivals] == list(order)
        assert [a["layers"] for a in arrivals] == expected_prefix(list(order), plan), order
        grown = [c["layers"] for c in result.results["checkpoints"]]
        assert grown == sorted(set(expected_prefix(list(order), plan)) - {0})
        check_exact(result, run_dir)


def test_forward_run_snapshots_are_hard_links_that_stock_from_pretrained_loads(
    tiny_model: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    result = simulate(tiny_model, run_dir, fragments=3, order="forward")
    check_exact(result, run_dir)
    checkpoints = result.results["checkpoints"]
    assert [c["layers"] for c in checkpoints] == [2, 4, 6]
    # Later checkpoints grew the live model: only the new fragments were read.
    assert checkpoints[0]["loaded"]["kind"] == "from_pretrained"
    assert [c["loaded"] for c in checkpoints[1:]] == [
        {"kind": "grow", "layers": [2, 3], "files": ["weights.safetensors"]},
        {"kind": "grow", "layers": [4, 5], "files": ["weights.safetensors"]},
    ]
    for c in checkpoints:
        snap = run_dir / c["snapshot"]
        config = json.loads((snap / "config.json").read_text())
        assert config["num_hidden_layers"] == c["layers"]
        for index in c["fragments"]:
            linked = snap / f"fragment_{index:02d}.safetensors"
            original = run_dir / "quorum" / f"fragment_{index:02d}" / "weights.safetensors"
            assert os.stat(linked).st_ino == os.stat(original).st_ino, "a hard link, not a copy"
            assert not linked.is_symlink()
    final = run_dir / checkpoints[-1]["snapshot"]
    reference = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    rebuilt = AutoModelForCausalLM.from_pretrained(final).eval()
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.inference_mode():
        assert torch.equal(reference(ids).logits, rebuilt(ids).logits)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, rebuilt.state_dict()[name]), name
    # Partial snapshot: stock from_pretrained loads the 2-layer prefix with no missing weights.
    partial, info = AutoModelForCausalLM.from_pretrained(run_dir / checkpoints[0]["snapshot"], output_loading_info=True)
    assert partial.config.num_hidden_layers == 2 and not info["missing_keys"]


def test_results_and_logs_hold_what_the_issue_asks(tiny_model: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = simulate(tiny_model, run_dir, ranges="0-2,3-3,4-5", order="2,0,1", seed=5)
    check_exact(result, run_dir)
    r = result.results
    assert r["run"]["ranges"] == ["0-2", "3-3", "4-5"] and r["run"]["order"] == [2, 0, 1]
    assert {"torch", "transformers", "pyzmq", "safetensors"} <= set(r["run"]["versions"])
    assert r["run"]["machine"]["logical_cpus"] >= 1
    assert r["baseline"]["tokens"] and r["baseline"]["seconds"] > 0
    for f in r["fragments"]:
        assert f["received_bytes"] == f["bytes"] and f["transfer_s"] is not None and f["attempts"] == 1
    assert [a["grew"] for a in r["arrivals"]] == [False, True, True]
    for c in r["checkpoints"]:
        assert c["label"] in ("coherent", "repetition loop", "whitespace collapse", "empty", "other")
        assert 0 <= c["agree_tokens"] <= len(r["baseline"]["tokens"])
        assert c["generate_s"] > 0
    md = (run_dir / "results.md").read_text()
    assert "## Checkpoints" in md and "## Fragment transfers" in md
    # Every process wrote JSON lines with run id, role and monotonic time.
    logs = sorted(p.name for p in (run_dir / "logs").glob("*.jsonl"))
    assert logs == ["agent_00.jsonl", "agent_01.jsonl", "agent_02.jsonl", "coordinator.jsonl"]
    for name in logs:
        for line in (run_dir / "logs" / name).read_text().splitlines():
            event = json.loads(line)
            assert event["run"] == r["run"]["run_id"] and {"time", "mono", "role", "event"} <= set(event)
    steps = [json.loads(x) for x in (run_dir / "logs/coordinator.jsonl").read_text().splitlines()]
    consumed = [s["ev"]["type"] for s in steps if s["event"] == "core.step"]
    assert consumed.count("hello") == 3 and consumed.count("verified") == 3


def test_untied_gqa_sharded_checkpoint_runs_bit_exact(tiny_untied_sharded: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = simulate(tiny_untied_sharded, run_dir, fragments=2, order="reverse")
    check_exact(result, run_dir)
    with safe_open(run_dir / "quorum/fragment_00/weights.safetensors", "pt") as fh:
        assert "lm_head.weight" in fh.keys()  # noqa: SIM118  (safe_open is no dict)


def test_no_orphan_processes_after_a_run(tiny_model: Path, tmp_path: Path) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    result = simulate(tiny_model, tmp_path / "run", fragments=2, order="forward")
    assert result.code == 0
    after = {p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}
    assert after <= before
