"""The run directory's layout: every path inside a run comes from here.

artifacts/runs/<run_id>/            one run = one sandbox: the coordinator writes nowhere else
  plan.json  run.json               the trust anchor; the options the launcher recorded
  eval_text.txt                     the held-out text every checkpoint is scored on (a copy)
  eval_corpus.json                  --eval-corpus: its eval and fit documents (a copy)
  keys/                             per-run CURVE key pairs (secret keys 0600)
  baseline/                         the full source model's completion, tokens and logits
  quorum/fragment_KK.partial/       a fragment while its pieces arrive
  quorum/fragment_KK/               promoted fragments (one atomic rename)
  quarantine/                       promoted fragments that failed re-verification on resume
  reassembled/checkpoint_KK/        snapshots stock from_pretrained loads
  results.json  results.md  launcher.json  report.html (figures: fragsim report)
  logs/coordinator.jsonl  logs/agent_KK.jsonl  (+ .stderr)
"""

from __future__ import annotations

from pathlib import Path

PLAN = "plan.json"
RUN_SETTINGS = "run.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
LAUNCHER_JSON = "launcher.json"
RAY_JSON = "ray.json"  # serve --ray: the cluster address and the endpoint its actors stream to
REPORT_HTML = "report.html"
# A copy, so the run is self-contained: baseline, coordinator and a resume score the same text.
EVAL_TEXT = "eval_text.txt"
EVAL_CORPUS = "eval_corpus.json"

BASELINE_DIR = "baseline"
BASELINE_JSON = f"{BASELINE_DIR}/baseline.json"
BASELINE_LOGITS = f"{BASELINE_DIR}/logits.safetensors"
# --eval-corpus: the full model at every corpus token (coordinator.corpus.scoring)
BASELINE_CORPUS = f"{BASELINE_DIR}/corpus.safetensors"
BASELINE_LENS = f"{BASELINE_DIR}/lens.safetensors"  # the model's tuned lens, when `fragsim lens fit` made one

KEYS_DIR = "keys"
BUNDLES_DIR = "bundles"  # fragsim plan: one owner-only bundle per fragment, for agents on other hosts
QUORUM = "quorum"
QUARANTINE = "quarantine"
REASSEMBLED = "reassembled"
SNAPSHOT_INDEX = "model.safetensors.index.json"

LOGS = "logs"
COORDINATOR_LOG = f"{LOGS}/coordinator.jsonl"
COORDINATOR_STDERR = f"{LOGS}/coordinator.stderr"
RAY_LOG = f"{LOGS}/ray.jsonl"  # serve --ray: discovery, placement, restarts, takeovers


def staging_dir(fragment: int) -> str:
    return f"{QUORUM}/fragment_{fragment:02d}.partial"


def committed_dir(fragment: int) -> str:
    return f"{QUORUM}/fragment_{fragment:02d}"


def quarantine_dir(fragment: int, attempt: int) -> str:
    return f"{QUARANTINE}/fragment_{fragment:02d}.{attempt}"


def snapshot_dir(checkpoint: int) -> str:
    return f"{REASSEMBLED}/checkpoint_{checkpoint:02d}"


def snapshot_weights(fragment: int) -> str:
    """The name of a fragment's weights inside a snapshot directory."""
    return f"fragment_{fragment:02d}.safetensors"


def agent_log(fragment: int) -> str:
    return f"{LOGS}/agent_{fragment:02d}.jsonl"


def bundle_file_name(fragment: int) -> str:
    """A fragment's bundle, as fragsim plan names it inside bundles/ and agents find it on their host."""
    return f"fragment_{fragment:02d}.bundle"


def agent_stderr(fragment: int) -> str:
    return f"{LOGS}/agent_{fragment:02d}.stderr"


def key_name(fragment: int | None) -> str:
    """'coordinator' (fragment None) or 'agent_KK'."""
    return "coordinator" if fragment is None else f"agent_{fragment:02d}"


def public_key(fragment: int | None) -> str:
    return f"{KEYS_DIR}/{key_name(fragment)}.public"


def secret_key(fragment: int | None) -> str:
    return f"{KEYS_DIR}/{key_name(fragment)}.secret"


def read_key_pair(run_dir: Path, fragment: int | None) -> tuple[bytes, bytes]:
    """(public, secret) Z85 CURVE keys of the coordinator (fragment None) or of one agent."""
    return (
        (run_dir / public_key(fragment)).read_bytes().strip(),
        (run_dir / secret_key(fragment)).read_bytes().strip(),
    )
