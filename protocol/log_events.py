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
AGENT_RETRY_HELLO = "agent.retry_hello"
AGENT_RETRY_CONNECT = "agent.retry_connect"  # no WELCOME yet: a new socket, a longer wait
AGENT_SOURCE_VERIFIED = "agent.source_verified"  # every piece of the local source hashed against the plan
AGENT_REJECTED = "agent.rejected"
AGENT_BAD_MESSAGE = "agent.bad_message"
AGENT_COMMITTED = "agent.committed"
AGENT_COORDINATOR_LOST = "agent.coordinator_lost"
AGENT_NO_WELCOME = "agent.no_welcome"
AGENT_SETUP_FAILED = "agent.setup_failed"
