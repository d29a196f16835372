"""In-process cluster: a real MasterCore and real AgentCores linked in memory, on a fake clock.

In the spirit of dramatiq's stub broker `join()`: protocol sequences (reconnect, fencing, DONE
kept until DONE_ACK, drain, cancel races, shutdown) run in milliseconds. Every message goes
through the real codec and schemas in both directions; processes are `FakeRun`s that end at a
given fake time (or when stopped), so nothing here touches the OS. The database is left out:
the master's write batches are dropped (its in-memory state is what the protocol acts on).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from agent.admission import Admission
from agent.core import AgentCore, Discard, Identity, Prepare, Reconnect, Start, Stop, Timing
from agent.kinds import Finished, Prepared, Ready, Refused
from agent.runner import Result
from bus import vocab
from bus.codec import decode, encode
from bus.schemas import AGENT_TO_MASTER, MASTER_TO_AGENT
from master.config import MasterConfig
from master.core import MasterCore
from master.metrics import MasterMetrics
from master.outbox import AGENT
from master.spec import validate_spec


class FakeRun:
    """A process that exits `seconds` after start with `code` (or when stopped)."""

    def __init__(self, seconds: float, code: int = 0, ignore_term: bool = False) -> None:
        self.seconds = seconds
        self.code = code
        self.ignore_term = ignore_term
        self.started = 0.0
        self.pid: int | None = None
        self.stopped: tuple[float, str] | None = None  # (kill_at, why)
        self.termed_at: float | None = None
        self.cleaned = False
        self.exited = False

    def start(self, now: float) -> None:
        self.started = now
        self.pid = 1

    def stop(self, now: float, grace_s: float, why: str = "cancel") -> None:
        if self.exited:
            return
        if self.stopped is None:
            self.stopped = (now + max(0.0, grace_s), why)
            self.termed_at = now

    def poll(self, now: float) -> Result | None:
        if self.exited:
            return None
        duration = round(now - self.started, 6)
        if self.stopped is not None:
            kill_at, why = self.stopped
            if not self.ignore_term or now >= kill_at:
                self.exited = True
                if why == "cancel":
                    forced = self.ignore_term
                    return Result(vocab.CANCELLED, vocab.CANCELLED_FORCED if forced
                                  else vocab.CANCELLED_GRACEFUL, -15, duration)
                if why == "timeout":
                    return Result(vocab.TIMED_OUT, vocab.TIMEOUT, -15, duration)
                return Result(vocab.FAILED, why, -15, duration)
        if now - self.started >= self.seconds:
            self.exited = True
            if self.code == 0:
                return Result(vocab.COMPLETED, None, 0, duration)
            return Result(vocab.FAILED, vocab.EXIT_CODE, self.code, duration)
        return None

    def progress(self) -> dict[str, Any]:
        return {"progress": 0.5, "bytes_in": 1, "bytes_out": 2}

    def kill_now(self) -> None:
        self.exited = True

    def cleanup(self) -> None:
        self.cleaned = True


def fake_prepare(spec: dict[str, Any], job_id: int, attempt: int) -> Prepared:
    """noop -> completed; sleep -> a FakeRun of params.seconds; `params.fail` -> exit code."""
    params = spec.get("params") or {}
    if spec.get("scenario") == vocab.NOOP:
        return Finished(Result(vocab.COMPLETED, None, 0, 0.0))
    if spec.get("scenario") == "burn":
        return Refused("burn not supported here")
    return Ready(FakeRun(float(params.get("seconds", 1.0)), int(params.get("fail", 0)),
                         bool(params.get("ignore_term"))))


@dataclass
class Node:
    """One agent core with its link to the master."""

    name: str
    core: AgentCore
    prepare: Callable[[dict[str, Any], int, int], Prepared]
    conn: int = 0  # connection number: the ident is NAME/conn
    up: bool = True  # False: the link drops everything both ways (a partition)
    alive: bool = True  # False: the process is gone (kill -9): no more ticks
    runs: dict[tuple[int, int], Any] = field(default_factory=dict)
    prepare_later: bool = False  # hold Prepare actions until release_prepares()
    pending_prepares: list[Prepare] = field(default_factory=list)

    @property
    def ident(self) -> bytes:
        return f"{self.name}/{self.conn}".encode()


class Cluster:
    """A master core and agent cores on one fake clock."""

    def __init__(self, heartbeat_s: float = 1.0, liveness: int = 3, seed: int = 1,
                 **master: Any) -> None:
        self.now = 0.0
        self.wall0 = 1_000_000.0
        self.cfg = MasterConfig(db_url="sqlite://", heartbeat_s=heartbeat_s, liveness=liveness,
                                **master)
        self.master = MasterCore(self.cfg, 1, MasterMetrics(CollectorRegistry()),
                                 random.Random(seed))
        self.nodes: dict[str, Node] = {}
        self.log: list[tuple[str, str, str, dict[str, Any]]] = []  # (dir, agent, cmd, body)
        self.master_down = False
        self._held: list[tuple[bytes, str, dict[str, Any]]] = []
        self.terminal: dict[int, str] = {}  # job id -> its terminal state (from the batches)
        self.events: list[dict[str, Any]] = []  # job_event rows of every committed batch

    @property
    def wall(self) -> float:
        return self.wall0 + self.now

    # ---- building -----------------------------------------------------------------------------

    def add_agent(self, name: str, slots: int = 2, stop_grace_s: float = 30.0,
                  prepare: Callable[[dict[str, Any], int, int], Prepared] = fake_prepare,
                  conn: int = 0) -> Node:
        me = Identity(name=name, instance=f"i-{name}-{conn}", version="test", slots=slots, cpus=8.0,
                      memory_mb=16384, workloads=tuple(vocab.WORKLOADS), cgroup="none",
                      limits="best-effort")
        timing = Timing(heartbeat_s=self.cfg.heartbeat_s, liveness=self.cfg.liveness,
                        stop_grace_s=stop_grace_s, kill_grace_s=1.0, ack_wait_s=1.0)
        core = AgentCore(me, Admission(800.0, 16384.0, disk_floor_mb=0.0), timing)
        core.observe_disk(100_000.0)
        node = Node(name, core, prepare, conn=conn)
        self.nodes[name] = node
        core.connected(self.now)
        self.pump()
        return node

    def submit(self, raw: dict[str, Any], priority: int | None = None) -> int:
        v = validate_spec({"max_attempts": 3, **raw})
        return self.master.jobs.create(v.spec, v.priority if priority is None else priority,
                                       v.requires, None, self.now, self.wall)

    def job(self, job_id: int) -> Any:
        return self.master.jobs.get(job_id)

    def state(self, job_id: int) -> str:
        """A live job's state, or its terminal state from the log of STATE transitions."""
        job = self.job(job_id)
        if job is not None:
            return str(job.state)
        return self.terminal.get(job_id, "unknown")

    # ---- moving messages ----------------------------------------------------------------------

    def _to_master(self, node: Node, command: str, body: dict[str, Any]) -> None:
        self.log.append(("a>m", node.name, command, body))
        if not node.up:
            return
        if self.master_down:  # queued by the agent's socket until the master is back
            self._held.append((node.ident, command, body))
            return
        msg = decode(encode(command, body), AGENT_TO_MASTER)
        self.master.on_agent(node.ident, msg, self.now, self.wall)

    def _master_turn(self) -> bool:
        """The master's end of turn: dispatch, acks, then deliver its messages."""
        if self.master_down:
            return False
        self.master.dispatch(self.now, self.wall)
        self.master.flush_acks()
        batch, messages, _events = self.master.take_output()
        for job_id, upd in batch.updates.items():
            state = upd.get("state")
            if state in vocab.TERMINAL:
                self.terminal[job_id] = state
        self.events += batch.events  # the audit trail the store would hold
        moved = bool(messages)
        for kind, ident, frames in messages:
            if kind != AGENT:
                continue
            name, _, conn = ident.decode().partition("/")
            node = self.nodes.get(name)
            if node is None or not node.alive or not node.up or str(node.conn) != conn:
                continue  # to a connection that is gone: dropped (ROUTER_MANDATORY aside)
            msg = decode(frames, MASTER_TO_AGENT)
            self.log.append(("m>a", name, msg.command, msg.body))
            node.core.message(msg, self.now)
        return moved

    def _agent_turn(self, node: Node) -> bool:
        moved = False
        while True:
            out, actions = node.core.take()
            if not out and not actions:
                return moved
            moved = True
            reconnect = False
            for action in actions:
                if isinstance(action, Reconnect):
                    reconnect = True
                else:
                    self._act(node, action)
            for command, body in out:
                self._to_master(node, command, body)
            if reconnect:
                node.conn += 1
                node.core.connected(self.now)

    def _act(self, node: Node, action: Any) -> None:
        if isinstance(action, Prepare):
            if node.prepare_later:
                node.pending_prepares.append(action)
                return
            node.core.prepared(action.id, action.attempt,
                               node.prepare(action.spec, action.id, action.attempt), self.now)
        elif isinstance(action, Start):
            action.run.start(self.now)
            node.runs[(action.id, action.attempt)] = action.run
        elif isinstance(action, Stop):
            action.run.stop(self.now, action.grace_s, action.why)
        elif isinstance(action, Discard) and action.run is not None:
            action.run.cleanup()

    def release_prepares(self) -> None:
        """Answer the Prepare actions held back (prepare_later)."""
        for node in self.nodes.values():
            pending, node.pending_prepares = node.pending_prepares, []
            for action in pending:
                node.core.prepared(action.id, action.attempt,
                                   node.prepare(action.spec, action.id, action.attempt),
                                   self.now)
        self.pump()

    def pump(self, limit: int = 1000) -> None:
        """Deliver messages back and forth at the current time until nothing moves."""
        for _ in range(limit):
            moved = False
            for node in self.nodes.values():
                if node.alive:
                    moved = self._agent_turn(node) or moved
            moved = self._master_turn() or moved
            if not moved:
                return
        raise AssertionError("messages kept flowing: a protocol loop")

    def tick(self) -> None:
        """One turn of every party at the current time."""
        for node in self.nodes.values():
            if not node.alive:
                continue
            for (job_id, attempt), run in list(node.runs.items()):
                result = run.poll(self.now)
                if result is not None:
                    del node.runs[(job_id, attempt)]
                    node.core.exited(job_id, attempt, result, self.now)
            if node.core.progress_due(self.now):
                for job_id, attempt, run in node.core.running():
                    node.core.progress(job_id, attempt, run.progress(), self.now)
            node.core.tick(self.now)
        if not self.master_down:
            self.master.tick(self.now, self.wall)
        self.pump()

    def advance(self, seconds: float, step: float = 0.05) -> None:
        """Move the clock forward in steps, ticking everyone at each."""
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.now = min(end, self.now + step)
            self.tick()

    def run_until(self, predicate: Callable[[], bool], max_s: float = 120.0,
                  step: float = 0.05) -> None:
        """Advance until predicate() holds; AssertionError after max_s of fake time."""
        end = self.now + max_s
        self.pump()
        while not predicate():
            if self.now >= end:
                raise AssertionError(f"not reached within {max_s}s of fake time")
            self.now += step
            self.tick()

    def run_until_idle(self, max_s: float = 300.0, step: float = 0.05) -> None:
        """Until the master holds no job that is not terminal."""
        self.run_until(lambda: len(self.master.jobs) == 0, max_s, step)

    # ---- faults -------------------------------------------------------------------------------

    def kill_agent(self, name: str) -> None:
        """kill -9: the process and its children are gone; nothing more is sent."""
        node = self.nodes[name]
        node.alive = False
        node.runs.clear()

    def restart_agent(self, name: str, **kw: Any) -> Node:
        """A new process under the same name (a fresh instance, nothing running)."""
        old = self.nodes.pop(name)
        return self.add_agent(name, slots=old.core.me.slots, conn=old.conn + 1, **kw)

    def master_up(self) -> None:
        """The master is back: what the agents' sockets queued arrives first."""
        self.master_down = False
        held, self._held = self._held, []
        for ident, command, body in held:
            self.master.on_agent(ident, decode(encode(command, body), AGENT_TO_MASTER),
                                 self.now, self.wall)
        self.pump()

    def cut(self, name: str) -> None:
        self.nodes[name].up = False

    def heal(self, name: str) -> None:
        self.nodes[name].up = True

    def transitions(self, job_id: int, to_state: str) -> list[dict[str, Any]]:
        """The job's audit-trail rows that entered `to_state`."""
        return [e for e in self.events if e["job_id"] == job_id and e["to_state"] == to_state]

    def sent(self, direction: str, command: str, name: str | None = None
             ) -> list[dict[str, Any]]:
        """Bodies of logged messages (a>m or m>a) of one command, optionally of one agent."""
        return [b for d, n, c, b in self.log
                if d == direction and c == command and (name is None or n == name)]
