"""The `fragsim` command."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

# Nothing may be fetched from a model hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from protocol.errors import PlanError
from protocol.exit_codes import AgentExit, RunExit, exit_process
from protocol.run_settings import RunOptions
from sandbox import SandboxError

# What bad input raises: the user gets its one-line message and the usage status.
USER_ERRORS = (PlanError, FileNotFoundError, FileExistsError, NotADirectoryError, SandboxError)

# What `simulate`, `resume` and `serve` return (RunExit), in the words their help shows.
RUN_EXITS = (
    (RunExit.OK, "complete, and the final checkpoint matched the baseline bit for bit"),
    (RunExit.MISMATCH, "complete, but the final checkpoint did not match"),
    (RunExit.USAGE, "bad options or input, refused before anything was created"),
    (RunExit.INCOMPLETE, "agents ended without delivering every fragment"),
    (RunExit.FAILED, "the coordinator ended without results"),
    (RunExit.COORDINATOR_KILLED, "--kill-coordinator without --resume: continue with fragsim resume"),
    (RunExit.STORAGE, "disk full, quota or permissions stopped the run"),
    (RunExit.CRASH, "fragsim itself failed (a bug): the traceback is in the logs"),
)
USAGE_EXIT = (RunExit.USAGE, "bad options or input, refused before anything was done")
CRASH_EXIT = (RunExit.CRASH, "internal error (a bug of fragsim's own; --debug shows the traceback)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, unless its text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if not action.option_strings or "default" in text or action.required or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default off)"
        if isinstance(action, argparse._StoreFalseAction):
            return f"{text} (default on)"
        if action.default in (None, []):
            return f"{text} (default none)"
        return f"{text} (default %(default)s)"


def describe(summary: str, examples: list[str], exits: list[tuple[int, str]] | tuple[tuple[int, str], ...]) -> str:
    """A subcommand's help text: what it does, an example or two, and its exit statuses."""
    lines = [textwrap.fill(summary, 100, break_on_hyphens=False), "", "examples:" if len(examples) > 1 else "example:"]
    lines += [f"  {example}" for example in examples]
    lines += ["", "exit statuses:"]
    lines += [f"  {int(code)}  {words}" for code, words in exits]
    return "\n".join(lines)


def add_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help: str,
    summary: str,
    examples: list[str],
    exits: list[tuple[int, str]] | tuple[tuple[int, str], ...],
) -> argparse.ArgumentParser:
    return sub.add_parser(
        name, help=help, description=describe(summary, examples, exits), formatter_class=HelpFormatter
    )


