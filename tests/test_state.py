"""The job state machine (master/state.py): table rows, retries, backoff, and a stateful model."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from master import state as sm
from master.state import (
    ACCEPT,
    ASSIGN,
    ASSIGNED,
    CANCEL,
    CANCEL_DONE,
    CANCELLED,
    CANCELLING,
    COMPLETE,
    COMPLETED,
    FAIL,
    FAILED,
    HAND_BACK,
    LIVE,
    LOST,
    NOT_RETRIED,
    QUEUED,
    REJECT,
    RUNNING,
    STATES,
    TABLE,
    TERMINAL,
    TIME_OUT,
    TIMED_OUT,
    Core,
    IllegalTransition,
    Outcome,
    attempts_left,
    backoff_s,
    transition,
)

EVENTS = (ASSIGN, ACCEPT, COMPLETE, FAIL, TIME_OUT, CANCEL_DONE, CANCEL, LOST, REJECT, HAND_BACK)
RETRY = "retry"  # in EXPECTED: back to queued when attempts are left, else the named final state

# The table as docs/protocol.md describes it, written out independently of master/state.py.
EXPECTED: dict[tuple[str, str], str | tuple[str, str]] = {
    (QUEUED, ASSIGN): ASSIGNED,
    (QUEUED, CANCEL): CANCELLED,
    (ASSIGNED, ACCEPT): RUNNING,
    (ASSIGNED, REJECT): QUEUED,
    (ASSIGNED, COMPLETE): COMPLETED,
    (ASSIGNED, FAIL): (RETRY, FAILED),
    (ASSIGNED, LOST): (RETRY, FAILED),
    (ASSIGNED, TIME_OUT): (RETRY, TIMED_OUT),  # retried only with the spec's retry_timeouts
    (ASSIGNED, CANCEL_DONE): CANCELLED,
    (ASSIGNED, CANCEL): CANCELLING,
    (RUNNING, ACCEPT): RUNNING,
    (RUNNING, COMPLETE): COMPLETED,
    (RUNNING, FAIL): (RETRY, FAILED),
    (RUNNING, LOST): (RETRY, FAILED),
    (RUNNING, TIME_OUT): (RETRY, TIMED_OUT),
    (RUNNING, CANCEL_DONE): CANCELLED,
    (RUNNING, CANCEL): CANCELLING,
    (CANCELLING, ACCEPT): CANCELLING,
    (CANCELLING, CANCEL): CANCELLING,
    (CANCELLING, REJECT): CANCELLED,
    (CANCELLING, COMPLETE): COMPLETED,
    (CANCELLING, FAIL): CANCELLED,
    (CANCELLING, TIME_OUT): CANCELLED,
    (CANCELLING, CANCEL_DONE): CANCELLED,
    (CANCELLING, LOST): CANCELLED,
    # An agent stopping cleanly gives the attempt back (REJECT agent_shutdown), not charged.
    (ASSIGNED, HAND_BACK): QUEUED,
    (RUNNING, HAND_BACK): QUEUED,
    (CANCELLING, HAND_BACK): CANCELLED,
}
ALL_PAIRS = [(s, e) for s in STATES for e in EVENTS]
ILLEGAL = [p for p in ALL_PAIRS if p not in EXPECTED]
PLAIN_ROWS = [(k, v) for k, v in EXPECTED.items() if isinstance(v, str)]
RETRY_ROWS = [k for k, v in EXPECTED.items() if not isinstance(v, str)]

REASONS = (None, "exit_code", "stalled", "agent_lost", "timeout", *sorted(NOT_RETRIED))
DONE_STATUS = {
    "completed": COMPLETE,
    "failed": FAIL,
    "timed_out": TIME_OUT,
    "cancelled": CANCEL_DONE,
}


# --------------------------------------------------------------------------- the table as data


def test_constants() -> None:
    assert set(STATES) == {
        QUEUED,
        ASSIGNED,
        RUNNING,
        CANCELLING,
        COMPLETED,
        FAILED,
        TIMED_OUT,
        CANCELLED,
    }
    assert {COMPLETED, FAILED, TIMED_OUT, CANCELLED} == TERMINAL
    assert {ASSIGNED, RUNNING, CANCELLING} == LIVE
    assert not TERMINAL & LIVE
    assert {"invalid_input", "oom_killed", "disk_limit", "output_exists"} == NOT_RETRIED


def test_table_matches_the_documented_table() -> None:
    assert set(TABLE) == set(EXPECTED)
    for key, target in EXPECTED.items():
        if isinstance(target, str):
            assert TABLE[key] == target, key
        else:
            assert isinstance(TABLE[key], tuple) and TABLE[key][1] == target[1], key


def test_no_row_leaves_a_terminal_state() -> None:
    assert not [key for key in TABLE if key[0] in TERMINAL]


@pytest.mark.parametrize(
    ("key", "target"), PLAIN_ROWS, ids=[f"{s}-{e}" for (s, e), _ in PLAIN_ROWS]
)
def test_plain_row(key: tuple[str, str], target: str) -> None:
    state, event = key
    core = Core(state, attempt=0 if state == QUEUED else 2, max_attempts=3, rejects=0)
    out = transition(core, event, "exit_code")
    assert isinstance(out, Outcome)
    assert out.core.state == target
    assert out.retry is False
    assert out.core.max_attempts == 3
    assert out.core.attempt == core.attempt + (1 if event == ASSIGN else 0)
    assert out.core.rejects == core.rejects + (1 if event in (REJECT, HAND_BACK) else 0)
    assert core.state == state  # the input core is not mutated (frozen)


def _final(key: tuple[str, str]) -> str:
    target = EXPECTED[key]
    assert isinstance(target, tuple)
    return target[1]


@pytest.mark.parametrize("key", RETRY_ROWS, ids=[f"{s}-{e}" for s, e in RETRY_ROWS])
def test_retry_row_with_attempts_left(key: tuple[str, str]) -> None:
    state, event = key
    out = transition(Core(state, 1, 3, retry_timeouts=True), event, "exit_code")
    assert out == Outcome(Core(QUEUED, 1, 3, 0, True), retry=True)


@pytest.mark.parametrize("key", RETRY_ROWS, ids=[f"{s}-{e}" for s, e in RETRY_ROWS])
def test_retry_row_without_attempts_left(key: tuple[str, str]) -> None:
    state, event = key
    out = transition(Core(state, 3, 3, retry_timeouts=True), event, "exit_code")
    assert out == Outcome(Core(_final(key), 3, 3, 0, True), retry=False)


@pytest.mark.parametrize("reason", sorted(NOT_RETRIED))
@pytest.mark.parametrize("key", RETRY_ROWS, ids=[f"{s}-{e}" for s, e in RETRY_ROWS])
def test_retry_row_with_a_reason_that_is_not_retried(key: tuple[str, str], reason: str) -> None:
    state, event = key
    out = transition(Core(state, 1, 100, retry_timeouts=True), event, reason)
    assert out == Outcome(Core(_final(key), 1, 100, 0, True), retry=False)


@pytest.mark.parametrize("state", [ASSIGNED, RUNNING])
def test_a_timeout_is_retried_only_when_the_spec_asks(state: str) -> None:
    assert transition(Core(state, 1, 3), TIME_OUT, "timeout") == Outcome(
        Core(TIMED_OUT, 1, 3, 0), retry=False)
    assert transition(Core(state, 1, 3, retry_timeouts=True), TIME_OUT, "timeout") == Outcome(
        Core(QUEUED, 1, 3, 0, True), retry=True)


def test_retry_without_a_reason_is_retried() -> None:
    assert transition(Core(RUNNING, 1, 2), FAIL).retry is True


def test_rejected_attempts_are_not_charged() -> None:
    # Attempt 3 is the third assignment but only the first charged one: two were rejected.
    core = Core(RUNNING, attempt=3, max_attempts=2, rejects=2)
    assert attempts_left(core) == 1
    assert transition(core, FAIL, "exit_code") == Outcome(Core(QUEUED, 3, 2, 2), retry=True)


def test_reject_requeues_without_charging() -> None:
    out = transition(Core(ASSIGNED, attempt=1, max_attempts=1), REJECT, "rejected")
    assert out == Outcome(Core(QUEUED, 1, 1, 1), retry=False)
    assert attempts_left(out.core) == 1
    again = transition(out.core, ASSIGN)
    assert again.core == Core(ASSIGNED, 2, 1, 1)


@pytest.mark.parametrize(("state", "event"), ILLEGAL, ids=[f"{s}-{e}" for s, e in ILLEGAL])
def test_illegal_pairs_raise(state: str, event: str) -> None:
    with pytest.raises(IllegalTransition):
        transition(Core(state, attempt=1, max_attempts=3), event, "exit_code")


def test_unknown_input_raises() -> None:
    with pytest.raises(IllegalTransition):
        transition(Core(QUEUED, 0, 3), "explode")


def test_attempts_left() -> None:
    assert attempts_left(Core(QUEUED, 0, 3)) == 3
    assert attempts_left(Core(RUNNING, 1, 3)) == 2
    assert attempts_left(Core(RUNNING, 3, 3)) == 0
    assert attempts_left(Core(RUNNING, 5, 3, rejects=4)) == 2


def test_full_retry_cycle_uses_exactly_max_attempts() -> None:
    core = Core(QUEUED, 0, 3)
    for attempt in (1, 2, 3):
        core = transition(core, ASSIGN).core
        core = transition(core, ACCEPT).core
        assert core == Core(RUNNING, attempt, 3)
        out = transition(core, FAIL, "exit_code")
        core = out.core
        assert out.retry is (attempt < 3)
    assert core == Core(FAILED, 3, 3)


# --------------------------------------------------------------------------- backoff


@pytest.mark.parametrize(
    ("attempt", "nominal"),
    [(0, 1.0), (1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, 60.0), (50, 60.0)],
)
def test_backoff_nominal_values(attempt: int, nominal: float) -> None:
    rng = random.Random(7)
    samples = [backoff_s(attempt, rng) for _ in range(200)]
    assert all(0.75 * nominal <= s <= 1.25 * nominal for s in samples)
    assert max(samples) - min(samples) > 0.25 * nominal  # jitter is really applied


@given(
    attempt=st.integers(1, 5000),
    seed=st.integers(0, 2**32),
    base=st.floats(0.01, 10.0),
    cap=st.floats(0.1, 600.0),
)
def test_backoff_bounds(attempt: int, seed: int, base: float, cap: float) -> None:
    delay = backoff_s(attempt, random.Random(seed), base=base, cap=cap)
    nominal = cap if attempt > 200 else min(cap, base * 2 ** (attempt - 1))
    assert 0.75 * nominal * (1 - 1e-12) <= delay <= 1.25 * nominal * (1 + 1e-12)


def test_backoff_is_deterministic_for_a_seeded_rng() -> None:
    assert [backoff_s(a, random.Random(3)) for a in range(1, 10)] == [
        backoff_s(a, random.Random(3)) for a in range(1, 10)
    ]


def test_backoff_survives_huge_attempt_numbers() -> None:
    # job.attempt also counts rejected attempts, so it is not bounded by max_attempts (<= 100).
    delay = backoff_s(5000, random.Random(1))
    assert 45.0 <= delay <= 75.0


# --------------------------------------------------------------------------- stateful model


@dataclass
class ModelJob:
    """One job as the master holds it: its core plus the one assignment it may have out."""

    core: Core
    current: int | None = None  # attempt of the live assignment, if any
    issued: list[int] = field(default_factory=list)  # every attempt ever handed out
    cancel_requested: bool = False
    terminal_seen: str | None = None


def master_agent_input(job: ModelJob, attempt: int, event: str, reason: str | None) -> ModelJob:
    """The master's fencing rule: an agent message for a stale attempt, or for a job that is not
    live, changes nothing; otherwise it is fed to the state machine (unchanged if illegal)."""
    if job.core.state not in LIVE or attempt != job.current:
        return job
    try:
        out = transition(job.core, event, reason)
    except IllegalTransition:
        return job
    return replace(job, core=out.core, current=out.core.attempt if out.core.state in LIVE else None)


def master_done(job: ModelJob, attempt: int, status: str, reason: str | None) -> ModelJob:
    """A DONE for (id, attempt) with the given status, through the fencing rule."""
    return master_agent_input(job, attempt, DONE_STATUS[status], reason)


def test_stale_done_is_ignored() -> None:
    job = ModelJob(Core(RUNNING, 2, 3), current=2, issued=[1, 2])
    assert master_done(job, 1, "completed", None) is job
    assert master_done(job, 3, "failed", "exit_code") is job
    done = master_done(job, 2, "completed", None)
    assert done.core.state == COMPLETED and done.current is None
    queued = ModelJob(Core(QUEUED, 2, 3), current=None, issued=[1, 2])
    assert master_done(queued, 2, "completed", None) is queued


class JobMachine(RuleBasedStateMachine):
    """Several jobs driven by random inputs, both raw and through the master's fencing rule."""

    def __init__(self) -> None:
        super().__init__()
        self.jobs: list[ModelJob] = []
        self.last_attempt: list[int] = []

    @initialize(maxima=st.lists(st.tuples(st.integers(1, 4), st.booleans()), min_size=1,
                                max_size=3))
    def create(self, maxima: list[tuple[int, bool]]) -> None:
        self.jobs = [ModelJob(Core(QUEUED, 0, m, retry_timeouts=r)) for m, r in maxima]
        self.last_attempt = [0 for _ in maxima]

    def _pick(self, data: st.DataObject) -> int:
        return data.draw(st.integers(0, len(self.jobs) - 1), label="job")

    def _apply(self, i: int, event: str, reason: str | None) -> None:
        """Feed one input to job i, checking its legality and the transition's own rules."""
        job = self.jobs[i]
        before = job.core
        if (before.state, event) not in TABLE:
            with pytest.raises(IllegalTransition):
                transition(before, event, reason)
            return
        out = transition(before, event, reason)
        after = out.core
        assert after.max_attempts == before.max_attempts
        assert after.attempt == before.attempt + (1 if event == ASSIGN else 0)
        assert after.rejects == before.rejects + (1 if event in (REJECT, HAND_BACK) else 0)

        # Retries: only for a retryable failure with attempts left, and then always.
        retryable = (
            before.state in (ASSIGNED, RUNNING)
            and (event in (FAIL, LOST) or (event == TIME_OUT and before.retry_timeouts))
            and reason not in NOT_RETRIED
            and attempts_left(before) > 0
        )
        assert out.retry is retryable
        if out.retry:
            assert after.state == QUEUED
        if after.state == QUEUED and before.state != QUEUED:
            assert out.retry or (event in (REJECT, HAND_BACK)
                                 and before.state in (ASSIGNED, RUNNING))

        # Assignments: the only way into a live state is a fresh, strictly larger attempt.
        current = job.current
        issued = list(job.issued)
        if after.state in LIVE and before.state not in LIVE:
            assert event == ASSIGN
            assert all(after.attempt > a for a in issued)
            current = after.attempt
            issued.append(current)
        elif after.state not in LIVE:
            current = None
        self.jobs[i] = replace(
            job,
            core=after,
            current=current,
            issued=issued,
            cancel_requested=job.cancel_requested or event == CANCEL,
        )

    # ---- master-side inputs (always for the job's current state) -------------------------

    @rule(data=st.data())
    def assign(self, data: st.DataObject) -> None:
        self._apply(self._pick(data), ASSIGN, None)

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        self._apply(self._pick(data), CANCEL, "cancelled")

    @rule(data=st.data(), reason=st.sampled_from(REASONS))
    def lost(self, data: st.DataObject, reason: str | None) -> None:
        self._apply(self._pick(data), LOST, reason)

    # ---- any raw input, as the table sees it ----------------------------------------------

    @rule(data=st.data(), event=st.sampled_from(EVENTS), reason=st.sampled_from(REASONS))
    def raw_input(self, data: st.DataObject, event: str, reason: str | None) -> None:
        self._apply(self._pick(data), event, reason)

    # ---- agent messages through the fencing rule ------------------------------------------

    @rule(
        data=st.data(),
        back=st.integers(-1, 3),
        status=st.sampled_from(sorted(DONE_STATUS)),
        reason=st.sampled_from(REASONS),
    )
    def done(self, data: st.DataObject, back: int, status: str, reason: str | None) -> None:
        i = self._pick(data)
        job = self.jobs[i]
        attempt = job.core.attempt - back  # back=0 is the newest attempt; -1 one never issued
        if job.core.state not in LIVE or attempt != job.current:
            assert master_done(job, attempt, status, reason) is job  # stale: nothing changes
            return
        self._apply(i, DONE_STATUS[status], reason)

    @rule(data=st.data(), back=st.integers(-1, 3), event=st.sampled_from((ACCEPT, REJECT)))
    def agent_reply(self, data: st.DataObject, back: int, event: str) -> None:
        i = self._pick(data)
        job = self.jobs[i]
        attempt = job.core.attempt - back
        if job.core.state not in LIVE or attempt != job.current:
            assert master_agent_input(job, attempt, event, "rejected") is job
            return
        self._apply(i, event, "rejected")

    # ---- invariants --------------------------------------------------------------------------

    @invariant()
    def terminal_states_stay_terminal(self) -> None:
        for job in self.jobs:
            if job.terminal_seen is not None:
                assert job.core.state == job.terminal_seen
            if job.core.state in TERMINAL:
                job.terminal_seen = job.core.state
                for event in EVENTS:
                    with pytest.raises(IllegalTransition):
                        transition(job.core, event, "exit_code")

    @invariant()
    def attempts_never_decrease(self) -> None:
        for i, job in enumerate(self.jobs):
            assert job.core.attempt >= self.last_attempt[i]
            self.last_attempt[i] = job.core.attempt

    @invariant()
    def charged_attempts_within_limit(self) -> None:
        for job in self.jobs:
            assert 0 <= job.core.rejects <= job.core.attempt
            assert job.core.attempt - job.core.rejects <= job.core.max_attempts
            if job.core.state == QUEUED:
                assert attempts_left(job.core) >= 1  # a queued job can always be run again

    @invariant()
    def live_means_exactly_one_assignment(self) -> None:
        for job in self.jobs:
            if job.core.state in LIVE:
                assert job.current == job.core.attempt
                assert job.issued.count(job.current) == 1
            else:
                assert job.current is None
            assert job.issued == sorted(set(job.issued))  # strictly increasing

    @invariant()
    def cancelled_jobs_never_run_again(self) -> None:
        for job in self.jobs:
            if job.cancel_requested:
                assert job.core.state in (CANCELLING, CANCELLED, COMPLETED)


JobMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestJobMachine = JobMachine.TestCase


def test_module_exports_used_by_the_master() -> None:
    # master/core.py relies on these names; a rename would break it silently in a refactor.
    for name in (
        "transition",
        "Core",
        "Outcome",
        "backoff_s",
        "attempts_left",
        "LIVE",
        "TERMINAL",
        "IllegalTransition",
    ):
        assert hasattr(sm, name)


def test_the_protocol_page_shows_this_table() -> None:
    # docs/protocol.md "States and reasons" is generated: `python -m master.state --write ...`
    from pathlib import Path

    page = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    start, end = page.index(sm.BEGIN), page.index(sm.END) + len(sm.END)
    assert page[start:end] == sm.markdown(), "run: python -m master.state --write docs/protocol.md"
