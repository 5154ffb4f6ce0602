"""Names of the events in the JSON logs: every writer and replay use these constants."""

# every process
PROCESS_START = "process.start"  # first line: versions, pid, plan digest, settings
PROCESS_EXIT = "process.exit"

# coordinator
RUN_PLAN = "run.plan"
RUN_SETTINGS = "run.settings"
CORE_STEP = "core.step"  # an event the core consumed and the decisions it made
RESTORE = "coordinator.restore"
QUARANTINE = "fragment.quarantined"
AGENT_WELCOMED = "agent.welcomed"
AGENT_DEAD = "agent.dead"
MESSAGE_REJECTED = "message.rejected"
SEND_DROPPED = "send.dropped"
ITEM_VERIFIED = "item.verified"  # an item read back while the rest of its fragment streamed
FRAGMENT_VERIFIED = "fragment.verified"
FRAGMENT_PROMOTED = "fragment.promoted"
PREFIX_ARRIVAL = "prefix.arrival"
CHECKPOINT_EVALUATED = "checkpoint.evaluated"
GAP_EVALUATED = "checkpoint.gaps_evaluated"  # --reassembly gaps: every arrived layer, holes skipped
RUN_FINISHED = "run.finished"
STORAGE_ERROR = "storage.error"
AUTH_DENIED = "auth.denied"
AUTH_HANDSHAKE_FAILED = "auth.handshake_failed"
FAULT_KILL_POINT = "fault.kill_point"
FAULT_KILLED = "fault.killed"
PEER_FORGET = "peer.forget"
PEER_BAN = "peer.ban"

# agent
AGENT_HELLO = "agent.hello"
AGENT_WELCOME = "agent.welcome"
AGENT_WANT = "agent.want"
AGENT_PACED = "agent.paced"  # --bandwidth: sends are paced to this uplink
AGENT_RETRY_HELLO = "agent.retry_hello"
AGENT_RETRY_CONNECT = "agent.retry_connect"  # no WELCOME yet: a new socket, a longer wait
AGENT_SOURCE_VERIFIED = "agent.source_verified"  # every piece of the local source hashed against the plan
AGENT_REJECTED = "agent.rejected"
AGENT_BAD_MESSAGE = "agent.bad_message"
AGENT_COMMITTED = "agent.committed"
AGENT_COORDINATOR_LOST = "agent.coordinator_lost"
AGENT_NO_WELCOME = "agent.no_welcome"
AGENT_SETUP_FAILED = "agent.setup_failed"
AGENT_READY = "agent.ready"  # --ready-file written: source verified and WELCOME received
AGENT_TERMINATED = "agent.terminated"  # stopped on request (SIGTERM, or a caller's stop event) after draining

# serve --ray (logs/ray.jsonl): Ray's placement, restarts and membership, as the launcher saw them
RAY_NODE_DISCOVERED = "ray.node_discovered"  # a node's bundles and source checked: what it can serve
RAY_NODE_REFUSED = "ray.node_refused"  # a node that could not run the discovery task
RAY_ACTOR_STARTED = "ray.actor_started"
RAY_ACTOR_RUNNING = "ray.actor_running"  # its first answer: pid and node
RAY_ACTOR_REATTACHED = "ray.actor_reattached"  # a restarted coordinator found a running actor by name
RAY_ACTOR_KILLED = "ray.actor_killed"  # fault injection: SIGKILL of the actor's process
RAY_ACTOR_RESTARTED = "ray.actor_restarted"  # Ray restarted an actor: a new pid
RAY_ACTOR_FAILED = "ray.actor_failed"  # its agent ended with a permanent exit status
RAY_NODE_LOST = "ray.node_lost"  # no alive node for a fragment's actor: moved, or a grace to rejoin
RAY_NODE_REJOINED = "ray.node_rejoined"  # a node that can serve it came back within the grace
RAY_TAKEOVER = "ray.takeover"  # another node that can serve the fragment took it over
RAY_FRAGMENT_LOST = "ray.fragment_lost"  # no alive node can serve it: the run ends with the longest prefix
RAY_ACTOR_ENDED = "ray.actor_ended"
RAY_DISCONNECTED = "ray.disconnected"