def _simulate_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from coordinator.launch.agents import ORDER_HELP
    from coordinator.launch.architectures import SUPPORTED_TEXT

    d = RunOptions()  # every default comes from the one definition of a run's options
    p = add_command(
        sub,
        "simulate",
        "run agents and a coordinator end to end",
        "Plan a run, record the full model's baseline, start one agent process per fragment in the chosen "
        "order and a coordinator that verifies every byte, reassembles the longest contiguous prefix on every "
        "arrival and evaluates it; ends with the verdict against the baseline and writes report.html.",
        [
            "fragsim simulate",
            "fragsim simulate --fragments 4 --order random --seed 1 --kill 1@0.3 --respawn",
            "fragsim simulate --model DIR --ranges 0-3,4-7 --json | jq .final_matches_baseline",
        ],
        RUN_EXITS,
    )
    p.add_argument(
        "--model",
        help=f"a local Hugging Face checkpoint dir with safetensors, model_type one of {SUPPORTED_TEXT} "
        "(default: the embedded SmolLM2-135M-Instruct, prepared once)",
    )
    p.add_argument(
        "--dtype",
        default=d.dtype,
        choices=["float32", "bfloat16"],
        help="dtype of the embedded model (default float32); with --model it must be the model's own",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--fragments",
        type=int,
        default=d.fragments,
        help=f"split the layers into N even ranges (default {d.fragments})",
    )
    group.add_argument("--ranges", help="explicit ranges, e.g. 0-7,8-15,16-22,23-29")
    p.add_argument("--order", default=d.order, help=ORDER_HELP)
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of the random order (default {d.seed})")
    p.add_argument(
        "--stagger",
        type=float,
        default=d.stagger,
        metavar="SECONDS",
        help="seconds to wait after a commit before the next agent starts",
    )
    p.add_argument("--parallel", action="store_true", help="start every agent at once (arrival order then races)")
    p.add_argument("--prompt", default=d.prompt, help="the prompt every checkpoint completes greedily")
    p.add_argument(
        "--max-new-tokens", type=int, default=d.max_new_tokens, metavar="N", help="tokens generated per checkpoint"
    )
    p.add_argument(
        "--eval-text",
        default=d.eval_text,
        metavar="FILE",
        help="held-out text scored at every checkpoint: cross-entropy, perplexity, KL and top-1 agreement "
        "with the full model (default: the shipped coordinator/data/eval_text.txt)",
    )
    p.add_argument(
        "--eval-corpus",
        default=d.eval_corpus,
        metavar="lee|FILE",
        help="also score every checkpoint on a corpus as lm-eval does (bits per byte, byte and word "
        "perplexity), against floors (uniform, unigram, embeddings only) with llama.cpp's KL block and "
        "document-bootstrap CIs: lee = gensim's Lee corpus of 300 news articles (100 eval, 200 fit), or a "
        "UTF-8 file of one document per line (default none: slow, ~1 min per checkpoint for lee)",
    )
    p.add_argument(
        "--no-lens",
        dest="lens",
        action="store_false",
        help="do not read checkpoints through the model's tuned lens even when `fragsim lens fit` cached one "
        "(default: use it when there is one)",
    )
    p.add_argument(
        "--eval-documents",
        type=int,
        default=d.eval_documents,
        metavar="N",
        help="score only the first N documents of the corpus's eval set (default all)",
    )
    p.add_argument(
        "--probe",
        default=d.probe,
        metavar="TEXT",
        help=f"input whose residual stream is measured layer by layer at every checkpoint (default {d.probe!r})",
    )
    p.add_argument(
        "--threads", type=int, default=d.threads, help="torch threads in baseline and coordinator (must match)"
    )
    p.add_argument(
        "--reassembly",
        default=d.reassembly,
        metavar="prefix|gaps",
        help="prefix: evaluate the longest contiguous prefix (default); gaps: also, while layers are missing, "
        "every arrived layer in order with the holes skipped",
    )
    p.add_argument("--run-dir", help="run directory (default artifacts/runs/<run id>)")
    p.add_argument("--artifacts", default=d.artifacts, help="artifacts root (default ./artifacts)")
    p.add_argument(
        "--bind",
        default=d.bind,
        help="coordinator endpoint (default loopback, a free port); another address only when asked",
    )
    p.add_argument(
        "--no-curve",
        dest="curve",
        action="store_false",
        help="no CURVE authentication/encryption (for measuring its cost; loopback only)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow --no-curve on a non-loopback --bind (unencrypted, unauthenticated)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=d.connect_timeout,
        metavar="SECONDS",
        help=f"an agent that has not said HELLO this long after it started is ended (default {d.connect_timeout:g})",
    )
    p.add_argument(
        "--heartbeat-ms",
        type=int,
        default=d.heartbeat_ms,
        metavar="MS",
        help=f"coordinator and agents beat this often (default {d.heartbeat_ms})",
    )
    p.add_argument(
        "--dead-after",
        type=float,
        default=d.dead_after,
        metavar="SECONDS",
        help=f"a peer silent this long is declared dead (default {d.dead_after:g}; 1.0 with "
        "--heartbeat-ms 250 detects a hung agent within 1.5 s on an idle machine)",
    )
    _link_arguments(p)
    p.add_argument(
        "--bandwidth",
        metavar="MB/S|FRAG:MB/S,...",
        help="each agent's own uplink: one rate for all or per fragment (others unlimited), e.g. 0:50,1:200; "
        "the agent paces its sends (default unlimited)",
    )
    faults = p.add_argument_group("fault injection")
    faults.add_argument(
        "--kill",
        action="append",
        default=[],
        metavar="FRAG@FRACTION",
        help="SIGKILL that fragment's agent once FRACTION of its bytes arrived (0 = right after "
        "HELLO, 1 = after the last chunk, before commit; 'start' = before HELLO); repeatable",
    )
    faults.add_argument(
        "--kill-random",
        type=int,
        default=d.kill_random,
        metavar="N",
        help="N kills at random fragments and fractions, reproducible with --seed",
    )
    faults.add_argument("--respawn", action="store_true", help="start a killed agent again; it resumes")
    faults.add_argument(
        "--respawn-delay", type=float, default=d.respawn_delay, metavar="SECONDS", help="wait before a respawn"
    )
    faults.add_argument(
        "--kill-coordinator",
        metavar="FRACTION",
        help="SIGKILL the coordinator once FRACTION of all bytes arrived ('reassembly': during the first "
        "reassembly; default none)",
    )
    faults.add_argument(
        "--resume",
        action="store_true",
        help="after --kill-coordinator, start a new coordinator on the same run at once",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the results (results.json plus the launcher record; null without results) as JSON on "
        "stdout; the live view and tables go to stderr (default off)",
    )


def _link_arguments(p: argparse.ArgumentParser) -> None:
    from coordinator.schedule import SCHEDULES

    d = RunOptions()
    link = p.add_argument_group("a shared link (progressive arrival)")
    link.add_argument(
        "--link",
        type=float,
        default=d.link,
        metavar="MB/S",
        help="limit the coordinator's total ingress: it grants credit out of this budget, piece by piece "
        "(default unlimited)",
    )
    link.add_argument(
        "--schedule",
        default=d.schedule,
        metavar="|".join(SCHEDULES),
        help="who the limited link serves first: prefix = the lowest fragment not yet committed (checkpoints "
        "appear one after another), fair = round-robin, arrival = credit in the order it fell due (needs "
        f"--link unless arrival; default {d.schedule})",
    )


def _ray_arguments(p: argparse.ArgumentParser) -> None:
    from coordinator.launch.ray_fleet import REJOIN_GRACE_S  # the module imports Ray only when used

    ray = p.add_argument_group("Ray (the optional extra: pip install 'fragsim[ray]')")
    ray.add_argument(
        "--ray",
        metavar="ADDRESS|auto",
        help="run as the Ray driver: check each node's bundles and source, start one actor per fragment on a "
        "node that can serve it, restart and move them; a restarted coordinator finds its actors by name "
        "(default off)",
    )
    ray.add_argument(
        "--source",
        metavar="DIR",
        help="with --ray: where every node keeps its copy of the source (default: the plan's path)",
    )
    ray.add_argument(
        "--bundles",
        metavar="DIR",
        help="with --ray: where every node keeps its bundles (default: RUN_DIR/bundles, a shared filesystem)",
    )
    ray.add_argument(
        "--rejoin-grace",
        type=float,
        default=REJOIN_GRACE_S,
        metavar="SECONDS",
        help="with --ray: how long a fragment whose nodes are all gone waits for one to come back before the "
        f"run ends without it (default {REJOIN_GRACE_S:g})",
    )


