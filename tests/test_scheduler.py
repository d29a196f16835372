"""The scheduler (master/scheduler.py): priorities, FIFO, aging, placement, delays, depth."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from master.scheduler import PRIORITIES, Job, Scheduler

HIGH, NORMAL, LOW = PRIORITIES["high"], PRIORITIES["normal"], PRIORITIES["low"]
T0 = 1000.0  # a monotonic clock reading; never 0.0, which push() reads as "never enqueued"
AGING = 60.0

_ids: Iterator[int] = itertools.count(1)


def make_job(priority: int = NORMAL, requires: str = "workload:sleep", **kw: object) -> Job:
    """A queued job with a fresh id."""
    return Job(
        id=next(_ids),
        scenario="sleep",
        spec=b"\x80",
        state="queued",
        priority=priority,
        attempt=0,
        max_attempts=3,
        requires=requires,
        **kw,  # type: ignore[arg-type]
    )


def anything(_req: str) -> bool:
    return True


def drain(sched: Scheduler, now: float, can_run: Callable[[str], bool] = anything) -> list[Job]:
    """Pick until nothing is left that can_run admits."""
    out: list[Job] = []
    while (job := sched.pick(can_run, now)) is not None:
        out.append(job)
    return out


def zero_depth() -> dict[str, int]:
    return {"high": 0, "normal": 0, "low": 0}


# --------------------------------------------------------------------------- order


def test_empty_scheduler() -> None:
    sched = Scheduler(AGING)
    assert sched.pick(anything, T0) is None
    assert sched.depth() == zero_depth()
    assert sched.delayed() == 0
    assert sched.next_due() is None
    assert sched.promote(T0) == 0


def test_high_before_normal_before_low_at_equal_wait() -> None:
    sched = Scheduler(AGING)
    low, normal, high = make_job(LOW), make_job(NORMAL), make_job(HIGH)
    for job in (low, normal, high):  # pushed worst first, so FIFO alone would get it wrong
        sched.push(job, T0)
    assert drain(sched, T0 + 1) == [high, normal, low]


def test_priority_wins_over_a_short_wait() -> None:
    sched = Scheduler(AGING)
    low = make_job(LOW)
    sched.push(low, T0)
    high = make_job(HIGH)
    sched.push(high, T0 + AGING)  # low has waited aging_s: not yet enough to beat high
    assert drain(sched, T0 + AGING) == [high, low]


def test_fifo_within_a_priority() -> None:
    sched = Scheduler(AGING)
    jobs = [make_job(NORMAL) for _ in range(50)]
    for k, job in enumerate(jobs):
        sched.push(job, T0 + k * 0.001)
    assert drain(sched, T0 + 1) == jobs


def test_fifo_within_a_priority_across_requirements() -> None:
    sched = Scheduler(AGING)
    jobs = [make_job(NORMAL, requires=f"workload:{k % 3}") for k in range(12)]
    for job in jobs:
        sched.push(job, T0)  # same instant: push order decides
    assert drain(sched, T0) == jobs


def test_aging_low_job_beats_fresh_high_after_two_aging_periods() -> None:
    sched = Scheduler(AGING)
    low = make_job(LOW)
    sched.push(low, T0)
    now = T0 + 2 * AGING
    high = make_job(HIGH)
    sched.push(high, now)
    assert sched.pick(anything, now) is low
    assert sched.pick(anything, now) is high


def test_aging_normal_job_beats_fresh_high_after_one_aging_period() -> None:
    sched = Scheduler(AGING)
    normal = make_job(NORMAL)
    sched.push(normal, T0)
    high = make_job(HIGH)
    sched.push(high, T0 + AGING + 1)
    assert sched.pick(anything, T0 + AGING + 1) is normal


# --------------------------------------------------------------------------- placement


def test_can_run_filters_and_nothing_blocks_behind_an_unrunnable_job() -> None:
    sched = Scheduler(AGING)
    stuck = make_job(HIGH, requires="encoder:h264_nvenc")
    sched.push(stuck, T0)  # older and higher priority, but no agent can run it
    runnable = [make_job(LOW, requires="workload:sleep") for _ in range(3)]
    for job in runnable:
        sched.push(job, T0 + 1)

    def cpu_only(req: str) -> bool:
        return req != "encoder:h264_nvenc"

    assert drain(sched, T0 + 2, cpu_only) == runnable
    assert sched.depth() == {"high": 1, "normal": 0, "low": 0}
    assert sched.pick(anything, T0 + 2) is stuck
    assert sched.depth() == zero_depth()


def test_can_run_sees_each_requirement() -> None:
    sched = Scheduler(AGING)
    a, b = make_job(requires="workload:a"), make_job(requires="workload:b")
    sched.push(a, T0)
    sched.push(b, T0)
    asked: list[str] = []

    def only_b(req: str) -> bool:
        asked.append(req)
        return req == "workload:b"

    assert sched.pick(only_b, T0) is b
    assert set(asked) == {"workload:a", "workload:b"}
    assert sched.pick(only_b, T0) is None
    assert sched.pick(anything, T0) is a


def test_picked_job_is_marked_out_of_the_queue() -> None:
    sched = Scheduler(AGING)
    job = make_job()
    sched.push(job, T0)
    assert job.where == 1
    assert sched.pick(anything, T0) is job
    assert job.where == 0
    sched.discard(job)  # discarding a job that is no longer queued changes nothing
    assert sched.depth() == zero_depth()


# --------------------------------------------------------------------------- discard, front


def test_discard_removes_from_pick_and_depth() -> None:
    sched = Scheduler(AGING)
    jobs = [make_job(p) for p in (HIGH, HIGH, NORMAL, LOW)]
    for job in jobs:
        sched.push(job, T0)
    sched.discard(jobs[0])
    sched.discard(jobs[3])
    assert sched.depth() == {"high": 1, "normal": 1, "low": 0}
    sched.discard(jobs[0])  # twice is harmless
    assert sched.depth() == {"high": 1, "normal": 1, "low": 0}
    assert drain(sched, T0) == [jobs[1], jobs[2]]
    assert sched.depth() == zero_depth()


def test_discarded_job_can_be_pushed_again_and_is_picked_once() -> None:
    sched = Scheduler(AGING)
    job, other = make_job(), make_job()
    sched.push(job, T0)
    sched.push(other, T0)
    sched.discard(job)
    sched.push(job, T0 + 1)  # its old entry is stale; only the new one counts
    assert sched.depth()["normal"] == 2
    assert drain(sched, T0 + 1) == [other, job]


def test_front_keeps_a_rejected_jobs_place() -> None:
    sched = Scheduler(AGING)
    first, second, third = make_job(), make_job(), make_job()
    for k, job in enumerate((first, second, third)):
        sched.push(job, T0 + k)
    assert sched.pick(anything, T0 + 10) is first
    later = make_job()
    sched.push(later, T0 + 11)
    sched.push(first, T0 + 12, front=True)  # rejected: back at the head, with its old wait
    assert first.enqueued == T0
    assert drain(sched, T0 + 12) == [first, second, third, later]


def test_front_keeps_its_age_against_other_requirements() -> None:
    sched = Scheduler(AGING)
    old = make_job(LOW, requires="workload:a")
    sched.push(old, T0)
    assert sched.pick(anything, T0) is old
    fresh_high = make_job(HIGH, requires="workload:b")
    now = T0 + 2 * AGING + 1
    sched.push(fresh_high, now)
    sched.push(old, now, front=True)  # the low job has aged 2*aging_s + 1 since first queued
    assert sched.pick(anything, now) is old


def test_plain_push_restarts_the_wait() -> None:
    sched = Scheduler(AGING)
    job = make_job(LOW)
    sched.push(job, T0)
    assert sched.pick(anything, T0) is job
    sched.push(job, T0 + 500)  # e.g. a retry: it queues afresh
    assert job.enqueued == T0 + 500


# --------------------------------------------------------------------------- delayed


def test_delayed_job_invisible_until_promoted_at_due_time() -> None:
    sched = Scheduler(AGING)
    job = make_job(HIGH)
    sched.push_delayed(job, T0 + 5)
    assert sched.delayed() == 1
    assert sched.next_due() == T0 + 5
    assert sched.depth() == zero_depth()
    assert sched.pick(anything, T0 + 10) is None  # not promoted yet, even though it is due
    assert sched.promote(T0 + 4.999) == 0
    assert sched.pick(anything, T0 + 4.999) is None
    assert sched.promote(T0 + 5) == 1
    assert sched.delayed() == 0
    assert sched.next_due() is None
    assert sched.depth() == {"high": 1, "normal": 0, "low": 0}
    assert job.enqueued == T0 + 5
    assert sched.pick(anything, T0 + 5) is job


def test_promote_moves_only_due_jobs_in_due_order() -> None:
    sched = Scheduler(AGING)
    jobs = {due: make_job() for due in (7.0, 3.0, 5.0, 9.0)}
    for due, job in jobs.items():
        sched.push_delayed(job, T0 + due)
    assert sched.next_due() == T0 + 3
    assert sched.promote(T0 + 6) == 2
    assert sched.delayed() == 2
    assert sched.next_due() == T0 + 7
    assert drain(sched, T0 + 6) == [jobs[3.0], jobs[5.0]]
    assert sched.promote(T0 + 100) == 2
    assert drain(sched, T0 + 100) == [jobs[7.0], jobs[9.0]]


def test_discarding_a_delayed_job() -> None:
    sched = Scheduler(AGING)
    job, keep = make_job(), make_job()
    sched.push_delayed(job, T0 + 1)
    sched.push_delayed(keep, T0 + 2)
    sched.discard(job)
    assert sched.delayed() == 1
    assert sched.depth() == zero_depth()
    assert sched.promote(T0 + 10) == 1
    assert drain(sched, T0 + 10) == [keep]


def test_depth_exact_after_mixed_operations() -> None:
    sched = Scheduler(AGING)
    highs = [make_job(HIGH) for _ in range(4)]
    normals = [make_job(NORMAL) for _ in range(3)]
    lows = [make_job(LOW) for _ in range(5)]
    for job in highs + normals + lows:
        sched.push(job, T0)
    assert sched.depth() == {"high": 4, "normal": 3, "low": 5}
    sched.discard(highs[1])
    sched.discard(lows[0])
    sched.discard(lows[0])
    assert sched.depth() == {"high": 3, "normal": 3, "low": 4}
    assert sched.pick(anything, T0) is highs[0]
    assert sched.depth() == {"high": 2, "normal": 3, "low": 4}
    sched.push(highs[0], T0 + 1, front=True)  # rejected
    assert sched.depth() == {"high": 3, "normal": 3, "low": 4}
    picked = sched.pick(anything, T0 + 1)
    assert picked is highs[0]
    sched.push_delayed(picked, T0 + 3)  # failed, retry later: not in depth
    assert sched.depth() == {"high": 2, "normal": 3, "low": 4}
    assert sched.delayed() == 1
    assert sched.promote(T0 + 3) == 1
    assert sched.depth() == {"high": 3, "normal": 3, "low": 4}
    assert len(drain(sched, T0 + 3)) == 10
    assert sched.depth() == zero_depth()


def test_requirements_lists_queued_requirements() -> None:
    sched = Scheduler(AGING)
    sched.push(make_job(requires="workload:a"), T0)
    sched.push(make_job(requires="encoder:libx264"), T0)
    assert sched.requirements() == {"workload:a", "encoder:libx264"}


# --------------------------------------------------------------------------- property


op_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.sampled_from((HIGH, NORMAL, LOW)), st.integers(0, 2)),
        st.tuples(st.just("reject"), st.integers(0, 10_000)),
        st.tuples(st.just("discard"), st.integers(0, 10_000)),
        st.tuples(st.just("pick"), st.frozensets(st.integers(0, 2))),
        st.tuples(
            st.just("delay"),
            st.sampled_from((HIGH, NORMAL, LOW)),
            st.integers(0, 2),
            st.integers(1, 20),
        ),
        st.tuples(st.just("tick"), st.integers(1, 200)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(ops=op_strategy)
def test_picks_are_exactly_the_pushed_and_not_discarded_jobs(ops: list[tuple]) -> None:
    sched = Scheduler(AGING)
    now = T0
    queued: dict[int, Job] = {}  # pickable now
    waiting: dict[int, tuple[float, Job]] = {}  # delayed, with due time
    out: dict[int, Job] = {}  # picked and not pushed back
    all_jobs: list[Job] = []
    pushes: dict[int, int] = {}  # job id -> times it entered the scheduler
    picks: dict[int, int] = {}  # job id -> times it was picked
    rejects = 0  # two front pushes into one queue can reorder it; then skip the order check

    def check_depth() -> None:
        expect = zero_depth()
        for job in queued.values():
            expect[("high", "normal", "low")[job.priority]] += 1
        assert sched.depth() == expect
        assert sched.delayed() == len(waiting)

    for op in ops:
        kind = op[0]
        if kind == "push":
            _, prio, req = op
            job = make_job(prio, requires=f"r{req}")
            all_jobs.append(job)
            sched.push(job, now)
            queued[job.id] = job
            pushes[job.id] = 1
        elif kind == "reject" and out:
            job = list(out.values())[op[1] % len(out)]
            del out[job.id]
            rejects += 1
            sched.push(job, now, front=True)
            queued[job.id] = job
            pushes[job.id] += 1
        elif kind == "delay":
            _, prio, req, after = op
            job = make_job(prio, requires=f"r{req}")
            all_jobs.append(job)
            sched.push_delayed(job, now + after)
            waiting[job.id] = (now + after, job)
            pushes[job.id] = 1
        elif kind == "discard" and all_jobs:
            job = all_jobs[op[1] % len(all_jobs)]
            sched.discard(job)
            queued.pop(job.id, None)
            waiting.pop(job.id, None)
        elif kind == "pick":
            allowed = {f"r{r}" for r in op[1]}
            got = sched.pick(allowed.__contains__, now)
            candidates = [j for j in queued.values() if j.requires in allowed]
            if got is None:
                assert not candidates, "a pickable job was not picked"
            else:
                assert got.id in queued, "picked a job that is not pickable"
                assert got.requires in allowed
                if rejects < 2:  # the best candidate by aged priority
                    score = got.priority * AGING - (now - got.enqueued)
                    assert all(score <= j.priority * AGING - (now - j.enqueued) for j in candidates)
                del queued[got.id]
                out[got.id] = got
                picks[got.id] = picks.get(got.id, 0) + 1
        elif kind == "tick":
            now += op[1]
            moved = sched.promote(now)
            due = [jid for jid, (t, _) in waiting.items() if t <= now]
            assert moved == len(due)
            for jid in due:
                queued[jid] = waiting.pop(jid)[1]
        check_depth()

    rest = drain(sched, now)
    assert sorted(j.id for j in rest) == sorted(queued), "pickable jobs left behind or extra"
    for job in rest:
        picks[job.id] = picks.get(job.id, 0) + 1
    assert all(picks[jid] <= pushes[jid] for jid in picks), "a job was picked twice"
    assert sched.depth() == zero_depth()
    sched.promote(now + 1000)
    assert {j.id for j in drain(sched, now + 1000)} == set(waiting)


# --------------------------------------------------------------------------- scale


def test_pick_over_100k_jobs_in_three_priorities() -> None:
    sched = Scheduler(AGING)
    per = 100_000 // 3 + 1
    jobs = {p: [make_job(p) for _ in range(per)] for p in (HIGH, NORMAL, LOW)}
    for k in range(per):
        for p in (LOW, NORMAL, HIGH):
            sched.push(jobs[p][k], T0)
    assert sched.depth() == {"high": per, "normal": per, "low": per}
    calls = 0

    def counting(_req: str) -> bool:
        nonlocal calls
        calls += 1
        return True

    # No time passes: strict priority order, FIFO within each.
    got = drain(sched, T0, counting)
    assert got == jobs[HIGH] + jobs[NORMAL] + jobs[LOW]
    assert sched.depth() == zero_depth()
    # O(1)-ish: each pick looks at a bounded number of queues, not at the queued jobs.
    assert calls <= 3 * (len(got) + 1)


@pytest.mark.parametrize("aging_s", [1.0, 60.0, 3600.0])
def test_aging_threshold_scales_with_aging_s(aging_s: float) -> None:
    sched = Scheduler(aging_s)
    low = make_job(LOW)
    sched.push(low, T0)
    high = make_job(HIGH)
    sched.push(high, T0 + 2 * aging_s - 0.5)
    assert sched.pick(anything, T0 + 2 * aging_s - 0.5) is high
    sched.push(high, T0 + 2 * aging_s + 0.5)
    assert sched.pick(anything, T0 + 2 * aging_s + 0.5) is low
