"""The dashboard's bus side: one background thread that polls and follows the master.

The UI thread never waits on the bus: this thread owns its own Client and subscriptions and
hands plain data over a queue (`Feed.updates`), which the app drains on a timer. A master that
is down only makes this thread's requests time out; the UI shows it from the age of the last
update (tui/model.py `DashModel.down_for`) and keeps answering keys.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bus.client import Client, EventFollower, Subscriber
from bus.errors import ClientError
from bus.sockets import EndpointError
from bus.vocab import OPEN, RUNNING, TERMINAL
from tui.model import Filter

LIVE_LIMIT = 500  # non-terminal jobs polled per refresh (running first in the view)
RECENT_LIMIT = 100  # finished jobs polled per refresh
PROGRESS_TOPICS = 2000  # at most this many running jobs' progress topics subscribed
SIDE_BATCH = 1000  # side-subscription messages handled per loop turn

Update = tuple[str, Any]  # ("snapshot"|"events"|"progress"|"agent"|"heard"|"down", payload)


@dataclass(frozen=True)
class Snapshot:
    """One poll of the master."""

    stats: dict[str, Any]
    nodes: list[dict[str, Any]]
    live: list[dict[str, Any]]
    recent: list[dict[str, Any]]
    wall: float


def poll_filter(f: Filter) -> tuple[list[str], list[str], list[str] | None, str | None]:
    """(open states, terminal states, scenarios, agent) to ask LIST for the filter `f`."""
    states = f.states or frozenset(OPEN) | TERMINAL
    live = [s for s in OPEN if s in states]
    done = sorted(s for s in TERMINAL if s in states)
    return live, done, sorted(f.scenarios) or None, f.agent


class Feed(threading.Thread):
    """Polls STATS, NODES and LIST every `refresh_s` and follows events; see the module doc."""

    def __init__(self, make_client: Callable[[], Client], events_ep: str | None,
                 refresh_s: float = 1.0) -> None:
        """`events_ep` None: ask the master where it publishes (INFO), once it answers."""
        super().__init__(name="dash-feed", daemon=True)
        self.make_client = make_client
        self.events_ep = events_ep
        self.refresh_s = refresh_s
        self.updates: queue.SimpleQueue[Update] = queue.SimpleQueue()
        self.filter = Filter()  # set by the UI thread (one reference assignment)
        self.poll_now = threading.Event()
        self._stop = threading.Event()
        self._progress: set[int] = set()
        self._stats: dict[str, Any] | None = None  # the last `stats` event
        self._stats_at = 0.0
        self.error: BaseException | None = None  # a bug in this thread, shown by the UI

    def stop(self) -> None:
        """Ask the thread to end (it does within about one request timeout); never waits."""
        self._stop.set()
        self.poll_now.set()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # a bug here must show on the screen, not vanish
            self.error = e
            self.updates.put(("down", f"dashboard feed stopped: {type(e).__name__}: {e}"))

    def _run(self) -> None:
        client = self.make_client()
        try:
            while not self.events_ep:  # not given: the one the master announces (INFO)
                try:
                    self.events_ep = client.events_endpoint()
                except ClientError as e:
                    self.updates.put(("down", f"{e.code}: {e.text}"))
                    if self._stop.wait(self.refresh_s):
                        return
            side = Subscriber(["agent.", "stats"], self.events_ep, keys=client.keys)
            side_for = client.endpoint  # the master whose events `side` receives
        except BaseException:
            client.close()
            raise
        follower: EventFollower | None = None
        next_poll = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_poll or self.poll_now.is_set():
                    self.poll_now.clear()
                    self._poll(client, side)
                    next_poll = time.monotonic() + self.refresh_s
                    if client.endpoint != side_for:  # a failover: the new leader publishes
                        side_for = self._follow_leader(client, side, side_for)
                if follower is None:
                    follower = self._follow(client)
                    if follower is None:
                        self.poll_now.wait(self.refresh_s)
                        continue
                events = follower.poll(0.05)
                if events:
                    self.updates.put(("events", events))
                    self._track(side, events)
                self._side(side)
        finally:
            if follower is not None:
                follower.close()
            side.close()
            client.close()

    @staticmethod
    def _follow_leader(client: Client, side: Subscriber, was: str) -> str:
        """Also receive agent events and stats from the master the client moved to; returns
        the endpoint they come from now (unchanged if that master does not answer yet)."""
        try:
            side.connect(client.events_endpoint())
        except (ClientError, EndpointError):
            return was
        return client.endpoint

    def _follow(self, client: Client) -> EventFollower | None:
        assert self.events_ep is not None  # resolved before the loop
        try:
            return EventFollower(client, self.events_ep)
        except ClientError:
            return None  # master down: the poll says so; try again next turn

    def _poll(self, client: Client, side: Subscriber) -> None:
        f = self.filter
        try:
            # STATS from the `stats` topic (every second, no store read); asked only while none
            # came: the request also counts jobs by state in the store, O(table) at the master.
            fresh = self._stats is not None and time.monotonic() - self._stats_at < 2.5
            stats = dict(self._stats or {}) if fresh else client.stats()
            nodes = client.nodes()
            if f.job_id is not None:
                jobs, _ = client.get([f.job_id])
                live = [j for j in jobs if j["state"] not in TERMINAL]
                recent = [j for j in jobs if j["state"] in TERMINAL]
            else:
                open_states, done_states, scenarios, agent = poll_filter(f)
                live = client.list_jobs(open_states, LIVE_LIMIT, scenarios=scenarios,
                                        agent=agent) if open_states else []
                # Without a state filter: the newest jobs of any state, keeping the finished
                # ones. `state IN (terminal)` would sort every finished job in the store at
                # the master (77 ms at 40k jobs, each second), newest-first by id does not.
                recent = client.list_jobs(done_states if f.states else None, RECENT_LIMIT,
                                          scenarios=scenarios, agent=agent) if done_states else []
                recent = [j for j in recent if j["state"] in TERMINAL]
        except ClientError as e:
            self.updates.put(("down", f"{e.code}: {e.text}"))
            return
        self.updates.put(("snapshot", Snapshot(stats, nodes, live, recent, time.time())))
        running = {j["id"] for j in live if j["state"] == RUNNING}
        for job_id in self._progress - running:
            self._unwatch(side, job_id)
        for job_id in running - self._progress:
            self._watch(side, job_id)

    def _track(self, side: Subscriber, events: list[dict[str, Any]]) -> None:
        """Follow progress of jobs that start running; stop when they end."""
        for e in events:
            if e.get("state") == RUNNING:
                self._watch(side, e["id"])
            elif e.get("state") in TERMINAL:
                self._unwatch(side, e["id"])

    def _watch(self, side: Subscriber, job_id: int) -> None:
        if job_id not in self._progress and len(self._progress) < PROGRESS_TOPICS:
            self._progress.add(job_id)
            side.subscribe(f"job.{job_id}.progress")

    def _unwatch(self, side: Subscriber, job_id: int) -> None:
        if job_id in self._progress:
            self._progress.discard(job_id)
            side.unsubscribe(f"job.{job_id}.progress")

    def _side(self, side: Subscriber) -> None:
        """Agent events, the stats heartbeat (proof of life) and progress, without waiting."""
        progress: list[dict[str, Any]] = []
        heard = False
        for _ in range(SIDE_BATCH):
            item = side.recv(0)
            if item is None:
                break
            heard = True
            _, msg = item
            if msg.command == "PROGRESS":
                progress.append(msg.body)
            elif msg.command == "AGENT":
                self.updates.put(("agent", msg.body))
            elif msg.command == "STATS":
                self._stats, self._stats_at = msg.body, time.monotonic()
        if progress:
            self.updates.put(("progress", progress))
        if heard:
            self.updates.put(("heard", time.time()))
