"""results.json and results.md: the run's figures, as data and as readable tables."""

from __future__ import annotations

import os
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import psutil

from coordinator.massive import RULE_TEXT
from coordinator.quality import uniform_kl
from protocol.census import census
from protocol.plan import Plan
from protocol.run_settings import RunSettings
from sandbox import Sandbox
from sandbox.layout import RESULTS_JSON, RESULTS_MD

# results.json's layout: raised when a field is renamed, removed or changes meaning (a new field does not).
RESULTS_SCHEMA_VERSION = 1

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
    gap_checkpoints: list[dict[str, Any]] | None = None,
    timing: dict[str, Any] | None = None,
) -> dict[str, Any]:
    timing = timing or {}
    since = timing.get("since_start_s", {})
    checkpoints = [{**c, "since_start_s": since.get(c["checkpoint"])} for c in checkpoints]
    # A gap model exists from the arrival that made it, as a checkpoint from its commit: the
    # arrival's row holds that step's time.
    arrived_s = {a.get("index"): a.get("since_start_s") for a in arrivals}
    gaps = [{**g, "since_start_s": arrived_s.get(g["arrival"])} for g in gap_checkpoints or []]
    kl_before = _kl_no_model(plan, baseline)
    area = step_area([(c["since_start_s"], c.get("quality", {}).get("kl")) for c in checkpoints], kl_before)
    misses = [(c["since_start_s"], _miss(c.get("quality", {}).get("top1"))) for c in checkpoints]
    return {
        "schema_version": RESULTS_SCHEMA_VERSION,
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
        "baseline": {k: v for k, v in baseline.items() if k not in ("logits", "corpus")},
        # --eval-corpus: the protocol, the corpus's hashes, the full model and the floors
        "corpus": baseline.get("corpus"),
        "census": census(plan),
        "fragments": fragments,
        "arrivals": arrivals,
        "checkpoints": checkpoints,
        "gap_checkpoints": gaps,
        "final": final,
        "final_matches_baseline": bool(final.get("final_matches_baseline", False)),
        "kl_area": area,
        "top1_miss_area": step_area(misses, 1.0),
        "progressive": {
            "schedule": timing.get("schedule"),
            "link_mb_s": timing["link_bytes_s"] / 1e6 if timing.get("link_bytes_s") else None,
            "bandwidth": timing.get("bandwidth"),
            "first_checkpoint_s": checkpoints[0]["since_start_s"] if checkpoints else None,
            "final_checkpoint_s": checkpoints[-1]["since_start_s"] if checkpoints else None,
            "kl_no_model": kl_before,
        },
    }


def _kl_no_model(plan: Plan, baseline: dict[str, Any]) -> float | None:
    """KL(full || uniform): the curve's value before the first checkpoint exists."""
    entropy = baseline.get("quality", {}).get("entropy")
    vocab = plan.model.get("config", {}).get("vocab_size")
    return uniform_kl(entropy, vocab) if entropy is not None and isinstance(vocab, int) else None


def _miss(top1: float | None) -> float | None:
    return None if top1 is None else 1.0 - top1


def step_area(points: list[tuple[float | None, float | None]], before: float | None) -> float | None:
    """The area under a step curve over time, from the first byte streamed to the last
    checkpoint: `points` are (seconds since the first byte, value) of each checkpoint in order;
    until the first one the model is nothing (`before`), and each checkpoint's value holds until
    the next. None when a time or value is unknown. For KL to the full model, `before` is a
    uniform guess's KL and the area is `kl_area` (nats x seconds); for 1 - top-1 agreement,
    `before` is 1 (a uniform guess's argmax is arbitrary) and the area is `top1_miss_area`, the
    seconds of disagreement with the full model."""
    if not points or before is None:
        return None
    area, t_prev, held = 0.0, 0.0, before
    for t, value in points:
        if t is None or value is None:
            return None
        area += held * max(0.0, t - t_prev)
        t_prev, held = max(t_prev, t), value
    return round(area, 6)


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
    rows = []
    for c in results["checkpoints"]:
        q = c.get("quality", {})
        rows.append(
            [
                c["checkpoint"],
                c["layers"],
                ",".join(c["ranges"]),
                _num(c.get("since_start_s"), ".3f"),
                c["label"],
                f"{c['agree_tokens']}/{n}",
                c["kl_to_baseline"],
                _num(q.get("ppl"), ".4g"),
                f"{c['generate_s']:.3f}",
                repr(c["text"]),
            ]
        )
    return rows


CHECKPOINT_HEADERS = [
    "ckpt",
    "layers",
    "ranges",
    "ready at s",  # from the first byte streamed to the commit that made the checkpoint
    "label",
    "tokens = baseline",
    "KL to baseline",
    "eval PPL",
    "generate s",
    "completion",
]


