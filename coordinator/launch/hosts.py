"""Many hosts in three commands: `fragsim plan` writes a run directory and one bundle per
agent, `fragsim serve RUN_DIR` runs the coordinator with the live view and starts no agents,
and `fragsim agent --bundle FILE --source DIR --connect ENDPOINT` (agents.agent) runs one
fragment on any host that has a copy of the source."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from coordinator.launch.options import PreparedRun, SimulateOptions, check_bind
from coordinator.launch.simulate import plan_run, resolve_source, resume_run
from coordinator.launch.terminal import wide_console
from protocol.bundle import bundle_bytes
from protocol.errors import PlanError
from protocol.exit_codes import RunExit
from sandbox import layout


def bundle_name(fragment: int) -> str:
    return f"{layout.BUNDLES_DIR}/fragment_{fragment:02d}.bundle"


def write_bundles(run: PreparedRun) -> list[Path]:
    """One owner-only file per fragment: the plan, its key pair, the coordinator's public key."""
    curve = run.plan.extra.get("curve")
    run.box.mkdir(layout.BUNDLES_DIR)
    out = []
    for fragment in run.plan.fragments:
        keys = layout.read_key_pair(run.run_dir, fragment.index) if curve else None
        server = curve["coordinator"].encode() if curve else None
        out.append(
            run.box.write_bytes(
                bundle_name(fragment.index), bundle_bytes(run.plan, fragment.index, keys, server), mode=0o600
            )
        )
    return out


def plan_command(opts: SimulateOptions, console: Console | None = None) -> int:
    console = console or wide_console()
    if not opts.run_dir:
        raise PlanError("--out", None, "the run directory to create")
    source_dir, model_name = resolve_source(opts, console)
    run = plan_run(opts, source_dir, model_name)
    bundles = write_bundles(run)
    plan = run.plan
    console.print(
        f"run [bold]{plan.run_id}[/] planned in {run.run_dir}: {len(plan.fragments)} fragments "
        f"{', '.join(f.label for f in plan.fragments)}, {plan.nbytes / 1e6:.1f} MB, coordinator bind {opts.bind}"
    )
    for fragment, path in zip(plan.fragments, bundles, strict=True):
        console.print(
            f"  bundle for fragment {fragment.index} ({fragment.label}, {fragment.nbytes / 1e6:.1f} MB): {path}"
        )
    console.print(
        "next: copy each bundle to the host that serves its fragment, then\n"
        f"  on this host:   fragsim serve {run.run_dir}\n"
        "  on each agent host: fragsim agent --bundle fragment_KK.bundle --source DIR --connect tcp://THIS_HOST:PORT"
    )
    return RunExit.OK


def serve_command(run_dir: Path, bind: str | None = None, console: Console | None = None) -> int:
    """The coordinator of a planned run, with simulate's live view; agents come from elsewhere."""
    if not (run_dir / layout.RUN_SETTINGS).is_file():
        raise PlanError(
            "RUN_DIR", str(run_dir), f"a run directory holding {layout.RUN_SETTINGS} (made by fragsim plan)"
        )
    if bind:
        check_bind(bind)
    return resume_run(run_dir, console, respawn=False, local_agents=False, bind=bind)
