"""The job state machine: the one place that decides a job's next state (pure, no I/O)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from bus.vocab import (  # noqa: F401  (re-exported: the state machine's vocabulary)
    ASSIGNED,
    CANCELLED,
    CANCELLING,
    COMPLETED,
    FAILED,
    LIVE,
    NOT_RETRIED,
    QUEUED,
    RUNNING,
    STATES,
    TERMINAL,
    TIMED_OUT,
)

# Inputs the state machine understands.
ASSIGN = "assign"  # the scheduler placed the job on an agent
ACCEPT = "accept"  # the agent started it
COMPLETE = "complete"  # DONE status=completed
FAIL = "fail"  # DONE status=failed
TIME_OUT = "time_out"  # DONE status=timed_out
CANCEL_DONE = "cancel_done"  # DONE status=cancelled
CANCEL = "cancel"  # a client asked to cancel
LOST = "lost"  # the agent died or dropped the attempt
REJECT = "reject"  # the agent refused the attempt
HAND_BACK = "hand_back"  # the agent stopped cleanly (agent_shutdown) and gave the attempt back
UNPLACEABLE = "unplaceable"  # no agent can ever run it

_RETRY = "retry-or-fail"  # marker: back to QUEUED if attempts are left, else the named state

# (state, input) -> next state (or a retry marker with its final state).
TABLE: dict[tuple[str, str], str | tuple[str, str]] = {
    (QUEUED, ASSIGN): ASSIGNED,
    (QUEUED, CANCEL): CANCELLED,
    (QUEUED, UNPLACEABLE): FAILED,
    (ASSIGNED, ACCEPT): RUNNING,
    (ASSIGNED, REJECT): QUEUED,
    (CANCELLING, REJECT): CANCELLED,
    (RUNNING, ACCEPT): RUNNING,
    (CANCELLING, ACCEPT): CANCELLING,
    (CANCELLING, CANCEL): CANCELLING,
    (CANCELLING, COMPLETE): COMPLETED,
    (CANCELLING, FAIL): CANCELLED,
    (CANCELLING, TIME_OUT): CANCELLED,
    (CANCELLING, CANCEL_DONE): CANCELLED,
    (CANCELLING, LOST): CANCELLED,
    (CANCELLING, HAND_BACK): CANCELLED,
}
for _s in (ASSIGNED, RUNNING):
    TABLE[(_s, COMPLETE)] = COMPLETED
    TABLE[(_s, FAIL)] = (_RETRY, FAILED)
    TABLE[(_s, LOST)] = (_RETRY, FAILED)
    TABLE[(_s, TIME_OUT)] = TIMED_OUT
    TABLE[(_s, CANCEL_DONE)] = CANCELLED
    TABLE[(_s, CANCEL)] = CANCELLING
    TABLE[(_s, HAND_BACK)] = QUEUED  # not charged, like REJECT


class IllegalTransition(Exception):
    """An input that the job's state does not admit."""


@dataclass(frozen=True, slots=True)
class Core:
    """The fields of a job the state machine reads and writes."""

    state: str
    attempt: int
    max_attempts: int
    rejects: int = 0


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one transition: the new core and whether a retry was scheduled."""

    core: Core
    retry: bool = False


def attempts_left(core: Core) -> int:
    """Attempts not yet charged; rejected attempts are not charged."""
    return core.max_attempts - (core.attempt - core.rejects)


def transition(core: Core, event: str, reason: str | None = None) -> Outcome:
    """Apply one input to a job; raises IllegalTransition where the table has no entry."""
    target = TABLE.get((core.state, event))
    if target is None:
        raise IllegalTransition(f"{event} not allowed in state {core.state}")
    attempt, rejects = core.attempt, core.rejects
    if event == ASSIGN:
        attempt += 1
    elif event in (REJECT, HAND_BACK):
        rejects += 1
    retry = False
    if isinstance(target, tuple):
        _, final = target
        retry = reason not in NOT_RETRIED and attempts_left(core) > 0
        target = QUEUED if retry else final
    return Outcome(Core(target, attempt, core.max_attempts, rejects), retry)


def backoff_s(attempt: int, rng: random.Random, base: float = 1.0, cap: float = 60.0) -> float:
    """Delay before a retry: base * 2^(attempt-1), capped, with +-25 % jitter."""
    # attempt counts rejected attempts too, so it is unbounded: keep 2^n a finite float.
    delay = min(cap, base * 2.0 ** min(max(0, attempt - 1), 1023))
    return delay * rng.uniform(0.75, 1.25)