def _num(value: Any, spec: str) -> str | None:
    return None if value is None else format(value, spec)


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
    if "quality" in b:
        q = b["quality"]
        out += [
            f"Eval text ({q['tokens']} scored tokens): cross-entropy {_num(q['ce'], '.4f')} nats/token, "
            f"perplexity {_num(q['ppl'], '.4g')} ({b['quality_s']:.3f} s with the probe): the reference of every "
            "checkpoint's eval KL and top-1.",
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
    progressive = progressive_line(r)
    if progressive:
        out += [progressive, ""]
    out += gap_section(r)
    out += quality_section(r)
    out += corpus_section(r)
    out += [
        "## Checkpoint timings (seconds)",
        "",
        table(
            ["ckpt", "layers", "snapshot", "load", "generate", "score vs baseline", "quality", "loaded"],
            [
                [
                    c["checkpoint"],
                    c["layers"],
                    c["snapshot_s"],
                    c["load_s"],
                    c["generate_s"],
                    c["score_s"],
                    c.get("quality_s"),
                    f"{c['loaded']['kind']} layers {c['loaded']['layers'][0]}-{c['loaded']['layers'][-1]}",
                ]
                for c in r["checkpoints"]
            ],
        ),
        "",
    ]
    out += residual_stream_section(r)
    out += census_section(r)
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


def progressive_line(r: dict[str, Any]) -> str | None:
    """How early the checkpoints came: the link, its schedule, first and final checkpoint and
    the area under KL over time (smaller: a usable model sooner)."""
    p = r.get("progressive")
    if not p or p.get("first_checkpoint_s") is None:
        return None
    link = f"{p['link_mb_s']:g} MB/s link, schedule {p['schedule']}" if p.get("link_mb_s") else "no link limit"
    uplinks = f", agent uplinks {p['bandwidth']} MB/s" if p.get("bandwidth") else ""
    area = f"; KL area {r['kl_area']:.4g} nats·s" if r.get("kl_area") is not None else ""
    if r.get("top1_miss_area") is not None:
        area += f", top-1 miss area {r['top1_miss_area']:.4g} s"
    return (
        f"Over time ({link}{uplinks}): first checkpoint {p['first_checkpoint_s']:.3f} s and final "
        f"{p['final_checkpoint_s']:.3f} s after the first byte{area}."
    )


def gap_section(r: dict[str, Any]) -> list[str]:
    """--reassembly gaps: after an arrival that left holes, every arrived layer, holes skipped."""
    gaps = r.get("gap_checkpoints") or []
    if not gaps:
        return []
    n = len(r["baseline"]["tokens"])
    rows = [
        [
            g["arrival"],
            _layer_list(g["layers"]),
            ",".join(g["missing"]),
            _num(g.get("since_start_s"), ".3f"),
            g["label"],
            f"{g['agree_tokens']}/{n}",
            g["kl_to_baseline"],
            _num(g.get("quality", {}).get("ppl"), ".4g"),
            f"{g['generate_s']:.3f}",
            repr(g["text"]),
        ]
        for g in gaps
    ]
    headers = ["arrival", "layers present", "missing", *CHECKPOINT_HEADERS[3:]]
    return [
        "## Gap checkpoints (every arrived layer, missing ones skipped)",
        "",
        table(headers, rows),
        "",
    ]


def _layer_list(layers: list[int]) -> str:
    """[0, 1, 4, 5] as '0-1,4-5'."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


def quality_section(r: dict[str, Any]) -> list[str]:
    """Each checkpoint on the eval text, the full model last: the logit lens of the prefix."""
    rows = []
    for c in r["checkpoints"]:
        if "quality" in c:
            rows.append([c["checkpoint"], c["layers"], *_quality_cells(c["quality"]), c["quality_s"]])
            if "tuned" in c["quality"]:
                rows.append([f"{c['checkpoint']}, tuned lens", c["layers"], *_quality_cells(c["quality"]["tuned"]), ""])
    base = r["baseline"]
    if not rows or "quality" not in base:
        return []
    floors = [
        [_floor_name(name, q), 0 if name == "embeddings" else "–", *_quality_cells(q), ""]
        for name, q in (base.get("quality_floors") or {}).items()
    ]
    full = [["full model", base["num_layers"], *_quality_cells(base["quality"]), base["quality_s"]]]
    return [
        "## Checkpoint quality on the eval text",
        "",
        "Teacher-forced over the held-out text: cross-entropy (nats/token) and perplexity of the next token; "
        "KL(full ‖ checkpoint) and top-1 agreement with the full model, both per position. The floors first: "
        "what a model that knows less than any checkpoint scores.",
        "",
        table(
            ["ckpt", "layers", "tokens", "CE", "PPL", "KL to full", "top-1 = full", "quality s"], floors + rows + full
        ),
        "",
    ]


def _floor_name(name: str, q: dict[str, Any]) -> str:
    fit = q.get("fit")
    return f"unigram (fit set of {fit['name']})" if name == "unigram" and fit else FLOOR_NAMES.get(name, name)


CORPUS_HEADERS = [
    "model",
    "layers",
    "bits/byte [95% CI]",
    "word PPL",
    "byte PPL",
    "KL mean ± SE",
    "KL median",
    "KL p99",
    "KL max",
    "same top-1 ± SE",
    "RMS Δp",
    "ln(PPL/PPL full)",
]
FLOOR_NAMES = {"uniform": "uniform guess", "unigram": "unigram (fit set)", "embeddings": "embeddings only (k = 0)"}


def corpus_rows(r: dict[str, Any]) -> list[list[Any]]:
    """One row per floor, per checkpoint and for the full model, in CORPUS_HEADERS' columns."""
    corpus = r.get("corpus") or {}
    rows = [
        [FLOOR_NAMES[name], 0 if name == "embeddings" else "–", *_corpus_cells(s)]
        for name, s in corpus.get("floors", {}).items()
    ]
    for c in r["checkpoints"]:
        if "corpus" in c:
            rows.append([f"checkpoint {c['checkpoint']}", c["layers"], *_corpus_cells(c["corpus"])])
            if "tuned" in c["corpus"]:
                rows.append(
                    [f"checkpoint {c['checkpoint']}, tuned lens", c["layers"], *_corpus_cells(c["corpus"]["tuned"])]
                )
    if "full" in corpus:
        rows.append(["full model", r["baseline"].get("num_layers"), *_corpus_cells(corpus["full"])])
    return rows


def _corpus_cells(s: dict[str, Any]) -> list[Any]:
    lo, hi = s["bits_per_byte_ci"]
    kl, same, dp, ratio = s.get("kl"), s.get("same_top1"), s.get("delta_p_rms"), s.get("ln_ppl_ratio")
    return [
        f"{s['bits_per_byte']:.4f} [{lo:.4f}, {hi:.4f}]",
        _num(s["word_perplexity"], ".4g"),
        # the embeddings floor's byte perplexity is ~1e10: 4 decimals of it are noise
        _num(s["byte_perplexity"], ".4f" if (s["byte_perplexity"] or 0) < 1e4 else ".4g"),
        f"{kl['mean']:.4f} ± {kl['se']:.4f}" if kl else None,
        _num(kl["median"], ".4f") if kl else None,
        _num(kl["p99"], ".4f") if kl else None,
        _num(kl["max"], ".4f") if kl else None,
        f"{100 * same['mean']:.2f} ± {100 * (same['se'] or 0):.2f} %" if same else None,
        f"{100 * dp['value']:.2f} %" if dp else None,
        _num(ratio["value"], ".4f") if ratio else None,
    ]


def protocol_line(protocol: dict[str, Any]) -> str:
    """The scoring protocol in one sentence (results.md and the report)."""
    c = protocol["corpus"]
    return (
        f"{protocol['scoring']} on the {c['eval_documents']} eval documents of {c['name']} ({c['source']}; "
        f"eval sha256 {c['eval_sha256'][:12]}…, fit set of {c['fit_documents']} documents, sha256 "
        f"{c['fit_sha256'][:12]}…); windows of {protocol['window']} tokens, prefix token {protocol['prefix_token']} "
        f"{protocol['prefix_token_text']!r}; {protocol['positions']}."
    )


def corpus_section(r: dict[str, Any]) -> list[str]:
    """--eval-corpus: lm-eval's units and llama.cpp's KL block per checkpoint, between the floors
    and the full model, and each checkpoint's paired change from the one before."""
    corpus = r.get("corpus")
    if not corpus:
        return []
    out = [
        "## Checkpoint quality on the eval corpus",
        "",
        protocol_line(corpus["protocol"]),
        "Bits per byte, byte and word perplexity as lm-eval computes them; the KL block as llama.cpp's "
        "`--kl-divergence` prints it (SE over tokens); 95 % intervals bootstrap over documents.",
        "",
        table(CORPUS_HEADERS, corpus_rows(r)),
        "",
    ]
    paired = [c for c in r["checkpoints"] if "change_from_previous" in c.get("corpus", {})]
    if paired:
        rows = []
        for c in paired:
            d = c["corpus"]["change_from_previous"]
            rows.append(
                [
                    c["checkpoint"],
                    c["layers"],
                    _change(d.get("bits_per_byte"), ".4f"),
                    _change(d.get("kl"), ".4f"),
                    _change(d.get("same_top1"), ".4f"),
                ]
            )
        out += [
            "Change from the previous checkpoint, paired on the same tokens (95 % CI over documents):",
            "",
            table(["ckpt", "layers", "Δ bits/byte", "Δ KL", "Δ same top-1"], rows),
            "",
        ]
    return out


def _change(d: dict[str, Any] | None, spec: str) -> str | None:
    if not d:
        return None
    lo, hi = d["ci"]
    return f"{d['value']:+{spec}} [{lo:+{spec}}, {hi:+{spec}}]"


def _quality_cells(q: dict[str, Any]) -> list[Any]:
    return [
        q["tokens"],
        _num(q["ce"], ".4f"),
        _num(q["ppl"], ".4g"),
        _num(q.get("kl"), ".4f"),
        _num(q.get("top1"), ".3f"),
    ]


def residual_stream_section(r: dict[str, Any]) -> list[str]:
    """The full model's residual stream on the probe, then its std at every checkpoint: a
    partial model's first k+1 rows equal the full model's (same weights, same input)."""
    base = r["baseline"].get("hidden_states")
    if not base:
        return []
    checkpoints = [c for c in r["checkpoints"] if c.get("hidden_states")]
    stds: list[dict[int, float]] = [{h["index"]: h["std"] for h in c["hidden_states"]} for c in checkpoints]
    return [
        f"## Residual stream on the probe {r['run'].get('probe')!r}",
        "",
        "Index 0 enters decoder layer 0 (the embedding output), index i leaves decoder layer i-1; over all "
        "positions and channels, before the final norm. Top |a| is the largest entry with its (position, dimension); "
        f"massive: top {RULE_TEXT}; "
        '"w/o pos 0": the same over every position but the first.',
        "",
        table(
            ["index", "mean", "std", "min", "max", "rms", "median abs", "top abs (pos, dim)", "max/median", "massive"]
            + ["w/o pos 0: std", "top abs (pos, dim)", "max/median", "massive"]
            + [f"std ckpt {c['checkpoint']}" for c in checkpoints],
            [
                [
                    h["index"],
                    *(format(h[k], ".4g") for k in ("mean", "std", "min", "max", "rms")),
                    *_magnitude_cells(h, with_std=False),
                    *_magnitude_cells(h.get("without_first") or {}, with_std=True),
                    *(_num(s.get(h["index"]), ".4g") for s in stds),
                ]
                for h in base
            ],
        ),
        "",
    ]


def _magnitude_cells(h: dict[str, Any], *, with_std: bool) -> list[Any]:
    """A residual row's massive-activation columns; a row from before they were measured has none."""
    top = (h.get("top") or [None])[0]
    where = f"{top['abs']:.4g} ({top['position']}, {top['dim']})" if top else None
    cells = [where, _num(h.get("max_over_median"), ".4g"), _yes_no(h.get("massive"))]
    return [_num(h.get("std"), ".4g"), *cells] if with_std else [_num(h.get("median_abs"), ".4g"), *cells]


def _yes_no(flag: Any) -> str | None:
    """A flag as a table cell; None (not measured) stays empty."""
    return None if flag is None else "yes" if flag else "no"


def census_section(r: dict[str, Any]) -> list[str]:
    c = r.get("census")
    if not c:
        return []
    out = [
        "## Parameter census (from the plan's tensor shapes)",
        "",
        table(
            ["embeddings", "decoder blocks", "final norm", "lm_head", "other", "total", "bytes match plan"],
            [
                [
                    f"{c['embeddings']:,}",
                    f"{c['blocks_total']:,}",
                    f"{c['final_norm']:,}",
                    f"{c['lm_head']:,}" + (" (tied)" if c["lm_head"] == 0 else ""),
                    f"{c['other']:,}",
                    f"{c['total']:,}",
                    c["bytes_match"],
                ]
            ],
        ),
        "",
    ]
    # Identical blocks (the usual case) make one row, not one per layer.
    groups: list[tuple[list[int], dict[str, Any]]] = []
    for block in c["blocks"]:
        shape = {k: v for k, v in block.items() if k != "layer"}
        if groups and groups[-1][1] == shape:
            groups[-1][0].append(block["layer"])
        else:
            groups.append(([block["layer"]], shape))
    parts = list(dict.fromkeys((g, k) for _, b in groups for g in ("attention", "mlp") for k in b[g]))
    out += [
        table(
            ["layers", *(f"{g} {k}" for g, k in parts), "norms", "other", "per block"],
            [
                [
                    f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else layers[0],
                    *(f"{b[g].get(k, 0):,}" for g, k in parts),
                    f"{b['norms']:,}",
                    f"{b['other']:,}",
                    f"{b['total']:,}",
                ]
                for layers, b in groups
            ],
        ),
        "",
    ]
    return out
