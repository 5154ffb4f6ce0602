"""fragsim on Ray: `fragsim serve RUN_DIR --ray ADDRESS` as the Ray driver.

Ray does placement, start, restart and membership; fragsim's ZeroMQ + CURVE plane still
carries every byte, verified per piece against the plan, and fragsim's heartbeats stay the
primary liveness signal (Ray's defaults declare a lost node dead only after ~63 s).

1. Discovery: one short task per alive node checks that node's bundles and local source
   against the plan (`agents.ray_actor.discover`) and reports which fragments it can serve.
2. Placement: one detached, named actor per fragment (`fragsim-<run>-<fragment>`,
   `max_restarts=-1`), on the custom resource `fragsim_fragment_<i>` where the operator gave
   one, else pinned to the least loaded node that can serve it.
3. Supervision, once a second from the launcher's loop: an actor Ray restarted is noticed by
   its new pid; an actor whose node is gone, or that failed for good, is moved to another node
   that can serve its fragment; a fragment no alive node can serve is lost, and the run ends
   with the longest prefix.
4. A coordinator that restarts (`fragsim resume RUN_DIR --ray ...`) finds its actors by name
   and points them at its endpoint instead of starting a second set.

Every state change is a structlog event in logs/ray.jsonl; every wait on Ray is bounded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from coordinator.launch.options import PreparedRun
from protocol import log_events as E
from protocol.errors import PlanError
from protocol.eventlog import log_start, open_event_log
from protocol.exit_codes import is_permanent_agent_exit
from sandbox import layout

RAY_NAMESPACE = "fragsim"
RAY_WAIT_S = 60.0  # the bound of every wait on Ray: discovery, an actor's answer, membership
PROBE_S = 5.0  # a TCP connect to the head's GCS, before Ray is asked to join
TICK_S = 1.0  # how often membership and actors are checked
REJOIN_GRACE_S = 30.0  # a fragment with no alive node that can serve it is lost after this long
FINAL_STATUS_WAIT_S = 5.0  # an actor's last status, asked for before it is ended
NAME_FREE_WAIT_S = 10.0  # a killed actor's name is released asynchronously
# Ray declares a node dead after period * threshold + timeout; with its defaults that is ~63 s
# (seen here). The README's recipe and the tests start Ray with these (~4.5 s).
RAY_HEALTH_CHECK_ENV = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}
FRAGMENT_RESOURCE = "fragsim_fragment_{}"


def import_ray(address: str) -> Any:
    try:
        import ray
    except ImportError:
        raise PlanError(
            "--ray", address, "Ray installed: the optional extra is missing (pip install 'fragsim[ray]')"
        ) from None
    return ray


def actor_name(run_id: str, fragment: int) -> str:
    return f"fragsim-{run_id}-{fragment}"


def bounded(what: str, seconds: float, call: Callable[[], Any]) -> Any:
    """`call()` in a thread, given `seconds`: a Ray call that would block forever is refused."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name=f"fragsim-ray-{what}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise PlanError("--ray", what, f"an answer from Ray within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def probe_gcs(address: str) -> None:
    """Refuse an address where no Ray head listens, in PROBE_S: Ray itself would wait, then end
    the whole process."""
    import socket

    if address == "auto":  # Ray resolves it (RAY_ADDRESS, or a head started on this machine)
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise PlanError("--ray", address, "HOST:PORT of the Ray head's GCS (ray start --head prints it), or auto")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_S).close()
    except OSError as exc:
        raise PlanError("--ray", address, f"a Ray head listening there ({exc.strerror or exc})") from None


@dataclass
class Placed:
    """One fragment's actor, as the fleet last saw it."""

    handle: Any
    node: str | None  # the node it is pinned to; None: placed by a custom resource
    pid: int | None = None
    ran_on: str | None = None  # the node its last status came from
    orphaned_since: float | None = None  # no alive node for it since (monotonic)
    pending: Any = None  # an outstanding status() call
    tried: set[str] = field(default_factory=set)  # nodes where it failed for good