def fragsim_version() -> str:
    """The installed distribution's version, else the one pyproject.toml declares."""
    import re
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fragsim")
    except PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
        return found[1] if found else "unknown"


def _manage_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`fragsim runs`, `rm` and `gc`: the run directories under a runs root."""
    from coordinator.launch.runs import DEFAULT_RUNS_DIR

    runs_dir_help = f"the directory holding the run directories (default {DEFAULT_RUNS_DIR})"
    p = add_command(
        sub,
        "runs",
        "list the runs: id, model, fragments, order, status, verdict, size, age",
        "List every run directory (one holding a plan.json) under the runs root, oldest first. Status: "
        "complete (matched the baseline), mismatch, incomplete, coordinator killed (continue with fragsim "
        "resume), planned (fragsim plan, never served), failed (no results), running. Size counts hard-linked "
        "snapshot files once.",
        ["fragsim runs", "fragsim runs --json | jq '.[] | select(.status != \"complete\") | .id'"],
        [(0, "listed"), USAGE_EXIT],
    )
    p.add_argument("--runs-dir", default=DEFAULT_RUNS_DIR, metavar="DIR", help=runs_dir_help)
    p.add_argument(
        "--json",
        action="store_true",
        help="a JSON list (size_bytes, age_s as raw numbers) instead of a table (default off)",
    )

    p = add_command(
        sub,
        "rm",
        "remove runs by id or path",
        "Remove the named run directories, each given by its run id (under --runs-dir) or its path. Anything "
        "that is not a run directory (no plan.json of a run), or a run whose coordinator is running, is refused "
        "and then nothing is removed.",
        ["fragsim rm 20250101-120000-ab12 artifacts/runs/old"],
        [(0, "removed"), (1, "a removal failed part way (the others were removed)"),
         (RunExit.USAGE, "bad input (nothing removed)")],
    )  # fmt: skip
    p.add_argument("runs", nargs="+", metavar="RUN", help="a run id under --runs-dir, or a run directory's path")
    p.add_argument("--runs-dir", default=DEFAULT_RUNS_DIR, metavar="DIR", help=runs_dir_help)

    p = add_command(
        sub,
        "gc",
        "remove old runs (--keep N) and/or runs that did not complete (--failed)",
        "Remove runs under the runs root: --keep N keeps the N newest (by the newest of plan.json and "
        "results.json) and removes the rest; --failed removes every run whose status is not complete (a "
        "planned run included); both together remove the union. A running run is never removed.",
        ["fragsim gc --keep 5 --failed --dry-run, then the same without --dry-run"],
        [(0, "done (or nothing to do)"), (1, "a removal failed part way"),
         (RunExit.USAGE, "bad input: neither --keep nor --failed, a negative --keep")],
    )  # fmt: skip
    p.add_argument("--keep", type=int, metavar="N", help="keep the N newest runs, remove older ones (default off)")
    p.add_argument("--failed", action="store_true", help="remove every run that is not complete (default off)")
    p.add_argument("--runs-dir", default=DEFAULT_RUNS_DIR, metavar="DIR", help=runs_dir_help)
    p.add_argument("--dry-run", action="store_true", help="only print what would be removed (default off)")


def entry() -> None:
    """The `fragsim` command: `main`, then an exit without the interpreter's torch teardown."""
    exit_process(main())


