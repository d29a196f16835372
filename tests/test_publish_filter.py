"""The master publishes a topic only while someone subscribes to it (issue 14).

The events socket is an XPUB: it reports every prefix subscribers take, and the master encodes
and sends nothing for a topic no prefix matches (a job's `STATE`, the turn's `EVENTS`, `stats`).
Subscribers see exactly what a plain PUB gave them.
"""

from __future__ import annotations

import re
from pathlib import Path

import msgpack
import zmq

from bus.sockets import Subscriptions, connect_sub
from conftest import wait_for
from harness import Cluster

NOOP = {"scenario": "noop"}


def test_subscriptions_mirror_what_an_xpub_reports() -> None:
    subs = Subscriptions()
    assert not subs.wants(b"job.1.state") and not subs.wants(b"events")
    subs.update(b"\x01job.1.")
    assert subs.wants(b"job.1.state") and subs.wants(b"job.1.progress")
    assert not subs.wants(b"job.12.state") and not subs.wants(b"job.")
    subs.update(b"\x01events")
    subs.update(b"\x01events")  # a repeat changes nothing
    assert subs.wants(b"events") and len(subs) == 2
    subs.update(b"\x00job.1.")
    assert not subs.wants(b"job.1.state") and subs.wants(b"events")
    for junk in (b"", b"\x02job.", b"\x00never-subscribed", b"\xff"):
        subs.update(junk)  # whatever a subscriber sends: ignored
    assert len(subs) == 1
    assert not subs.touches(b"job.") and subs.touches(b"events")
    subs.update(b"\x01job.3")
    assert subs.touches(b"job.") and subs.wants(b"job.31.state")
    subs.update(b"\x01")  # the empty prefix: everything
    assert subs.wants(b"job.99.state") and subs.wants(b"stats")


def test_a_flood_of_prefixes_is_bounded_and_fails_open() -> None:
    subs = Subscriptions(most=100)
    for i in range(1000):
        subs.update(b"\x01x.%d" % i)
    assert len(subs) == 100 and subs.overflow
    assert subs.wants(b"anything")  # past the bound: publish everything, never too little


def _published(cluster: Cluster) -> float:
    text = cluster.scrape()
    got = re.search(r'^ffrtmp_bus_messages_total\{direction="out",socket="events"\} (\S+)$',
                    text, re.M)
    return float(got.group(1)) if got else 0.0


def test_only_subscribed_topics_are_published(tmp_path: Path, ctx: zmq.Context) -> None:
    cluster = Cluster(tmp_path, f"sqlite:///{tmp_path}/ffrtmp.db", metrics=True)
    try:
        cluster.start_master()
        cluster.start_agent("a1", slots=4)
        client = cluster.client
        first = client.submit([NOOP])[0]
        cluster.wait_terminal([first], 20)
        mine = first + 5  # a job of the next SUBMIT
        sub = connect_sub(ctx, cluster.events_ep, [f"job.{mine}.", "stats"])
        seen: list[str] = []
        stats = [0]

        def read() -> None:
            while sub.poll(0):
                topic, _, command, body = sub.recv_multipart()
                if topic == b"stats":
                    stats[0] += 1
                    continue
                assert topic == f"job.{mine}.state".encode() and command == b"STATE"
                seen.append(msgpack.unpackb(body)["state"])

        # Subscriptions reach the master asynchronously, in order: once `stats` comes (every
        # second), job {mine}'s subscription has arrived too.
        wait_for(lambda: read() or stats[0] > 0, 10, message="a stats event")
        before, stats[0] = _published(cluster), 0
        ids = client.submit([NOOP] * 20)
        assert mine in ids
        cluster.wait_terminal(ids, 30)
        wait_for(lambda: read() or "completed" in seen, 10, message=f"job {mine}'s events")
        assert seen == ["queued", "assigned", "completed"]
        # Nothing else has a subscriber (no `events`, `agent.`, other jobs): for 60 job events
        # the master sent those three messages and its stats (at most the ones we received).
        read()
        sent = _published(cluster) - before
        assert 3 <= sent <= 3 + stats[0] + 1, (sent, stats[0])  # +1: one may be in flight
        sub.close(linger=0)
    finally:
        cluster.close()


def test_the_table_agrees_with_a_brute_force_reading_after_any_updates() -> None:
    import random

    rng = random.Random(7)
    subs, held = Subscriptions(), set()
    pool = [b"", b"j", b"jo", b"job", b"job.", b"job.1", b"job.1.", b"job.12.", b"jobx", b"e",
            b"events", b"stats", b"agent."] + [b"q" * n for n in range(1, 60)]
    for _ in range(5000):
        prefix = rng.choice(pool)
        if rng.random() < 0.55:
            subs.update(b"\x01" + prefix)
            held.add(prefix)
        else:
            subs.update(b"\x00" + prefix)
            held.discard(prefix)
        topic = rng.choice([b"job.1.state", b"job.12.progress", b"events", b"stats", b"q" * 30])
        assert subs.wants(topic) == any(topic.startswith(p) for p in held)
        assert subs.touches(b"job.") == any(
            b"job.".startswith(p) or p.startswith(b"job.") for p in held)
    assert len(subs) == len(held)
