"""`python -m coordinator --run-dir DIR`: the coordinator service alone, as the launcher starts it."""

from __future__ import annotations

import argparse
import traceback

from protocol.exit_codes import RunExit, exit_process
from protocol.run_settings import DEFAULT_BIND


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coordinator", description=__doc__)
    parser.add_argument("--run-dir", required=True, help="a planned run directory (plan.json, run.json, keys/)")
    parser.add_argument("--bind", default=DEFAULT_BIND, help="endpoint to bind (default loopback, a free port)")
    parser.add_argument("--control-stdin", action="store_true", help="read launcher control lines on stdin")
    parser.add_argument("--faults", help="fault-injection points as JSON (set by the launcher)")
    parser.add_argument("--quota-bytes", type=int, help="byte quota of the run directory (default: from the plan)")
    args = parser.parse_args(argv)
    from coordinator.server import serve

    try:
        return serve(args.run_dir, args.bind, args.control_stdin, args.faults, args.quota_bytes)
    except Exception:  # a bug, or a run directory it cannot use: its own status, the traceback on stderr
        traceback.print_exc()
        return int(RunExit.CRASH)


if __name__ == "__main__":
    exit_process(main())