def build_parser() -> argparse.ArgumentParser:
    """The whole `fragsim` command line: every subcommand, option, default, example and exit status."""
    parser = argparse.ArgumentParser(
        prog="fragsim",
        description="Fragment a transformer checkpoint into layer-range agents and reassemble it: measured, "
        "fault-tolerant, replayable. fragsim COMMAND --help shows each command's options, defaults, an example "
        "and its exit statuses.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    parser.add_argument("--version", action="version", version=f"fragsim {fragsim_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = add_command(
        sub,
        "prepare",
        "convert a model into a safetensors source checkpoint under artifacts/source/",
        "Convert the embedded SmolLM2 GGUF (or a local Hugging Face checkpoint directory) once into the "
        "safetensors source checkpoint every run reads, and print its path. simulate does this itself when "
        "the source is missing; a checkpoint fragsim cannot handle is refused here, with the reason.",
        ["fragsim prepare", "fragsim prepare --model /models/my-llama --force"],
        [(RunExit.OK, "prepared (or already prepared): its path is printed"), USAGE_EXIT, CRASH_EXIT],
    )
    p.add_argument("--model", help="a local Hugging Face checkpoint dir (default: the embedded SmolLM2 GGUF)")
    p.add_argument(
        "--dtype", default=RunOptions.dtype, choices=["float32", "bfloat16"], help="dtype of the embedded model"
    )
    p.add_argument("--artifacts", default=RunOptions.artifacts, metavar="DIR", help="artifacts root")
    p.add_argument("--force", action="store_true", help="rebuild even if already prepared")

    _simulate_parser(sub)

    p = add_command(
        sub,
        "resume",
        "continue a run whose coordinator was killed (or that ended incomplete)",
        "Start a new coordinator on an existing run directory. The directory is untrusted: every stored "
        "fragment is verified against the plan, what fails is set aside and fetched again, and agents resume "
        "where they stopped, so no verified byte is sent twice.",
        ["fragsim resume artifacts/runs/RUN_ID"],
        RUN_EXITS,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (artifacts/runs/<run id>)")
    p.add_argument("--no-respawn", action="store_true", help="do not respawn agents killed from now on")
    _ray_arguments(p)

    p = add_command(
        sub,
        "replay",
        "rebuild a run from its logs alone and check it against results.json",
        "Feed every logged event of a run back through the sans-IO core and compare each decision, checkpoint "
        "and the final verdict with results.json; --verify-model also re-evaluates every reassembled snapshot.",
        ["fragsim replay artifacts/runs/RUN_ID --timeline", "fragsim replay RUN_DIR --json --verify-model"],
        [
            (0, "the replay agrees with results.json"),
            (1, "the replay disagrees (the first differences are printed)"),
            (RunExit.USAGE, "refused: not a run directory, or its logs cannot be replayed"),
            CRASH_EXIT,
        ],
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    p.add_argument("--verify-model", action="store_true", help="also re-evaluate every reassembled snapshot")
    p.add_argument("--timeline", action="store_true", help="an agent-by-agent timeline")
    p.add_argument("--json", action="store_true", help="the rebuilt run as JSON")

    p = add_command(
        sub,
        "soak",
        "many seeded runs with random kills; JSON figures",
        "Run many simulations with seeded random agent and coordinator kills, respawns and resumes, and count "
        "lost data, bit-exact endings, hangs and orphans.",
        ["fragsim soak --model artifacts/source/tiny-llama-8 --runs 50 --seed 0 (or: make chaos-soak)"],
        [(0, "every run ended bit-exact and nothing was lost"), (1, "some run lost data or did not match"),
         USAGE_EXIT, CRASH_EXIT],
    )  # fmt: skip
    p.add_argument("--model", required=True, help="checkpoint dir (a tiny one: see make chaos-soak)")
    p.add_argument("--runs", type=int, default=50, help="how many runs")
    p.add_argument("--seed", type=int, default=0, help="seed of the first run (each run adds its index)")
    p.add_argument("--out", default="artifacts/chaos-soak.json", metavar="FILE", help="the JSON figures")
    p.add_argument("--runs-dir", default="artifacts/soak-runs", metavar="DIR", help="where the runs go")

    p = add_command(
        sub,
        "outside-kills",
        "SIGKILL from outside at seeded random moments, then resume; JSON",
        "SIGKILL the coordinator from outside fragsim at seeded random moments (not at its own kill points), "
        "resume each run and check that it ends bit-exact with no hang and no orphaned process.",
        ["fragsim outside-kills --model artifacts/source/tiny-llama-8 --runs 200 --seed 0"],
        [(0, "every run ended bit-exact, no hangs, no orphans"), (1, "some run did not"), USAGE_EXIT, CRASH_EXIT],
    )
    p.add_argument("--model", help="checkpoint dir (default: the embedded SmolLM2, prepared once)")
    p.add_argument("--runs", type=int, default=200, help="how many runs")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--max-new-tokens", type=int, help="tokens per evaluation (default: the run default)")
    p.add_argument("--out", default="artifacts/outside-kills.json", metavar="FILE", help="the JSON figures")
    p.add_argument("--runs-dir", default="artifacts/outside-kill-runs", metavar="DIR", help="where the runs go")

    p = add_command(
        sub,
        "bench",
        "measure real runs; JSON figures",
        "Measure real runs and every stage of the pipeline against its own ceiling (raw ZeroMQ, BLAKE3, fsync, "
        "the in-process floor, ...), optionally the run time per fragment count; writes JSON figures.",
        ["fragsim bench --fragments-curve 1,2,4,8,15,30 (or: make bench)", "fragsim bench --runs 1 --no-stages"],
        [(0, "measured, and every run's final checkpoint matched"), (1, "some run did not match"),
         USAGE_EXIT, CRASH_EXIT],
    )  # fmt: skip
    p.add_argument("--model", help="checkpoint dir (default: the embedded SmolLM2, prepared once)")
    p.add_argument("--runs", type=int, default=3, help="runs of each configuration")
    p.add_argument("--out", default="artifacts/bench.json", metavar="FILE", help="the JSON figures")
    p.add_argument("--runs-dir", default="artifacts/bench-runs", metavar="DIR", help="where the runs go")
    p.add_argument(
        "--no-stages",
        dest="stages",
        action="store_false",
        help="skip the stages: each stage against its own ceiling (raw zmq, BLAKE3, fsync, in-process floor, ...)",
    )
    p.add_argument(
        "--fragments-curve",
        metavar="N,N,...",
        help="also run forward with each number of fragments (e.g. 1,2,4,8,15,30): run time and per-fragment "
        "overhead (default none)",
    )
    p.add_argument(
        "--quality-fragments", type=int, default=10, help="fragments of the quality-vs-depth run (0: skip it)"
    )
    p.add_argument("--no-parallel", dest="parallel", action="store_false", help="skip the all-agents-at-once run")
    p.add_argument("--max-new-tokens", type=int, help="tokens per evaluation (default: the run default)")
    p.add_argument("--threads", type=int, help="torch threads (default: the run default)")
    p.add_argument(
        "--ceiling-repeats",
        type=int,
        default=3,
        help="repeats of each ceiling (the best counts) and of the warm run and its floor (the median counts; "
        "default 3)",
    )

    p = add_command(
        sub,
        "ablate",
        "ablate each layer, then contiguous blocks, in turn: CE/PPL, greedy removal, proxies; JSON",
        "Ablate each decoder layer in turn (and each contiguous block of the given widths) by one or more methods, "
        "score the held-out text and compare the damage with seed 001's claims; optionally remove layers greedily "
        "(SLEB); rank the damage against Block Influence and angular distance; writes the JSON and a report "
        "beside it.",
        [
            "fragsim ablate (or: make ablate)",
            "fragsim ablate --model DIR --blocks 1,2 --max-tokens 128",
            "fragsim ablate --ablation skip,zero-output,mean,resample --greedy 4",
        ],
        [(0, "measured and written"), USAGE_EXIT, CRASH_EXIT],
    )
    p.add_argument("--model", help="checkpoint dir (default: the embedded SmolLM2, prepared once)")
    p.add_argument("--text", help="held-out text file (default: coordinator/data/eval_text.txt)")
    p.add_argument(
        "--blocks",
        default="1,2,4",
        metavar="W,W,...",
        help="widths of the contiguous blocks removed (default 1,2,4; 1 = single layers, always measured)",
    )
    p.add_argument(
        "--ablation",
        default="skip",
        metavar="M,M,...",
        help="what ablating a layer means, one or several of skip (delete it: its input passes through), "
        "zero-output (zero its output), mean (its update replaced by the update's mean over the positions), "
        "resample (by another position's update) (default skip)",
    )
    p.add_argument(
        "--greedy",
        type=int,
        default=0,
        metavar="N",
        help="also remove N layers greedily, SLEB-style, per method, first and last layer kept (default 0: off)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of resample's position derangements (default 0)")
    p.add_argument("--out", default="artifacts/ablation.json", metavar="FILE", help="the JSON figures")
    p.add_argument("--threads", type=int, default=RunOptions.threads, help="torch threads")
    p.add_argument("--max-tokens", type=int, metavar="N", help="score only the first N tokens of the text")

    p = add_command(
        sub,
        "lens",
        "fit a tuned lens (one affine translator per layer) for a model and cache it under artifacts/lenses/",
        "Fit a tuned lens for the model on the eval corpus's fit set: per layer, the closed-form least-squares map "
        "of its residual stream onto the last layer's, then epochs of KL to the full model. Cached under "
        "artifacts/lenses/ by the model's digest; every later `simulate` of that model reads each checkpoint "
        "through it too (tuned CE and KL beside the logit lens).",
        ["fragsim lens fit (the embedded SmolLM2; ~10 min here)",
         "fragsim lens fit --model DIR --layers 5,15 --epochs 0"],
        [(0, "fitted and written"), USAGE_EXIT, CRASH_EXIT],
    )  # fmt: skip
    p.add_argument("action", choices=["fit"], help="fit: fit and cache the lens")
    p.add_argument("--model", help="checkpoint dir (default: the embedded SmolLM2, prepared once)")
    p.add_argument("--corpus", default="lee", metavar="lee|FILE", help="its fit set is fitted on (default lee)")
    p.add_argument("--tokens", type=int, default=2048, metavar="N", help="fit-set tokens to fit on (default 2048)")
    p.add_argument("--epochs", type=int, default=1, metavar="N", help="epochs of KL after the closed form (default 1)")
    p.add_argument("--layers", metavar="K,K,...", help="fit only these layers (0 = embeddings; default all)")
    p.add_argument("--artifacts", default="artifacts", metavar="DIR", help="where lenses/ is (default artifacts)")
    p.add_argument("--threads", type=int, default=RunOptions.threads, help="torch threads")

    p = add_command(
        sub,
        "sweep",
        "repeated real runs per fragment count and order: latency stats, determinism",
        "Fresh real runs, repeated, for each fragment count and launch order: latency statistics with "
        "bootstrap confidence intervals, and a check that every run's outputs are identical; writes sweep.json, "
        "sweep.md and report.html.",
        ["fragsim sweep (or: make sweep)", "fragsim sweep --fragments 2,4 --orders forward,random --trials 3",
         "fragsim sweep --fragments 4 --schedules prefix,fair --link 200 --trials 3"],
        [(0, "every run matched its baseline and the outputs agreed"), (1, "some run did not"), USAGE_EXIT,
         CRASH_EXIT],
    )  # fmt: skip
    p.add_argument("--model", help="checkpoint dir (default: the embedded SmolLM2, prepared once)")
    p.add_argument("--fragments", default="2,4,6", metavar="N,N,...", help="fragment counts (default 2,4,6)")
    p.add_argument("--trials", type=int, default=5, help="fresh real runs per fragment count and order (default 5)")
    p.add_argument("--orders", default="forward", help="launch orders: forward, reverse, random (default forward)")
    p.add_argument("--seed", type=int, default=0, help="random orders: each trial's seed is derived from it")
    p.add_argument("--max-new-tokens", type=int, help="tokens per evaluation (default: the run default)")
    p.add_argument("--threads", type=int, help="torch threads (default: the run default)")
    p.add_argument(
        "--schedules",
        metavar="arrival|fair|prefix,...",
        help="also sweep who a limited link serves first: each schedule is a configuration of its own (needs "
        "--link; implies --parallel); per configuration the seconds from the first byte to the first and final "
        "checkpoint and the KL area over time (default none: no schedule axis)",
    )
    p.add_argument(
        "--link", type=float, metavar="MB/S", help="every trial's coordinator ingress limit (default unlimited)"
    )
    p.add_argument(
        "--bandwidth",
        metavar="MB/S|FRAG:MB/S,...",
        help="every trial's agent uplinks, as fragsim simulate --bandwidth (default unlimited)",
    )
    p.add_argument(
        "--parallel", action="store_true", help="start every agent of a trial at once, as --schedules always does"
    )
    p.add_argument("--out", default="artifacts/sweep", help="sweep.json, sweep.md and runs/ (default artifacts/sweep)")

    p = add_command(
        sub,
        "report",
        "one HTML page of figures and tables for runs, sweeps and ablations",
        "Write a self-contained HTML report (inline SVG figures, no scripts, no network references).",
        [
            "fragsim report artifacts/runs/RUN_ID",
            "fragsim report artifacts/sweep artifacts/ablation.json --out paper.html",
        ],
        [(0, "written"), (RunExit.USAGE, "bad input (nothing written)"), CRASH_EXIT],
    )
    p.add_argument(
        "targets",
        nargs="+",
        metavar="RUN_DIR|SWEEP_DIR|ABLATION_JSON",
        help="a run directory, a sweep directory (sweep.json) or an ablation JSON (fragsim ablate); "
        "several make one page",
    )
    p.add_argument(
        "--out",
        help="the HTML file (default: report.html in a run or sweep directory, NAME.html beside an ablation JSON; "
        "required with several inputs)",
    )

    d = RunOptions()
    p = add_command(
        sub,
        "plan",
        "write a run directory and one agent bundle per fragment, for agents on other hosts",
        "Plan a run whose agents run elsewhere: the run directory (plan, keys) and one owner-only bundle per "
        "fragment (the plan, that agent's key pair, the coordinator's public key). Then fragsim serve RUN_DIR "
        "here and fragsim agent --bundle FILE on each host.",
        ["fragsim plan --model DIR --fragments 4 --out runs/r1 --bind tcp://0.0.0.0:5555"],
        [(0, "planned"), (RunExit.USAGE, "bad input (nothing created)"), CRASH_EXIT],
    )
    p.add_argument("--model", help="a local Hugging Face checkpoint dir (default: the embedded SmolLM2, prepared once)")
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16"], help="the embedded model's dtype")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--fragments", type=int, default=d.fragments, help=f"even ranges (default {d.fragments})")
    group.add_argument("--ranges", help="explicit ranges, e.g. 0-7,8-15,16-22,23-29")
    p.add_argument("--out", required=True, dest="run_dir", metavar="RUN_DIR", help="the run directory to create")
    _link_arguments(p)
    p.add_argument(
        "--bind", default="tcp://0.0.0.0:5555", help="the coordinator's endpoint (default tcp://0.0.0.0:5555)"
    )
    p.add_argument("--prompt", default=d.prompt, help=f"default {d.prompt!r}")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help=f"default {d.max_new_tokens}")
    p.add_argument(
        "--threads", type=int, default=d.threads, help=f"torch threads of the coordinator (default {d.threads})"
    )
    p.add_argument(
        "--artifacts", default=d.artifacts, help=f"where the default model is prepared (default {d.artifacts})"
    )

    p = add_command(
        sub,
        "serve",
        "the coordinator of a planned run, with the live view; agents come from other hosts",
        "Record the baseline if the run has none, wait for the agents, show them arrive and end with the "
        "verdict, as simulate does. The raw coordinator process (JSON lines) is python -m coordinator "
        "--run-dir DIR.",
        ["fragsim serve runs/r1", "fragsim serve runs/r1 --bind tcp://10.0.0.1:5555"],
        RUN_EXITS,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory fragsim plan wrote")
    p.add_argument(
        "--bind", help="endpoint to bind (default: the one the run was planned with; with --ray, on this node)"
    )
    _ray_arguments(p)
    faults = p.add_argument_group("fault injection (with --ray)")
    faults.add_argument(
        "--kill",
        action="append",
        default=[],
        metavar="FRAG@FRACTION",
        help="SIGKILL that fragment's Ray actor once FRACTION of its bytes arrived; Ray restarts it and it "
        "resumes; repeatable",
    )
    faults.add_argument(
        "--kill-coordinator",
        metavar="FRACTION",
        help="SIGKILL the coordinator once FRACTION of all bytes arrived; the actors stay up for "
        "fragsim resume RUN_DIR --ray ADDRESS",
    )

    from protocol.exit_codes import is_permanent_agent_exit

    agent_exits = {
        AgentExit.COMMITTED: "the fragment was committed (by this agent, or before it started)",
        AgentExit.BAD_SETUP: "bad bundle, fragment, launcher variable or source; nothing was sent",
        AgentExit.NO_WELCOME: "no coordinator answered within --retry-for",
        AgentExit.REJECTED: "refused by the coordinator for good",
        AgentExit.COORDINATOR_LOST: "the coordinator went silent mid-transfer; a new attempt resumes",
        AgentExit.TERMINATED: "stopped by SIGTERM after draining (128+15); a new attempt resumes",
    }
    p = add_command(
        sub,
        "agent",
        "stream one fragment: from a bundle on any host, or from a local run directory",
        "Verify the local source against the plan's digests before sending, retry an unreachable coordinator "
        "with backoff, and resume where a previous attempt stopped. With --bundle the fragment may come from "
        "the launcher: JOB_COMPLETION_INDEX (Kubernetes indexed Job), else SLURM_PROCID (srun), else RANK; "
        "SIGTERM stops it cleanly. A launcher retries the retriable statuses and gives up on the permanent ones.",
        [
            "fragsim agent --bundle fragment_01.bundle --source /models/smollm2 --connect tcp://10.0.0.1:5555",
            "srun fragsim agent --bundle 'bundles/fragment_{fragment:02d}.bundle' --connect tcp://10.0.0.1:5555",
        ],
        [
            (code, words if code == AgentExit.COMMITTED else
             f"{'permanent' if is_permanent_agent_exit(code) else 'retriable'}: {words}")
            for code, words in agent_exits.items()
        ],
    )  # fmt: skip
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--bundle", metavar="FILE",
        help="the bundle fragsim plan wrote for this fragment; {fragment} or {fragment:02d} in it is replaced by "
        "the fragment index (default none)",
    )  # fmt: skip
    where.add_argument("--run-dir", help="a local run directory (how simulate starts its agents)")
    p.add_argument(
        "--fragment", type=int,
        help="the fragment to serve (with --bundle: must be the bundle's; default: JOB_COMPLETION_INDEX, "
        "SLURM_PROCID or RANK, the first one set, else the bundle's)",
    )  # fmt: skip
    p.add_argument("--source", metavar="DIR", help="this host's copy of the source (default: the plan's path)")
    p.add_argument("--connect", required=True, metavar="ENDPOINT", help="the coordinator, e.g. tcp://HOST:5555")
    p.add_argument(
        "--retry-for", type=float, default=300.0, metavar="SECONDS",
        help="with --bundle: keep asking a coordinator that does not answer this long (default 300)",
    )  # fmt: skip
    p.add_argument(
        "--log-dir", metavar="DIR", help="with --bundle: where logs/agent_KK.jsonl goes (default: beside the bundle)"
    )
    p.add_argument(
        "--bandwidth", type=float, metavar="MB/S",
        help="with --bundle: this host's uplink; sends are paced to it (default unlimited)",
    )  # fmt: skip
    p.add_argument(
        "--ready-file", metavar="PATH",
        help="with --bundle: written (JSON: run, fragment, pid, endpoint) once the source is verified and the "
        "coordinator welcomed this agent, and left in place; a leftover is removed at start (default none)",
    )  # fmt: skip

    _manage_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except USER_ERRORS as exc:  # bad input: one line, usage status, nothing was created
        if args.debug:
            raise
        print(f"fragsim {args.command}: {_one_line(exc)}", file=sys.stderr)
        return int(RunExit.USAGE)
    except KeyboardInterrupt:
        print(f"fragsim {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug of fragsim's own: its own status, never "did not match"
        if args.debug:
            raise
        print(
            f"fragsim {args.command}: internal error: {type(exc).__name__}: {_one_line(exc)} "
            "(run again with --debug for the traceback)",
            file=sys.stderr,
        )
        return int(RunExit.CRASH)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _run(args: argparse.Namespace) -> int:
    if args.command in ("prepare", "simulate", "soak", "resume", "bench", "outside-kills"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress view owns the terminal

    if args.command == "prepare":
        from coordinator.launch.prepare import prepare_default, prepare_model_dir

        artifacts = Path(args.artifacts)
        if args.model:
            out = prepare_model_dir(Path(args.model), artifacts, args.dtype, force=args.force)
        else:
            out = prepare_default(artifacts, args.dtype or "float32", force=args.force)
        print(out)
        return 0
    if args.command == "simulate":
        from coordinator.launch.options import SimulateOptions
        from coordinator.launch.simulate import run_simulation

        opts = SimulateOptions(**{k: v for k, v in vars(args).items() if k not in ("command", "debug", "json")})
        return run_simulation(opts, json_out=args.json)
    if args.command == "resume":
        from coordinator.launch.simulate import resume_run

        if args.ray:
            from coordinator.launch.hosts import RayServe, serve_command

            on_ray = RayServe(args.ray, args.source, args.bundles, args.rejoin_grace)
            return serve_command(Path(args.run_dir), ray=on_ray)
        if args.source or args.bundles:
            raise PlanError("--source/--bundles", args.source or args.bundles, "only with --ray")
        return resume_run(Path(args.run_dir), respawn=not args.no_respawn)
    if args.command == "replay":
        return replay_command(args)
    if args.command in ("runs", "rm", "gc"):
        from coordinator.launch import runs

        root = Path(args.runs_dir)
        if args.command == "runs":
            return runs.runs_command(root, args.json)
        if args.command == "rm":
            return runs.rm_command(args.runs, root)
        return runs.gc_command(root, args.keep, args.failed, args.dry_run)
    if args.command == "bench":
        from coordinator.lab.bench import bench, parse_counts
        from coordinator.launch.prepare import prepare_default

        counts = parse_counts(args.fragments_curve) if args.fragments_curve else None  # checked before any run
        model = Path(args.model).resolve() if args.model else prepare_default(Path("artifacts"))
        summary = bench(model, args.runs, Path(args.out), Path(args.runs_dir), stages=args.stages,
                        fragments_curve=counts, quality_fragments=args.quality_fragments, parallel=args.parallel,
                        max_new_tokens=args.max_new_tokens, threads=args.threads,
                        ceiling_repeats=args.ceiling_repeats)  # fmt: skip
        return 0 if summary["final_matches_baseline"] else 1
    if args.command == "ablate":
        from transformers.utils import logging as hf_logging

        from coordinator.lab.ablate import ablate, parse_widths
        from coordinator.lab.ablation_methods import parse_methods
        from coordinator.launch.prepare import prepare_default

        hf_logging.disable_progress_bar()
        widths = parse_widths(args.blocks)  # checked before the model is loaded
        methods = parse_methods(args.ablation)
        if args.greedy < 0:
            raise PlanError("--greedy", args.greedy, "a whole number of at least 0 (0: no greedy removal)")
        model = Path(args.model).resolve() if args.model else prepare_default(Path("artifacts"))
        ablate(model, Path(args.out), text=Path(args.text) if args.text else None, widths=widths,
               methods=methods, greedy=args.greedy, seed=args.seed, threads=args.threads,
               max_tokens=args.max_tokens)  # fmt: skip
        return 0
    if args.command == "lens":
        from transformers.utils import logging as hf_logging

        from coordinator.lab.lens_fit import fit_command, parse_layers
        from coordinator.launch.prepare import prepare_default

        hf_logging.disable_progress_bar()
        layers = parse_layers(args.layers) if args.layers else None  # checked before the model is loaded
        model = Path(args.model).resolve() if args.model else prepare_default(Path(args.artifacts))
        fit_command(model, Path(args.artifacts), corpus=args.corpus, tokens=args.tokens, epochs=args.epochs,
                    layers=layers, threads=args.threads)  # fmt: skip
        return 0
    if args.command == "sweep":
        from transformers.utils import logging as hf_logging

        from coordinator.lab.sweep import check_link_axis, parse_fragments, parse_orders, parse_schedules, sweep
        from coordinator.launch.prepare import prepare_default

        hf_logging.disable_progress_bar()
        fragments, orders = parse_fragments(args.fragments), parse_orders(args.orders)  # checked before any run
        schedules = parse_schedules(args.schedules) if args.schedules is not None else None
        check_link_axis(schedules, args.link, args.bandwidth, fragments)
        model = Path(args.model).resolve() if args.model else prepare_default(Path("artifacts"))
        summary = sweep(model, Path(args.out), fragments=fragments, trials=args.trials, orders=orders,
                        seed=args.seed, max_new_tokens=args.max_new_tokens, threads=args.threads,
                        schedules=schedules, link=args.link, bandwidth=args.bandwidth,
                        parallel=args.parallel)  # fmt: skip
        return 0 if summary["ok"] else 1
    if args.command == "soak":
        from coordinator.lab.soak import soak

        summary = soak(Path(args.model).resolve(), args.runs, args.seed, Path(args.out), Path(args.runs_dir))
        return 0 if summary["lost_data"] == 0 and summary["bit_exact"] == summary["runs"] else 1
    if args.command == "outside-kills":
        from coordinator.lab.outside_kills import outside_kills
        from coordinator.launch.prepare import prepare_default

        model = Path(args.model).resolve() if args.model else prepare_default(Path("artifacts"))
        summary = outside_kills(model, args.runs, args.seed, Path(args.out), Path(args.runs_dir),
                                max_new_tokens=args.max_new_tokens)  # fmt: skip
        return 0 if summary["bit_exact"] == summary["runs"] and not summary["hangs"] + summary["orphans"] else 1
    if args.command == "report":
        from coordinator.report.build import write_report

        written = write_report([Path(t) for t in args.targets], Path(args.out) if args.out else None)
        print(f"report: {written.path} ({written.figures} figures, {written.tables} tables, {written.seconds:.2f}s)")
        return 0
    if args.command == "plan":
        from coordinator.launch.hosts import plan_command
        from coordinator.launch.options import SimulateOptions

        fields = ("model", "dtype", "fragments", "ranges", "run_dir", "bind", "prompt", "max_new_tokens", "threads",
                  "link", "schedule")  # fmt: skip
        return plan_command(SimulateOptions(order="forward", **{k: getattr(args, k) for k in (*fields, "artifacts")}))
    if args.command == "serve":
        from coordinator.launch.hosts import RayServe, serve_command

        if not args.ray and (args.source or args.bundles):
            raise PlanError("--source/--bundles", args.source or args.bundles, "only with --ray")
        ray = RayServe(args.ray, args.source, args.bundles, args.rejoin_grace) if args.ray else None
        return serve_command(Path(args.run_dir), args.bind, ray=ray, kills=args.kill,
                             kill_coordinator=args.kill_coordinator)  # fmt: skip
    if args.command == "agent":
        from agents.agent import main_agent, main_bundle_agent

        if args.bandwidth is not None and not args.bandwidth > 0:  # 0 read as "unlimited" would hide a typo
            raise PlanError("--bandwidth", args.bandwidth, "an uplink in MB/s > 0 (leave it out for unlimited)")
        uplink = None if args.bandwidth is None else args.bandwidth * 1e6
        if args.bundle:
            from agents.launcher_env import stop_on_sigterm

            with stop_on_sigterm() as stop:  # SIGTERM: drain, BYE, exit 143
                return main_bundle_agent(args.bundle, args.source, args.connect, fragment=args.fragment,
                                         retry_for_s=args.retry_for, log_dir=args.log_dir, environ=os.environ,
                                         stop=stop, ready_file=args.ready_file, uplink_bytes_s=uplink)  # fmt: skip
        if args.fragment is None:
            raise PlanError("--fragment", None, "the fragment index (required with --run-dir)")
        return main_agent(args.run_dir, args.fragment, args.connect)
    return int(RunExit.USAGE)


def replay_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from coordinator.launch.replay_view import as_json, show, timeline, verify_model
    from coordinator.launch.terminal import wide_console
    from coordinator.replay import ReplayRefused, run_replay

    console = wide_console()
    try:
        replay = run_replay(Path(args.run_dir))
    except ReplayRefused as exc:
        print(f"fragsim replay: refused: {exc}", file=sys.stderr)
        return 2
    if args.verify_model:
        replay.differences += verify_model(replay, Console(stderr=True) if args.json else console)
    if args.json:
        print(as_json(replay))
        return 0 if replay.agrees else 1
    show(replay, console)
    if args.timeline:
        console.print()
        for row in timeline(replay):
            console.print(row, highlight=False, markup=False)
    console.print()
    for note in replay.notes:
        console.print(f"[yellow]note[/]: {note}", markup=True, highlight=False)
    if replay.agrees:
        console.print(
            f"[bold green]replay agrees[/] with results.json: {len(replay.lines)} log lines, "
            f"{replay.segments} coordinator process(es), every core decision reproduced"
        )
        return 0
    console.print(f"[bold red]replay disagrees[/]: {replay.differences[0]}")
    for more in replay.differences[1:5]:
        console.print(f"  also: {more}", markup=False)
    return 1


if __name__ == "__main__":
    sys.exit(main())
