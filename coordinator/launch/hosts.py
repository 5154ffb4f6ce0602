"""Many hosts in three commands: `fragsim plan` writes a run directory and one bundle per
agent, `fragsim serve RUN_DIR` runs the coordinator with the live view and starts no agents,
and `fragsim agent --bundle FILE --source DIR --connect ENDPOINT` (agents.agent) runs one
fragment on any host that has a copy of the source."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from coordinator.launch.faults import parse_kill
from coordinator.launch.options import PreparedRun, SimulateOptions, check_bind
from coordinator.launch.simulate import plan_run, resolve_source, resume_run
from coordinator.launch.terminal import wide_console
from protocol.bundle import bundle_bytes
from protocol.errors import PlanError
from protocol.exit_codes import RunExit
from sandbox import Sandbox, layout


def bundle_name(fragment: int) -> str:
    return f"{layout.BUNDLES_DIR}/{layout.bundle_file_name(fragment)}"


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


@dataclass(frozen=True)
class RayServe:
    """`serve --ray`: where the cluster is and where each node keeps its copies."""

    address: str  # a Ray address, or "auto"
    source_dir: str | None = None  # each node's copy of the source (default: the plan's path)
    bundles_dir: str | None = None  # each node's bundles (default: RUN_DIR/bundles, a shared filesystem)
    rejoin_grace_s: float | None = None  # how long a fragment waits for a node that can serve it


def serve_command(
    run_dir: Path,
    bind: str | None = None,
    console: Console | None = None,
    *,
    ray: RayServe | None = None,
    kills: list[str] | None = None,
    kill_coordinator: str | None = None,
) -> int:
    """The coordinator of a planned run, with simulate's live view; agents come from elsewhere,
    or, with `ray`, are Ray actors this command places and supervises."""
    console = console or wide_console()
    if not (run_dir / layout.RUN_SETTINGS).is_file():
        raise PlanError(
            "RUN_DIR", str(run_dir), f"a run directory holding {layout.RUN_SETTINGS} (made by fragsim plan)"
        )
    if bind:
        check_bind(bind)
    if ray is None:
        if kills or kill_coordinator:
            raise PlanError("--kill", kills or kill_coordinator, "no kills without --ray: the agents are elsewhere")
        return resume_run(run_dir, console, respawn=False, local_agents=False, bind=bind)
    return _serve_on_ray(run_dir, bind, console, ray, kills or [], kill_coordinator)


def _serve_on_ray(
    run_dir: Path, bind: str | None, console: Console, ray: RayServe, kills: list[str], kill_coordinator: str | None
) -> int:
    from coordinator.launch.ray_fleet import RayFleet
    from protocol.plan import Plan
    from sandbox import Sandbox

    box = Sandbox(run_dir)
    plan = Plan.loads(box.read_bytes(layout.PLAN))
    run = PreparedRun(run_dir.resolve(), box, plan, [f.index for f in plan.fragments], Path(plan.model["source_dir"]))
    for spec in kills:
        parse_kill(spec, len(plan.fragments))  # refused before Ray is asked anything
    grace = {} if ray.rejoin_grace_s is None else {"rejoin_grace_s": ray.rejoin_grace_s}
    fleet = RayFleet(run, ray.address, source_dir=ray.source_dir, bundles_dir=ray.bundles_dir, say=console.print,
                     **grace)  # fmt: skip
    ip = fleet.connect()
    try:
        fleet.discover()
        bind = bind or _ray_endpoint(box, ip)
        box.write_json(layout.RAY_JSON, {"address": ray.address, "endpoint": bind, "source_dir": fleet.source_dir,
                                         "bundles_dir": fleet.bundles_dir})  # fmt: skip
    except BaseException:
        fleet.finish(keep=True)
        raise
    return resume_run(run_dir, console, respawn=False, local_agents=False, bind=bind, fleet=fleet, kills=kills,
                      kill_coordinator=kill_coordinator)  # fmt: skip


def _ray_endpoint(box: Sandbox, ip: str) -> str:
    """The coordinator's endpoint on this node: the one a previous coordinator of the run used
    (its actors still stream there), else the planned port on this node's address, else a free one."""
    import json
    import socket

    if box.exists(layout.RAY_JSON):
        endpoint = json.loads(box.read_bytes(layout.RAY_JSON)).get("endpoint")
        if isinstance(endpoint, str) and endpoint.startswith(f"tcp://{ip}:"):
            return endpoint
    from protocol.run_settings import RunSettings

    planned = RunSettings.from_json(json.loads(box.read_bytes(layout.RUN_SETTINGS))).options.bind
    port = planned.rpartition(":")[2]
    if port.isdigit() and int(port) != 0:
        return f"tcp://{ip}:{port}"
    with socket.socket() as probe:
        probe.bind((ip, 0))
        return f"tcp://{ip}:{probe.getsockname()[1]}"
