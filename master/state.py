"""The job state machine: the one place that decides a job's next state (pure, no I/O).

docs/protocol.md "States and reasons" (the diagram and the transition table) is generated from
TABLE and TRIGGERS here: `python -m master.state --write docs/protocol.md`; a test fails when
the page and this module disagree.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass

from bus import vocab
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

_RETRY = "retry-or-fail"  # marker: back to QUEUED if attempts are left, else the named state

# (state, input) -> next state (or a retry marker with its final state).
TABLE: dict[tuple[str, str], str | tuple[str, str]] = {
    (QUEUED, ASSIGN): ASSIGNED,
    (QUEUED, CANCEL): CANCELLED,
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
    TABLE[(_s, TIME_OUT)] = (_RETRY, TIMED_OUT)  # retried only if the spec says retry_timeouts
    TABLE[(_s, CANCEL_DONE)] = CANCELLED
    TABLE[(_s, CANCEL)] = CANCELLING
    TABLE[(_s, HAND_BACK)] = QUEUED  # not charged, like REJECT


# What makes each input happen, and the reasons it carries, for the page (docs/protocol.md).
# A reason list of () means the transition carries none; "…" marks an agent's own text.
TRIGGERS: dict[str, tuple[str, tuple[str, ...]]] = {
    ASSIGN: ("the master sends `JOB` to an agent", ()),
    ACCEPT: ("the agent's `ACCEPT` (a process started)", ()),
    COMPLETE: ("`DONE status=completed` (noop completes without `ACCEPT`)", ()),
    FAIL: ("`DONE status=failed`", (
        vocab.EXIT_CODE, vocab.SIGNAL, vocab.OOM_KILLED, vocab.STALLED, vocab.DISK_LIMIT,
        vocab.INVALID_INPUT, vocab.OUTPUT_EXISTS, vocab.AGENT_ERROR)),
    TIME_OUT: ("`DONE status=timed_out`, or the master's backstop (*Time limits*)",
               (vocab.TIMEOUT,)),
    CANCEL_DONE: ("`DONE status=cancelled`, or the backstop ending a cancel",
                  (vocab.CANCELLED_GRACEFUL, vocab.CANCELLED_FORCED)),
    CANCEL: ("a client's `CANCEL`", ()),
    LOST: ("the agent is lost, left (`BYE`) or did not come back after a master restart",
           (vocab.AGENT_LOST,)),
    REJECT: ("the agent's `REJECT`, or no answer to `JOB` within `--assign-timeout`",
             (vocab.RESOURCES, vocab.DRAINING, vocab.REJECTED, vocab.UNACKNOWLEDGED)),
    HAND_BACK: ("`REJECT reason=agent_shutdown` (the agent stops cleanly)",
                (vocab.AGENT_SHUTDOWN,)),
}
# Where a transition's reason is not its input's: (state, input) -> reasons.
REASONS_AT: dict[tuple[str, str], tuple[str, ...]] = {
    (QUEUED, CANCEL): (vocab.CANCELLED,),
}
# Reasons a job enters the queue with at creation (SUBMIT; RETRY of a terminal job).
CREATED = (vocab.SUBMITTED, vocab.RETRY)


class IllegalTransition(Exception):
    """An input that the job's state does not admit."""


@dataclass(frozen=True, slots=True)
class Core:
    """The fields of a job the state machine reads and writes."""

    state: str
    attempt: int
    max_attempts: int
    rejects: int = 0
    retry_timeouts: bool = False  # the spec's retry_timeouts: timed_out attempts are retried


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
        retry = reason not in NOT_RETRIED and attempts_left(core) > 0 \
            and (event != TIME_OUT or core.retry_timeouts)
        target = QUEUED if retry else final
    return Outcome(Core(target, attempt, core.max_attempts, rejects, core.retry_timeouts), retry)


def backoff_s(attempt: int, rng: random.Random, base: float = 1.0, cap: float = 60.0) -> float:
    """Delay before a retry: base * 2^(attempt-1), capped, with +-25 % jitter."""
    # attempt counts rejected attempts too, so it is unbounded: keep 2^n a finite float.
    delay = min(cap, base * 2.0 ** min(max(0, attempt - 1), 1023))
    return delay * rng.uniform(0.75, 1.25)


# ---- the page's generated part ------------------------------------------------------------

BEGIN = "<!-- generated by `python -m master.state --write docs/protocol.md`: do not edit -->"
END = "<!-- end of generated part -->"


def _listed(reasons: tuple[str, ...]) -> str:
    return ", ".join(f"`{r}`" for r in reasons) or "—"


def markdown() -> str:
    """The diagram and the transition table of docs/protocol.md, from TABLE and TRIGGERS."""
    edges: dict[tuple[str, str], set[str]] = {}
    rows = [f"| *(new)* | `SUBMIT`, or `RETRY` of a terminal job | `{QUEUED}` | "
            f"{_listed(CREATED)} | |"]
    order = {e: n for n, e in enumerate(TRIGGERS)}
    for (state, event), target in sorted(TABLE.items(), key=lambda kv: (
            STATES.index(kv[0][0]), order[kv[0][1]])):
        what = TRIGGERS[event][0]
        reasons = REASONS_AT.get((state, event), TRIGGERS[event][1])
        if isinstance(target, tuple):
            final = target[1]
            retried = tuple(r for r in reasons if r not in NOT_RETRIED)
            flag = " and the spec's `retry_timeouts` is true" if event == TIME_OUT else ""
            rows.append(f"| `{state}` | {what} | `{QUEUED}` | {_listed(retried)} | attempts "
                        f"left{flag}: retried after the backoff |")
            rows.append(f"| `{state}` | {what} | `{final}` | {_listed(reasons)} | otherwise |")
            targets = [QUEUED, final]
        else:
            when = {ASSIGN: "a new attempt (attempt + 1)",
                    REJECT: "the attempt is not charged",
                    HAND_BACK: "the attempt is not charged; at the head of its queue"}
            rows.append(f"| `{state}` | {what} | `{target}` | {_listed(reasons)} | "
                        f"{when.get(event, '') if target == QUEUED or event == ASSIGN else ''} |")
            targets = [target]
        for to in targets:
            if to != state:
                edges.setdefault((state, to), set()).add(event)
    lines = [BEGIN, "", "```mermaid", "stateDiagram-v2", f"    [*] --> {QUEUED}"]
    lines += [f"    {a} --> {b}: {', '.join(sorted(evs, key=order.__getitem__))}"
              for (a, b), evs in sorted(edges.items(), key=lambda kv: (
                  STATES.index(kv[0][0]), STATES.index(kv[0][1])))]
    lines += [f"    {s} --> [*]" for s in STATES if s in TERMINAL]
    lines += ["```", "", "| from | input | to | reasons | when |", "|---|---|---|---|---|",
              *rows, "", END]
    return "\n".join(lines)


def write(path: str) -> bool:
    """Replace the generated part of the page at path; True if it changed."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, begin, rest = text.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not (begin and end):
        raise SystemExit(f"{path}: no generated part (the two markers of master/state.py)")
    new = head + markdown() + tail
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)
    return new != text


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"] and len(sys.argv) == 3:
        print("updated" if write(sys.argv[2]) else "unchanged", sys.argv[2])
    else:
        print(markdown())
