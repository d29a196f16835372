"""The agents registry stepped without sockets: identity, duplicate names, credit, bounded HELLO.

Each of these failed on the master before the registry existed (names were taken over silently,
credit was unbounded by slots, HELLO fields unbounded).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from bus.codec import Message, decode
from bus.schemas import MASTER_TO_AGENT
from master import state as sm
from test_limits_master import core_with_agent, msg, sent, submit

HELLO = {"name": "n", "slots": 1, "workloads": ["sleep"]}


def replies(core: Any) -> list[Message]:
    return sent(core)


def errors(core: Any) -> list[tuple[str, str]]:
    return [(m["code"], m["text"]) for m in sent(core) if m.command == "ERROR"]


def test_a_second_live_connection_cannot_take_a_connected_name() -> None:
    core = core_with_agent()
    core.agents.probe = lambda ident: True  # the first connection is still there
    core.on_agent(b"x", msg("HELLO", **HELLO, instance="i1"), 0.0, 1000.0)
    sent(core)
    core.on_agent(b"y", msg("HELLO", **HELLO, instance="i2"), 0.1, 1000.1)
    (code, text), = errors(core)
    assert code == "name_taken" and "already connected" in text
    assert core.agents.named("n").ident == b"x"  # type: ignore[union-attr]
    assert core.agents.get(b"y") is None


def test_the_same_process_on_a_new_connection_keeps_its_name_and_attempts() -> None:
    core = core_with_agent()
    core.agents.probe = lambda ident: True
    core.on_agent(b"x", msg("HELLO", **HELLO, instance="i1"), 0.0, 1000.0)
    core.on_agent(b"x", msg("CREDIT", n=1), 0.0, 1000.0)
    jobs = [submit(core, {"scenario": "sleep", "params": {"seconds": 9}}) for _ in range(5)]
    assert core.dispatch(0.0, 1000.0) == 5  # 4 to a1 (from core_with_agent), 1 to n
    sent(core)
    mine = [j for j in jobs if j.agent == "n"]
    assert len(mine) == 1
    running = [{"id": j.id, "attempt": j.attempt} for j in mine]
    core.on_agent(b"z", msg("HELLO", **HELLO, instance="i1", running=running), 1.0, 1001.0)
    assert [m.command for m in sent(core)][:2] == ["WELCOME", "DRAIN"]
    assert core.agents.named("n").ident == b"z"  # type: ignore[union-attr]
    for j in mine:
        assert j.state == sm.ASSIGNED and j.agent == "n"


def test_a_newcomer_takes_over_a_name_whose_connection_is_gone() -> None:
    core = core_with_agent()
    core.agents.probe = lambda ident: False  # a send to the old connection fails
    core.on_agent(b"x", msg("HELLO", **HELLO, instance="i1"), 0.0, 1000.0)
    core.on_agent(b"y", msg("HELLO", **HELLO, instance="i2"), 0.1, 1000.1)
    assert core.agents.named("n").ident == b"y"  # type: ignore[union-attr]
    assert not errors(core)


def test_an_agent_key_cannot_say_another_agents_name() -> None:
    core = core_with_agent()
    a2 = SimpleNamespace(role="agent", name="a2")
    core.on_agent(b"evil", msg("HELLO", name="a1", slots=1, running=[]), 0.5, 1000.5,
                  a2)  # type: ignore[arg-type]
    (code, text), = errors(core)
    assert code == "forbidden" and "'a2'" in text and "'a1'" in text
    assert core.agents.named("a1").ident == b"a1/0001"  # type: ignore[union-attr]


def test_credit_never_exceeds_free_slots_and_the_excess_is_counted() -> None:
    core = core_with_agent()  # a1: 4 slots, 4 credit
    core.on_agent(b"one", msg("HELLO", name="one", slots=1, workloads=["sleep"]), 0.0, 1000.0)
    for _ in range(50):
        core.on_agent(b"one", msg("CREDIT", n=4), 0.0, 1000.0)
    conn = core.agents.named("one")
    assert conn is not None and conn.credit == 1
    assert core.metrics.credit_capped._value.get() == 199
    for _ in range(20):
        submit(core, {"scenario": "sleep", "params": {"seconds": 9}})
    core.dispatch(0.0, 1000.0)
    assert len(conn.jobs) == 1 and conn.credit == 0
    core.on_agent(b"one", msg("CREDIT", n=1), 0.0, 1000.0)
    assert conn.credit == 0  # still holding its one job: no room


@pytest.mark.parametrize(("field", "value"), [
    ("encoders", [f"enc{i:026d}" for i in range(30_000)]),
    ("encoders", ["x" * 65]),
    ("workloads", ["sleep\n"]),
    ("name", "a1\nforged log line"),
    ("name", "x" * 65),
    ("version", "v" * 65),
    ("resources", {f"r{i}": 1 for i in range(33)}),
    ("slots", 5000),
])
def test_hello_fields_are_bounded(field: str, value: Any) -> None:
    core = core_with_agent()
    core.on_agent(b"big", msg("HELLO", **{**HELLO, field: value}), 0.0, 1000.0)
    (code, text), = errors(core)
    assert code == "bad_body" and f"HELLO.{field}" in text
    assert core.agents.get(b"big") is None and core.agents.named(str(value)) is None


def test_a_refused_hello_leaves_no_record_and_no_event() -> None:
    core = core_with_agent()
    core.on_agent(b"big", msg("HELLO", **{**HELLO, "encoders": ["x" * 99]}), 0.0, 1000.0)
    batch, outbox, events = core.take_output()
    assert not batch.agents and not events
    assert [decode(f, MASTER_TO_AGENT).command for _, _, f in outbox] == ["ERROR"]


def test_an_agent_with_a_key_is_named_after_it_by_default() -> None:
    import socket

    from agent.cli import default_name

    assert default_name("/keys/private/gpu-7.key_secret") == "gpu-7"
    assert default_name(None) == socket.gethostname()


# ---- from the adversarial review of this change (each failed before its fix) ---------------


def test_an_agents_done_extra_cannot_replace_what_the_master_keeps() -> None:
    core = core_with_agent()
    job = submit(core, {"scenario": "sleep", "params": {"seconds": 1}})
    core.dispatch(0.0, 1000.0)
    core.on_agent(b"a1/0001", msg("DONE", id=job.id, attempt=1, status="failed",
                                  reason="exit_code", extra={"requires": {}, "note": 1}),
                  1.0, 1001.0)
    batch, _, _ = core.take_output()
    stored = batch.updates[job.id]["extra"]
    assert stored["requires"] == "workload:sleep" and stored["note"] == 1
    # And a stored value that is not a requirement string never reaches the scheduler.
    core.recover([{"id": 99, "scenario": "sleep", "spec": {}, "state": sm.QUEUED, "priority": 1,
                   "attempt": 0, "max_attempts": 3, "extra": {"requires": {}}}], [], 2.0, 1002.0)
    assert core.jobs.get(99).requires == "workload:sleep"  # type: ignore[union-attr]


def test_a_connection_cannot_rename_itself() -> None:
    core = core_with_agent()
    core.on_agent(b"a1/0001", msg("HELLO", name="z1", slots=4), 1.0, 1001.0)
    (code, _), = errors(core)
    assert code == "conflict"
    assert core.agents.named("z1") is None and core.agents.named("a1") is not None


def test_name_taken_does_not_reveal_the_holders_instance() -> None:
    core = core_with_agent()
    core.agents.probe = lambda ident: True
    core.on_agent(b"x", msg("HELLO", **HELLO, instance="secret123"), 0.0, 1000.0)
    sent(core)
    core.on_agent(b"y", msg("HELLO", **HELLO, instance="guess"), 0.1, 1000.1)
    (code, text), = errors(core)
    assert code == "name_taken" and "secret123" not in text


def test_hello_cannot_report_more_running_attempts_than_slots() -> None:
    core = core_with_agent()
    running = [{"id": 10**9 + i, "attempt": 1} for i in range(5000)]
    core.on_agent(b"r", msg("HELLO", name="r", slots=2, running=running), 0.0, 1000.0)
    out = sent(core)
    assert [m.command for m in out] == ["ERROR"] and "HELLO.running" in out[0]["text"]


def test_long_reasons_and_nan_figures_are_refused_not_stored() -> None:
    core = core_with_agent()
    job = submit(core, {"scenario": "sleep", "params": {"seconds": 1}})
    core.dispatch(0.0, 1000.0)
    sent(core)
    core.on_agent(b"a1/0001", msg("PROGRESS", id=job.id, attempt=1, fps=float("nan")), 1, 1001)
    core.on_agent(b"a1/0001", msg("DONE", id=job.id, attempt=1, status="failed",
                                  reason="x" * 5000), 2.0, 1002.0)
    codes = errors(core)
    assert [c for c, _ in codes] == ["bad_body", "bad_body"] and "reason" in codes[1][1]
    batch, _, _ = core.take_output()
    assert all(len(e["reason"] or "") <= 200 for e in batch.events)


def test_huge_arrays_are_refused_before_they_cost_anything() -> None:
    import msgpack

    from bus.codec import HEADER
    from bus.errors import ProtocolError
    from bus.schemas import CLIENT_TO_MASTER

    body = msgpack.packb({"rid": 1, "x": [[]] * 1_000_000})
    with pytest.raises(ProtocolError) as e:
        decode([HEADER, b"STATS", body], CLIENT_TO_MASTER)
    assert e.value.code == "bad_body"
