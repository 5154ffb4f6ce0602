"""results.json and results.md: the run's figures, as data and as readable tables."""

from __future__ import annotations

import os
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import psutil

from protocol.plan import Plan
from protocol.run_settings import RunSettings
from sandbox import Sandbox
from sandbox.layout import RESULTS_JSON, RESULTS_MD

_PACKAGES = ("fragsim", "torch", "transformers", "safetensors", "pyzmq", "msgpack", "structlog", "blake3", "psutil")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    import zmq

    out["libzmq"] = zmq.zmq_version()
    return out


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
    }


def build_results(
    plan: Plan,
    settings: RunSettings,
    *,
    started: float,
    baseline: dict[str, Any],
    fragments: list[dict[str, Any]],
    arrivals: list[dict[str, Any]],
    checkpoints: list[dict[str, Any]],
    final: dict[str, Any],
) -> dict[str, Any]:
    return {
        "run": {
            **settings.to_json(),
            "run_id": plan.run_id,
            "plan_digest": plan.digest,
            "model": {k: v for k, v in plan.model.items() if k != "config"},
            "ranges": [f.label for f in plan.fragments],
            "piece_size": plan.piece_size,
            "arrival_order": [a["fragment"] for a in arrivals],
            "coordinator_started": started,
            "finished": time.time(),
            "versions": versions(),
            "machine": machine_info(),
        },
        "baseline": {k: v for k, v in baseline.items() if k != "logits"},
        "fragments": fragments,
        "arrivals": arrivals,
        "checkpoints": checkpoints,
        "final": final,
        "final_matches_baseline": bool(final.get("final_matches_baseline", False)),
    }


def write_results(box: Sandbox, results: dict[str, Any]) -> None:
    box.write_json(RESULTS_JSON, results)
    box.write_text(RESULTS_MD, render_markdown(results))


def table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", "⏎") if v is not None else "–"

    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def checkpoint_rows(results: dict[str, Any]) -> list[list[Any]]:
    n = len(results["baseline"]["tokens"])
    return [
        [
            c["checkpoint"],
            c["layers"],
            ",".join(c["ranges"]),
            c["label"],
            f"{c['agree_tokens']}/{n}",
            c["kl_to_baseline"],
            f"{c['generate_s']:.3f}",
            repr(c["text"]),
        ]
        for c in results["checkpoints"]
    ]


CHECKPOINT_HEADERS = [
    "ckpt",
    "layers",
    "ranges",
    "label",
    "tokens = baseline",
    "KL to baseline",
    "generate s",
    "completion",
]


def render_markdown(r: dict[str, Any]) -> str:
    run, final = r["run"], r["final"]
    model = run["model"]
    out = [
        f"# fragsim run {run['run_id']}",
        "",
        f"Model **{model['name']}** ({model['num_layers']} layers, {model['num_parameters']:,} parameters, "
        f"{model['dtype']}), fragments {', '.join(run['ranges'])}, launch order {run.get('order')}, "
        f"seed {run.get('seed')}, prompt {run['prompt']!r}, {run['max_new_tokens']} new tokens, "
        f"{run['threads']} threads.",
        "",
        f"**Final checkpoint matches baseline: {r['final_matches_baseline']}**",
        "",
    ]
    if final.get("complete"):
        out += [
            table(
                ["tensor digests match", "tensors + files checked", "logits max abs diff", "tokens identical"],
                [
                    [
                        final["tensor_digests_match"],
                        f"{final['tensors_checked']} + {final['files_checked']}",
                        final["logits_max_abs_diff"],
                        final["tokens_identical"],
                    ]
                ],
            ),
            "",
        ]
    else:
        out += [f"Incomplete: missing fragments {final['missing']} (layers {', '.join(final['missing_ranges'])}).", ""]
    b = r["baseline"]
    out += [
        "## Baseline",
        "",
        f"{b['text']!r} ({len(b['tokens'])} tokens, {b['seconds']:.3f} s, label {b['label']})",
        "",
    ]
    out += [
        "## Arrivals",
        "",
        table(
            ["#", "fragment", "its layers", "active layers", "prefix ranges", "prefix grew"],
            [
                [a["index"], a["fragment"], a["fragment_layers"], a["layers"], ",".join(a["ranges"]) or "–", a["grew"]]
                for a in r["arrivals"]
            ],
        ),
        "",
    ]
    out += ["## Checkpoints", "", table(CHECKPOINT_HEADERS, checkpoint_rows(r)), ""]
    out += [
        "## Checkpoint timings (seconds)",
        "",
        table(
            ["ckpt", "layers", "snapshot", "load", "generate", "score vs baseline", "loaded"],
            [
                [
                    c["checkpoint"],
                    c["layers"],
                    c["snapshot_s"],
                    c["load_s"],
                    c["generate_s"],
                    c["score_s"],
                    f"{c['loaded']['kind']} layers {c['loaded']['layers'][0]}-{c['loaded']['layers'][-1]}",
                ]
                for c in r["checkpoints"]
            ],
        ),
        "",
    ]
    out += [
        "## Fragment transfers",
        "",
        table(
            [
                "fragment",
                "layers",
                "MB",
                "transfer s",
                "MB/s",
                "attempts",
                "re-sent MB",
                "duplicate MB",
                "rejected chunks",
                "status",
            ],
            [
                [
                    f["fragment"],
                    f["layers"],
                    round(f["bytes"] / 1e6, 1),
                    f["transfer_s"],
                    f["mb_per_s"],
                    f["attempts"],
                    round(f["resent_bytes"] / 1e6, 2),
                    round(f["duplicate_bytes"] / 1e6, 2),
                    f["rejected_chunks"],
                    f["status"],
                ]
                for f in r["fragments"]
            ],
        ),
        "",
    ]
    v = run["versions"]
    out += [
        "## Environment",
        "",
        ", ".join(f"{k} {val}" for k, val in v.items() if val),
        "",
        f"{run['machine']['cpu']}, {run['machine']['logical_cpus']} logical CPUs, {run['machine']['memory_gib']} GiB",
        "",
    ]
    return "\n".join(out)
