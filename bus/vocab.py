"""The job vocabulary: states, sets, statuses, reasons, priorities, workloads, roles.

Part of the bus contract (docs/protocol.md "States and reasons"), defined once here and imported
by the master, storage, the agent, metrics, the CLI and the dashboard. Adding a state or a reason
touches this file plus the places that use the new value.
"""

from __future__ import annotations

# ---- job states -------------------------------------------------------------------------------
QUEUED = "queued"
ASSIGNED = "assigned"
RUNNING = "running"
CANCELLING = "cancelling"
COMPLETED = "completed"
FAILED = "failed"
TIMED_OUT = "timed_out"
CANCELLED = "cancelled"

STATES = (QUEUED, ASSIGNED, RUNNING, CANCELLING, COMPLETED, FAILED, TIMED_OUT, CANCELLED)
TERMINAL = frozenset({COMPLETED, FAILED, TIMED_OUT, CANCELLED})
LIVE = frozenset({ASSIGNED, RUNNING, CANCELLING})  # states with an assignment on an agent
OPEN = tuple(s for s in STATES if s not in TERMINAL)  # every non-terminal state, in order

# DONE.status values an agent may send: the terminal state its attempt reached.
STATUSES = frozenset({COMPLETED, FAILED, TIMED_OUT, CANCELLED})

# ---- reasons ----------------------------------------------------------------------------------
EXIT_CODE = "exit_code"
OOM_KILLED = "oom_killed"
TIMEOUT = "timeout"
STALLED = "stalled"
DISK_LIMIT = "disk_limit"
AGENT_LOST = "agent_lost"
CANCELLED_GRACEFUL = "cancelled_graceful"
CANCELLED_FORCED = "cancelled_forced"
INVALID_INPUT = "invalid_input"
REJECTED = "rejected"
SUBMITTED = "submitted"
RETRY = "retry"
FENCED = "fenced"
RESOURCES = "resources"
DRAINING = "draining"
SIGNAL = "signal"  # the workload was killed by a signal (extra.signal names it)
AGENT_SHUTDOWN = "agent_shutdown"  # the agent stopped cleanly and handed the attempt back
AGENT_ERROR = "agent_error"  # the agent failed preparing, starting or supervising the attempt
UNACKNOWLEDGED = "unacknowledged"  # an assignment the agent never answered (a JOB lost in transit)
OUTPUT_EXISTS = "output_exists"  # the output file exists and the spec says overwrite: false

# Why a job left a state (job reasons) and why an agent refused or stopped an attempt.
REASONS = frozenset({
    EXIT_CODE, OOM_KILLED, TIMEOUT, STALLED, DISK_LIMIT, AGENT_LOST, CANCELLED_GRACEFUL,
    CANCELLED_FORCED, INVALID_INPUT, REJECTED, SUBMITTED, RETRY, CANCELLED,
    FENCED, RESOURCES, DRAINING, SIGNAL, AGENT_SHUTDOWN,
    AGENT_ERROR, UNACKNOWLEDGED, OUTPUT_EXISTS,
})
# Failures that would only fail again: not retried.
NOT_RETRIED = frozenset({INVALID_INPUT, OOM_KILLED, DISK_LIMIT, OUTPUT_EXISTS})

# ---- priorities -------------------------------------------------------------------------------
PRIORITIES = {"high": 0, "normal": 1, "low": 2}  # name -> rank (lower is served first)
PRIORITY_NAMES = {v: k for k, v in PRIORITIES.items()}

# ---- workloads --------------------------------------------------------------------------------
NOOP = "noop"
SYNTHETIC = ("sleep", "burn", "hog")  # real child processes under the same limits machinery
WORKLOADS = (NOOP, *SYNTHETIC)

# ---- agents -----------------------------------------------------------------------------------
# An agent record's state (NODES `state`, the agents table).
NODE_ALIVE = "alive"
NODE_DRAINING = "draining"
NODE_LOST = "lost"
NODE_LEFT = "left"
NODE_STATES = (NODE_ALIVE, NODE_DRAINING, NODE_LOST, NODE_LEFT)

# ---- client roles (docs/protocol.md "Authorization") ------------------------------------------
ROLE_SUBMIT = "submit"
ROLE_OPERATE = "operate"
ROLES = (ROLE_SUBMIT, ROLE_OPERATE)
# What each role may ask; a request above the key's role gets ERROR forbidden.
ROLE_COMMANDS = {
    ROLE_SUBMIT: frozenset({"SUBMIT", "GET", "LIST", "EVENTS", "NODES", "STATS", "INFO"}),
    ROLE_OPERATE: frozenset({"SUBMIT", "GET", "LIST", "EVENTS", "NODES", "STATS", "INFO",
                             "CANCEL", "RETRY", "DRAIN"}),
}
