"""The agents registry: the only writer of agent records (HELLO, identity, credit, drop, drain).

Identity (docs/protocol.md "Agent identity"): with CURVE an agent's name is its key's name; a
HELLO under another key's name is refused with ERROR forbidden. Without keys a name belongs to
one live connection: a second process claiming a connected name gets ERROR name_taken, while the
same process (same HELLO `instance`) on a new connection, or a newcomer whose predecessor's
connection is gone, takes the name over and reconciles its attempts.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from bus import vocab
from bus.codec import encode
from master.agents import AgentConn
from master.config import MasterConfig
from master.metrics import MasterMetrics
from master.outbox import AGENT, Outbox

log = logging.getLogger("ffrtmp.master")

if TYPE_CHECKING:
    from bus.security import Peer

MAX_SLOTS = 4096
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}")
# HELLO field -> (most items, longest item): what one agent may make the master keep.
LIST_LIMITS = {"workloads": (64, 64), "encoders": (512, 64)}
MAX_TEXT = {"version": 64, "instance": 64, "cgroup": 32, "limits": 32}
MAX_RESOURCES = 32
MAX_REPORTED = 10_000  # HELLO.running and HELLO.results entries
NAME_RULE = "1-64 characters of A-Z a-z 0-9 . _ : @ -, starting with a letter or digit"
_HEARTBEAT = encode("HEARTBEAT", {})  # the master's heartbeat, encoded once: frames never change


def check_hello(body: dict[str, Any]) -> str | None:
    """The first HELLO field out of bounds, as an ERROR text; None if all fit."""
    name = body["name"]
    if not NAME_RE.fullmatch(name):
        return f"HELLO.name: {NAME_RULE}"
    for key, most in MAX_TEXT.items():
        value = body.get(key, "")
        if not isinstance(value, str) or len(value) > most or not value.isprintable():
            return f"HELLO.{key}: a string of at most {most} printable characters"
    if not 0 <= body["slots"] <= MAX_SLOTS:
        return f"HELLO.slots: 0 to {MAX_SLOTS}"
    for key, (count, size) in LIST_LIMITS.items():
        items = body[key]
        if len(items) > count or not all(
                isinstance(i, str) and 0 < len(i) <= size and i.isprintable() for i in items):
            return f"HELLO.{key}: at most {count} names of 1-{size} printable characters"
    res = body["resources"]
    if len(res) > MAX_RESOURCES or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, int | float)
            and not isinstance(v, bool) and 0 <= v < 2**53 for k, v in res.items()):
        return f"HELLO.resources: at most {MAX_RESOURCES} names with numbers 0 to 2^53"
    for key in ("running", "results"):
        if len(body[key]) > MAX_REPORTED:
            return f"HELLO.{key}: at most {MAX_REPORTED} entries"
    return None


def _attempts(running: list[Any]) -> int:
    """How many distinct well-formed {id, attempt} entries HELLO.running holds."""
    return len({(r["id"], r["attempt"]) for r in running if isinstance(r, dict)
                and isinstance(r.get("id"), int) and isinstance(r.get("attempt"), int)})


class AgentRegistry:
    """Connected agents by connection and by name, plus the drained names.

    Nothing a loop turn does walks every connection: liveness keeps a deadline heap (one entry
    per connection, at the earliest time it may need a heartbeat or be dead; looked at again
    only then), and DONE_ACKs are sent for the connections that got a DONE this turn.
    """

    def __init__(self, cfg: MasterConfig, outbox: Outbox, metrics: MasterMetrics,
                 instance: str = "ffrtmp") -> None:
        self.cfg = cfg
        self.instance = instance  # the master process, named in WELCOME
        self.out = outbox
        self.metrics = metrics
        self._conns: dict[bytes, AgentConn] = {}
        self._by_name: dict[str, AgentConn] = {}
        self._drained: set[str] = set()
        # Is this connection still there? (the server tries a send; pure tests say no)
        self.probe: Callable[[bytes], bool] = lambda ident: False
        self._told: set[tuple[str, str]] = set()  # (name, instance) refusals already logged
        # (when, seq, conn): when the connection may next need a HEARTBEAT from us or be dead.
        # An entry is current if `when` is its connection's `wake`; others are skipped.
        self._wakes: list[tuple[float, int, AgentConn]] = []
        self._seq = itertools.count()
        self._acking: list[AgentConn] = []  # connections with acks for this turn's DONE_ACK
        self.visited = 0  # connections looked at by liveness and flush_acks so far (tests)

    # ---- reads ------------------------------------------------------------------------------

    def get(self, ident: bytes) -> AgentConn | None:
        """The connection with this identity, or None."""
        return self._conns.get(ident)

    def named(self, name: str) -> AgentConn | None:
        """The connected agent with this name, or None."""
        return self._by_name.get(name)

    def __iter__(self) -> Iterator[AgentConn]:
        return iter(list(self._conns.values()))

    def __len__(self) -> int:
        return len(self._conns)

    def totals(self) -> tuple[int, int]:
        """(slots, busy slots) over connected agents."""
        conns = self._conns.values()
        return sum(c.slots for c in conns), sum(len(c.jobs) for c in conns)

    def views(self, now: float) -> list[dict[str, Any]]:
        """NODES views of the connected agents."""
        return [c.node_view(now) for c in self._conns.values()]

    def ready(self) -> list[AgentConn]:
        """Connections with credit that are not draining, in arrival order."""
        return [c for c in self._conns.values() if c.credit > 0 and not c.draining]

    # ---- records ----------------------------------------------------------------------------

    def recover(self, rows: Iterable[dict[str, Any]]) -> None:
        """Restore which names are draining from stored agent records."""
        self._drained = {a["name"] for a in rows if a.get("state") == vocab.NODE_DRAINING}

    def _save(self, conn: AgentConn, wall: float, state: str) -> None:
        self.out.batch.agents[conn.name] = {
            "name": conn.name, "state": state, "slots": conn.slots, "info": conn.info,
            "first_seen": conn.first_seen_wall, "last_seen": wall}

    def _event(self, name: str, event: str) -> None:
        self.out.publish(f"agent.{name}", "AGENT", {"name": name, "event": event})

    def _refuse(self, ident: bytes, code: str, text: str, key: tuple[str, str]) -> None:
        self.out.send(AGENT, ident, "ERROR", {"code": code, "text": text})
        self.metrics.hellos_refused.labels(code).inc()
        if key not in self._told and len(self._told) < 10_000:
            self._told.add(key)
            log.warning("refused HELLO: %s", text)

    # ---- HELLO ------------------------------------------------------------------------------

    def hello(self, ident: bytes, body: dict[str, Any], peer: Peer | None, now: float,
              wall: float) -> AgentConn | None:
        """Register a connection; None (and an ERROR sent) if the HELLO is refused.

        The returned connection has no jobs yet: the caller reconciles `running`/`results`.
        """
        if (text := check_hello(body)) is not None:
            self.out.send(AGENT, ident, "ERROR", {"code": "bad_body", "text": text})
            self.metrics.hellos_refused.labels("bad_body").inc()
            return None
        name, instance = body["name"], body.get("instance", "")
        if _attempts(body["running"]) > body["slots"]:
            self.out.send(AGENT, ident, "ERROR", {"code": "bad_body", "text":
                          "HELLO.running: more attempts than slots"})
            self.metrics.hellos_refused.labels("bad_body").inc()
            return None
        current = self._conns.get(ident)
        if current is not None and current.name != name:
            self._refuse(ident, "conflict", f"this connection is agent {current.name!r}: a "
                         "connection's name never changes", (name, f"conn:{current.name}"))
            return None
        if peer is not None and peer.name != name:
            self._refuse(ident, "forbidden",
                         f"agent key {peer.name!r} may not act as agent {name!r} (an agent's "
                         "name is its key's name)", (name, f"key:{peer.name}"))
            return None
        old = self._by_name.get(name)
        if old is not None and old.ident != ident:
            same_process = bool(instance) and instance == old.instance
            if not same_process and self.probe(old.ident):
                self._refuse(ident, "name_taken",
                             f"agent name {name!r} is already connected from another "
                             "process; give this agent another --name",
                             (name, instance))
                return None
            self._conns.pop(old.ident, None)  # a stale connection of this name: replaced
        caps = frozenset([f"workload:{w}" for w in body["workloads"]]
                         + [f"encoder:{e}" for e in body["encoders"]]
                         # it holds jobs to their limits (cgroups), or runs them and says not
                         + (["limits"] if body["cgroup"] != "none"
                            or body["limits"] == "best-effort" else []))
        info = {k: body[k] for k in ("version", "resources", "workloads", "encoders",
                                     "cgroup", "limits")}
        conn = AgentConn(ident=ident, name=name, slots=body["slots"], caps=caps, info=info,
                         last_seen=now, last_sent=now, draining=name in self._drained,
                         first_seen_wall=old.first_seen_wall if old else wall,
                         instance=instance)
        self._conns[ident] = conn
        self._by_name[name] = conn
        self._arm(conn)
        self.out.send(AGENT, ident, "WELCOME", {"heartbeat_s": self.cfg.heartbeat_s,
                                                "liveness": self.cfg.liveness,
                                                "master": self.instance})
        # Either way: an agent that was away may have missed a DRAIN on or off.
        self.out.send(AGENT, ident, "DRAIN", {"on": conn.draining})
        self._save(conn, wall, vocab.NODE_DRAINING if conn.draining else vocab.NODE_ALIVE)
        self._event(name, "joined")
        self.metrics.agent_joins.inc()
        return conn

    # ---- credit, jobs, acks -----------------------------------------------------------------

    def credit(self, conn: AgentConn, n: int) -> None:
        """Grant credit, never beyond the agent's free slots (the excess is counted, not kept)."""
        if n <= 0 or n > MAX_SLOTS:
            self.out.send(AGENT, conn.ident, "ERROR",
                          {"code": "bad_body", "text": f"CREDIT.n: 1 to {MAX_SLOTS}"})
            return
        room = max(0, conn.slots - len(conn.jobs) - conn.credit)
        if n > room:
            self.metrics.credit_capped.inc(n - room)
            n = room
        conn.credit += n

    def sync_credit(self, conn: AgentConn, n: int) -> None:
        """A HEARTBEAT says the agent has granted n credits it has not been sent JOBs for: a
        CREDIT lost in transit is made good (up only, and never beyond the free slots, so a
        JOB still in flight can at most be followed by one the agent still has room for)."""
        room = max(0, conn.slots - len(conn.jobs))
        n = min(max(0, n), room)
        if n > conn.credit:
            conn.credit = n

    def took(self, conn: AgentConn, job_id: int, now: float) -> None:
        """A JOB went to this connection: it holds the job and spent one credit."""
        conn.jobs.add(job_id)
        conn.credit -= 1
        conn.last_sent = now
        if now + self.cfg.heartbeat_s < conn.wake:  # only a clock going back: look again sooner
            self._arm(conn)

    def hold(self, conn: AgentConn, job_id: int) -> None:
        """The agent still runs this attempt (HELLO reconciliation)."""
        conn.jobs.add(job_id)

    def release(self, job_id: int, name: str) -> None:
        """The job's assignment on agent `name` ended."""
        conn = self._by_name.get(name)
        if conn is not None:
            conn.jobs.discard(job_id)

    def ack(self, conn: AgentConn, job_id: int, attempt: int) -> None:
        """A DONE to acknowledge in this turn's DONE_ACK."""
        if not conn.acks:
            self._acking.append(conn)
        conn.acks.append([job_id, attempt])

    def flush_acks(self) -> None:
        """One DONE_ACK per agent per turn, for the agents that sent a DONE this turn only (a
        connection dropped meanwhile is gone: its acks go nowhere, as they never did)."""
        if not self._acking:
            return
        acking, self._acking = self._acking, []
        self.visited += len(acking)
        for conn in acking:
            if conn.acks and self._conns.get(conn.ident) is conn:
                self.out.send(AGENT, conn.ident, "DONE_ACK", {"acks": conn.acks})
            conn.acks = []

    # ---- liveness, drop, drain --------------------------------------------------------------

    def seen(self, conn: AgentConn, now: float) -> None:
        """Any message counts as a heartbeat."""
        conn.last_seen = now
        if now + self.cfg.dead_after_s < conn.wake:  # only a clock going back: look sooner
            self._arm(conn)

    def seen_all(self, now: float) -> None:
        """Our own silence (a stalled commit) is not the agents' death."""
        for conn in self._conns.values():
            conn.last_seen = now

    def _arm(self, conn: AgentConn) -> None:
        """(Re)schedule a look at this connection: the earliest time it may be dead or need a
        heartbeat. Its times only move forward, so an entry is never late, at worst early."""
        when = min(conn.last_seen + self.cfg.dead_after_s, conn.last_sent + self.cfg.heartbeat_s)
        if when < conn.wake:
            conn.wake = when
            heapq.heappush(self._wakes, (when, next(self._seq), conn))

    def liveness(self, now: float) -> list[AgentConn]:
        """Send due heartbeats; return the connections silent past dead_after_s.

        Only the connections whose deadline has come are looked at (each is looked at about
        once per heartbeat interval, whatever the number of messages or turns); the verdict is
        the one a walk over every connection at `now` would give.
        """
        dead: list[AgentConn] = []
        wakes = self._wakes
        if not wakes or wakes[0][0] > now:
            return dead
        again = []
        dead_after, every = self.cfg.dead_after_s, self.cfg.heartbeat_s
        while wakes and wakes[0][0] <= now:
            when, _, conn = heapq.heappop(wakes)
            if when != conn.wake or self._conns.get(conn.ident) is not conn:
                continue  # replaced by an earlier entry, or the connection is gone
            self.visited += 1
            conn.wake = float("inf")
            if now - conn.last_seen > dead_after:
                log.warning("agent %s silent for %.1fs: lost", conn.name,
                            now - conn.last_seen)
                dead.append(conn)
                continue
            if now - conn.last_sent >= every:
                conn.last_sent = now
                self.out.send_frames(AGENT, conn.ident, _HEARTBEAT)
            again.append(conn)
        for conn in again:  # after the loop: a connection due at `now` again waits a turn
            self._arm(conn)
        return dead

    def drop(self, conn: AgentConn, wall: float, lost: bool) -> list[int]:
        """Forget a connection (lost, or left with BYE); returns the job ids it held."""
        if self._conns.get(conn.ident) is not conn:
            return []
        del self._conns[conn.ident]
        conn.wake = float("inf")  # its heap entry is stale now
        if self._by_name.get(conn.name) is conn:
            del self._by_name[conn.name]
        held = sorted(conn.jobs)
        conn.jobs.clear()
        event = vocab.NODE_LOST if lost else vocab.NODE_LEFT
        self._save(conn, wall, event)
        self._event(conn.name, event)
        if lost:
            self.metrics.agents_lost.inc()
        return held

    def drain(self, name: str, on: bool, stored: dict[str, Any] | None, wall: float) -> bool:
        """Drain (or resume) an agent by name; False if it is neither connected nor stored."""
        conn = self._by_name.get(name)
        if conn is None and stored is None:
            return False
        if on:
            self._drained.add(name)
        else:
            self._drained.discard(name)
        if conn is not None:
            conn.draining = on
            self.out.send(AGENT, conn.ident, "DRAIN", {"on": on})
            self._save(conn, wall, vocab.NODE_DRAINING if on else vocab.NODE_ALIVE)
        else:
            assert stored is not None
            self.out.batch.agents[name] = {**stored, "state": vocab.NODE_DRAINING if on
                                           else vocab.NODE_LOST}
        self._event(name, "draining" if on else "resumed")
        return True
