"""`python -m agents run --run-dir DIR --fragment N --connect tcp://127.0.0.1:PORT`"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agents", description="Run one fragment agent.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="stream one fragment to a coordinator")
    run.add_argument("--run-dir", required=True, help="the run directory holding plan.json")
    run.add_argument("--fragment", type=int, required=True, help="fragment index in the plan")
    run.add_argument("--connect", required=True, help="coordinator endpoint, e.g. tcp://127.0.0.1:5555")
    args = parser.parse_args(argv)
    from agents.agent import main_agent

    return main_agent(args.run_dir, args.fragment, args.connect)


if __name__ == "__main__":
    # An agent prints nothing but JSON lines, yet structlog imports rich (for its console
    # renderer) when rich is installed: ~45 ms of the agent's ~0.3 s start-up. Marking it
    # absent makes structlog fall back to plain tracebacks, which agents never render anyway.
    sys.modules.setdefault("rich", None)  # type: ignore[arg-type]
    sys.exit(main())