class RayFleet:
    def __init__(
        self,
        run: PreparedRun,
        address: str,
        *,
        source_dir: str | None = None,
        bundles_dir: str | None = None,
        say: Callable[[str], None] = print,
        rejoin_grace_s: float = REJOIN_GRACE_S,
    ) -> None:
        self.ray = import_ray(address)
        self.address = address
        self.rejoin_grace_s = rejoin_grace_s
        self.run, self.plan, self.say = run, run.plan, say
        self.source_dir = source_dir or str(self.plan.model["source_dir"])
        self.bundles_dir = bundles_dir or str(run.run_dir / layout.BUNDLES_DIR)
        self.log = open_event_log(run.box.open_log(layout.RAY_LOG), run_id=self.plan.run_id, role="ray")
        self.servable: dict[str, set[int]] = {}  # node id -> fragments it can serve
        self.declared: set[int] = set()  # fragments the operator tied to nodes by a custom resource
        self.placed: dict[int, Placed] = {}
        self.lost: set[int] = set()
        self.endpoint = ""
        self._next_tick = 0.0
        self._actor_class: Any = None

    # ---- connecting and discovery ----------------------------------------------------------

    def connect(self) -> str:
        """Join the cluster as its driver; returns this node's address, for the coordinator's bind."""
        ray = self.ray
        probe_gcs(self.address)
        try:
            # In the main thread: Ray sets its signal handlers there. log_to_driver off: the
            # actors' output stays in Ray's logs on their nodes, not in the live view.
            ray.init(address=self.address, namespace=RAY_NAMESPACE, log_to_driver=False, configure_logging=False)
        except ConnectionError as exc:
            raise PlanError("--ray", self.address, f"a running Ray cluster ({exc})") from None
        ip = ray.util.get_node_ip_address()
        log_start(self.log, address=self.address, ray_version=ray.__version__, node_ip=ip)
        return str(ip)

    def alive_nodes(self) -> dict[str, dict[str, Any]]:
        nodes = bounded("ray.nodes", RAY_WAIT_S, self.ray.nodes)
        return {n["NodeID"]: n for n in nodes if n.get("Alive")}

    def discover(self) -> None:
        """Ask every alive node what it can serve; refuse up front if some fragment has no node."""
        fragments = [f.index for f in self.plan.fragments]
        nodes = self.alive_nodes()
        why = self._discover_nodes(nodes)
        self.declared = {i for i in fragments if self._resource_nodes(i, nodes)}
        missing = [
            i
            for i in fragments
            if not any(i in self.servable.get(n, ()) for n in (self._resource_nodes(i, nodes) or nodes))
        ]
        if missing:
            detail = "; ".join(f"fragment {i}: {' | '.join(why[i]) or 'no node'}" for i in missing)
            raise PlanError(
                "--ray", self.address, f"a node that can serve every fragment; none can serve {missing} ({detail})"
            )
        counts = {i: sum(i in s for s in self.servable.values()) for i in fragments}
        self.say(
            f"ray: {len(nodes)} node(s) at {self.address}; fragments servable by "
            + ", ".join(f"{i}: {n} node(s)" for i, n in counts.items())
        )

    def _discover_nodes(self, nodes: dict[str, dict[str, Any]]) -> dict[int, list[str]]:
        """One discovery task pinned to each of `nodes`; why each fragment was refused where."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from agents.ray_actor import discover

        task = self.ray.remote(num_cpus=0, max_retries=0)(discover)
        fragments = [f.index for f in self.plan.fragments]
        refs = {
            node: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
                self.bundles_dir, self.source_dir, self.plan.digest, fragments
            )
            for node in nodes
        }
        why: dict[int, list[str]] = {i: [] for i in fragments}
        for node, ref in refs.items():
            ip = nodes[node].get("NodeManagerAddress")
            try:
                found = self.ray.get(ref, timeout=RAY_WAIT_S)
            except Exception as exc:  # a node that cannot run the task serves nothing
                self.log.warning(E.RAY_NODE_REFUSED, node=node, ip=ip, error=f"{type(exc).__name__}: {exc}")
                for i in fragments:
                    why[i].append(f"node {node[:8]} ({ip}): {type(exc).__name__}")
                continue
            self.servable[node] = set(found["servable"])
            self.log.info(E.RAY_NODE_DISCOVERED, node=node, ip=ip, servable=found["servable"],
                          refused=found["refused"], seconds=found["seconds"])  # fmt: skip
            for i, reason in found["refused"].items():
                why[int(i)].append(f"node {node[:8]} ({ip}): {reason}")
        return why

    # ---- actors ----------------------------------------------------------------------------

    def _actor(self) -> Any:
        if self._actor_class is None:
            from agents.ray_actor import AgentActor

            self._actor_class = self.ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)(AgentActor)
        return self._actor_class

    def start(self, endpoint: str, committed: set[int]) -> None:
        """One actor per fragment not yet committed: reattached by name if it exists, else created."""
        self.endpoint = endpoint
        for fragment in self.plan.fragments:
            i = fragment.index
            name = actor_name(self.plan.run_id, i)
            try:
                handle = self.ray.get_actor(name, namespace=RAY_NAMESPACE)
            except ValueError:
                if i not in committed:
                    self._create(i)
                continue
            if i in committed:  # an actor a previous coordinator left: its work is done
                self._end(i, handle)
                continue
            self.ray.get(handle.retarget.remote(endpoint), timeout=RAY_WAIT_S)
            status = self.ray.get(handle.status.remote(), timeout=RAY_WAIT_S)
            node = None if i in self.declared else status["node"]
            self.placed[i] = Placed(handle, node, pid=status["pid"], ran_on=status["node"])
            self.log.info(E.RAY_ACTOR_REATTACHED, fragment=i, name=name, pid=status["pid"], endpoint=endpoint)
            self.say(f"ray: found agent {i}'s actor {name} (pid {status['pid']}); it now streams to {endpoint}")

    def _resource_nodes(self, fragment: int, nodes: dict[str, dict[str, Any]]) -> list[str]:
        key = FRAGMENT_RESOURCE.format(fragment)
        return [n for n, info in nodes.items() if info.get("Resources", {}).get(key, 0) > 0]

    def _create(self, fragment: int, avoid: set[str] | None = None, dry_run: bool = False) -> bool:
        """Start fragment's actor where it can be served; False if no alive node can. `dry_run`:
        only say whether one could."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        avoid = avoid or set()
        nodes = self.alive_nodes()
        name = actor_name(self.plan.run_id, fragment)
        bundle = f"{self.bundles_dir}/{layout.bundle_file_name(fragment)}"
        args = (bundle, self.source_dir, self.endpoint, fragment)
        options: dict[str, Any] = {"name": name, "namespace": RAY_NAMESPACE, "lifetime": "detached"}
        node: str | None = None
        if fragment in self.declared:
            # The operator's resource says which nodes hold this fragment: Ray places the actor
            # on one of them and restarts it on another when its node goes.
            holders = self._resource_nodes(fragment, nodes)
        else:
            holders = list(nodes)
        candidates = [n for n in holders if fragment in self.servable.get(n, ()) and n not in avoid]
        if not candidates or dry_run:
            return bool(candidates)
        if fragment in self.declared and candidates == holders:
            options["resources"] = {FRAGMENT_RESOURCE.format(fragment): 0.001}
        else:
            load = {n: sum(p.node == n for p in self.placed.values()) for n in candidates}
            node = min(candidates, key=lambda n: (load[n], n))
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
        deadline = time.monotonic() + NAME_FREE_WAIT_S
        while True:
            try:
                handle = self._actor().options(**options).remote(*args)
                break
            except ValueError:  # the name of an actor just killed is not free yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.placed[fragment] = Placed(handle, node, tried=set(avoid), pending=handle.status.remote())
        resource = None if node else FRAGMENT_RESOURCE.format(fragment)
        where = f"node {node[:8]}" if node else f"resource {resource}"
        self.log.info(E.RAY_ACTOR_STARTED, fragment=fragment, name=name, node=node, resource=resource,
                      endpoint=self.endpoint)  # fmt: skip
        self.say(f"ray: started agent {fragment} as actor {name} on {where}")
        return True

    def kill_actor(self, fragment: int) -> int | None:
        """SIGKILL the fragment's actor process (fault injection); Ray restarts it. Its last pid."""
        placed = self.placed[fragment]
        if placed.pid is None:  # its first status has not been read yet: the record names the pid
            self._poll(fragment, placed, wait_s=RAY_WAIT_S, supervise=False)
        self.ray.kill(placed.handle, no_restart=False)
        self.log.warning(E.RAY_ACTOR_KILLED, fragment=fragment, pid=placed.pid)
        return placed.pid

    # ---- supervision -----------------------------------------------------------------------

    def tick(self, committed: set[int]) -> set[int]:
        """Check membership and actors (at most once per TICK_S); the fragments lost for good."""
        now = time.monotonic()
        if now < self._next_tick:
            return self.lost
        self._next_tick = now + TICK_S
        nodes = self.alive_nodes()
        joined = {n: info for n, info in nodes.items() if n not in self.servable}
        if joined:  # a node that joined since: what can it serve?
            self._discover_nodes(joined)
        for i, placed in list(self.placed.items()):
            if i in committed or i in self.lost:
                continue
            if placed.node is not None and placed.node not in nodes:
                self._orphaned(i, placed, now, f"its node {placed.node[:8]} is gone", node=placed.node)
            elif placed.node is None and not [n for n in self._resource_nodes(i, nodes) if n not in placed.tried]:
                self._orphaned(i, placed, now, f"no alive node has {FRAGMENT_RESOURCE.format(i)}")
            else:
                if placed.orphaned_since is not None:
                    placed.orphaned_since = None
                    self.log.info(E.RAY_NODE_REJOINED, fragment=i)
                self._poll(i, placed)
        return self.lost

    def _orphaned(self, fragment: int, placed: Placed, now: float, why: str, **where: Any) -> None:
        """No alive node for the fragment's actor: move it now if another node can serve it, else
        give a node `rejoin_grace_s` to come back (a restarted pod, a rebooted host), then lose it."""
        if placed.orphaned_since is None:
            placed.orphaned_since = now
            self.log.warning(E.RAY_NODE_LOST, fragment=fragment, reason=why, grace_s=self.rejoin_grace_s, **where)
            if placed.node is not None and self._create(fragment, placed.tried | {placed.node}, dry_run=True):
                self._move(fragment, placed, why)
                return
            self.say(f"[yellow]ray: agent {fragment}: {why}; waiting up to {self.rejoin_grace_s:g} s for a node[/]")
        elif now - placed.orphaned_since >= self.rejoin_grace_s:
            self._move(fragment, placed, f"{why} (for {self.rejoin_grace_s:g} s)")

    def _poll(self, fragment: int, placed: Placed, wait_s: float = 0.0, supervise: bool = True) -> None:
        if placed.pending is None:
            placed.pending = placed.handle.status.remote()
            return
        ready, _ = self.ray.wait([placed.pending], timeout=wait_s)
        if not ready:
            return
        ref, placed.pending = placed.pending, None
        try:
            status = self.ray.get(ref)
        except Exception:  # the actor died with the call in flight: Ray is restarting it
            return
        if placed.pid is None:
            self.log.info(E.RAY_ACTOR_RUNNING, fragment=fragment, pid=status["pid"], node=status["node"])
        elif status["pid"] != placed.pid:
            moved = status["node"] != placed.ran_on
            self.log.warning(E.RAY_ACTOR_RESTARTED, fragment=fragment, old_pid=placed.pid, pid=status["pid"],
                             node=status["node"], moved=moved)  # fmt: skip
            where = f" on another node ({status['node'][:8]})" if moved else ""
            self.say(f"ray: agent {fragment}'s actor was restarted by Ray{where} (pid {placed.pid} -> {status['pid']})")
        placed.pid, placed.ran_on = status["pid"], status["node"]
        code = status["code"]
        if supervise and code is not None and not status["streaming"] and is_permanent_agent_exit(code):
            self.log.error(E.RAY_ACTOR_FAILED, fragment=fragment, code=code, node=placed.node)
            self._move(fragment, placed, f"its agent failed for good (exit {code})")

    def _move(self, fragment: int, placed: Placed, why: str) -> None:
        """Replace an actor that cannot deliver: on another node that can serve it, or nowhere."""
        try:
            self.ray.kill(placed.handle, no_restart=True)
        except Exception:  # already gone with its node
            pass
        failed_on = placed.node or placed.ran_on
        avoid = placed.tried | ({failed_on} if failed_on else set())
        if self._create(fragment, avoid):
            self.log.warning(E.RAY_TAKEOVER, fragment=fragment, reason=why, avoid=sorted(avoid))
            self.say(f"[yellow]ray: agent {fragment}: {why}; another node took it over[/]")
            return
        self.lost.add(fragment)
        self.log.error(E.RAY_FRAGMENT_LOST, fragment=fragment, reason=why)
        self.say(f"[red]ray: agent {fragment}: {why}, and no other alive node can serve it[/]")

    def _end(self, fragment: int, handle: Any) -> None:
        try:
            self.ray.kill(handle, no_restart=True)
        except Exception:  # its node is gone: so is it
            pass
        self.log.info(E.RAY_ACTOR_ENDED, fragment=fragment)

    def _await_gone(self) -> None:
        """ray.kill returns at once: wait (bounded) until no actor of this run holds its name."""
        prefix = actor_name(self.plan.run_id, 0).rpartition("-")[0] + "-"
        deadline = time.monotonic() + NAME_FREE_WAIT_S
        while time.monotonic() < deadline:
            names = self.ray.util.list_named_actors()
            if not any(name.startswith(prefix) for name in names):
                return
            time.sleep(0.1)
        self.log.warning(E.RAY_ACTOR_ENDED, still_named=sorted(n for n in names if n.startswith(prefix)))

    def finish(self, keep: bool) -> None:
        """End the actors (or, with `keep`, leave them for `fragsim resume --ray`) and disconnect."""
        if not keep:
            for i, placed in self.placed.items():
                # Its last answer is part of the record: a restart after the last tick included.
                if placed.pending is None:
                    placed.pending = placed.handle.status.remote()
                self._poll(i, placed, wait_s=FINAL_STATUS_WAIT_S, supervise=False)
                self._end(i, placed.handle)
            self._await_gone()
        else:
            self.say(f"ray: the actors stay up for: fragsim resume {self.run.run_dir} --ray {self.address}")
        self.ray.shutdown()
        self.log.info(E.RAY_DISCONNECTED, actors_kept=keep)
