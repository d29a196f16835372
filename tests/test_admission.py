"""Admission and reservation, the pure core (agent/admission.py): unit and property tests."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.admission import Admission, Reservation, reservation_for

GB = 1024.0


def make(cpu: float = 200.0, mem: float = 8 * GB, disk_free: float = 100 * GB,
         floor: float = 1024.0, **kw: object) -> Admission:
    adm = Admission(cpu, mem, floor, **kw)  # type: ignore[arg-type]
    adm.observe_disk(disk_free)
    return adm


def test_reservation_parse_and_spec() -> None:
    assert Reservation.parse("10:64") == Reservation(10, 64, 0)
    assert Reservation.parse("150:512:2000") == Reservation(150, 512, 2000)
    for bad in ("10", "a:b", "1:2:3:4", "-1:5", "inf:1"):
        with pytest.raises(ValueError):
            Reservation.parse(bad)
    default = Reservation(10, 64, 0)
    assert reservation_for({}, default) == default
    spec = {"resource_limits": {"max_cpu_percent": 150, "max_disk_mb": 2000}}
    assert reservation_for(spec, default) == Reservation(150, 64, 2000)


def test_credit_only_while_a_typical_job_fits() -> None:
    adm = make(cpu=200, typical=Reservation(50, 256, 0))
    assert adm.credits(free_slots=8, outstanding=0, now=0) == 4  # 4 x 50 % fill 2 cores
    assert adm.credits(free_slots=8, outstanding=3, now=0) == 1
    assert adm.credits(free_slots=2, outstanding=0, now=0) == 2  # never more than free slots
    assert adm.admit("a", Reservation(150, 512, 0), now=0)
    assert adm.credits(free_slots=7, outstanding=0, now=0) == 1
    adm.release("a")
    assert adm.credits(free_slots=8, outstanding=0, now=0) == 4


def test_a_job_that_does_not_fit_blocks_credit_until_a_job_ends() -> None:
    adm = make(cpu=200)
    assert adm.admit(1, Reservation(150, 64, 0), now=0)
    assert not adm.admit(2, Reservation(150, 64, 0), now=0)  # REJECT resources
    # Small jobs would fit, but no credit: otherwise job 2 bounces straight back.
    assert adm.fits(Reservation(10, 64, 0))
    assert adm.credits(free_slots=3, outstanding=0, now=100.0) == 0
    adm.release(1)
    assert adm.credits(free_slots=4, outstanding=0, now=100.0) > 0
    assert adm.admit(2, Reservation(150, 64, 0), now=100.0)


def test_block_without_running_jobs_retries_after_a_while() -> None:
    adm = make(disk_free=3000, floor=1024, idle_retry_s=5.0)
    assert not adm.admit(1, Reservation(10, 64, 5000), now=10.0)  # needs more disk than there is
    assert adm.credits(4, 0, now=14.9) == 0
    assert adm.credits(4, 0, now=15.0) == 4


def test_block_lifts_when_the_resource_frees_up() -> None:
    adm = make(disk_free=3000, floor=1024)
    assert adm.admit(1, Reservation(10, 64, 100), now=0)
    assert not adm.admit(2, Reservation(10, 64, 5000), now=0)
    assert adm.credits(4, 0, now=0) == 0
    adm.observe_disk(10_000)  # somebody deleted files
    assert adm.credits(4, 0, now=0) == 4


def test_disk_floor_refuses_all_work() -> None:
    adm = make(disk_free=1000, floor=1024)
    assert adm.credits(4, 0, now=0) == 0
    assert not adm.fits(Reservation(0, 0, 0))
    adm.observe_disk(1025)
    assert adm.credits(4, 0, now=0) == 4
    assert not adm.fits(Reservation(0, 0, 2))  # only 1 MB above the floor


def test_snapshot_keys_and_values() -> None:
    adm = make(cpu=400, mem=16 * GB, disk_free=50 * GB)
    adm.admit("x", Reservation(150, 512, 2000), now=0)
    assert adm.snapshot() == {
        "cpu_reserved_percent": 150, "cpu_capacity_percent": 400,
        "memory_reserved_mb": 512, "memory_capacity_mb": 16 * GB,
        "disk_reserved_mb": 2000, "disk_free_mb": 50 * GB,
    }


ops = st.lists(st.one_of(
    st.tuples(st.just("admit"), st.integers(0, 9), st.floats(0, 300), st.floats(0, 9000),
              st.floats(0, 60_000)),
    st.tuples(st.just("release"), st.integers(0, 9)),
    st.tuples(st.just("disk"), st.floats(0, 200_000)),
    st.tuples(st.just("credits"), st.integers(0, 16), st.integers(0, 16)),
), max_size=60)


@settings(max_examples=300)
@given(ops=ops)
def test_property_reservations_never_exceed_capacity_and_credit_is_sane(ops: list) -> None:
    adm = make(cpu=400, mem=8 * GB, disk_free=100_000, floor=1024)
    now = 0.0
    for op in ops:
        now += 1.0
        if op[0] == "admit":
            _, key, cpu, mem, disk = op
            if key in adm.held:
                continue
            running = bool(adm.held)
            if not adm.admit(key, Reservation(cpu, mem, disk), now) and running:
                # A REJECT while jobs run: no credit until one of them ends.
                assert adm.credits(16, 0, now) == 0
        elif op[0] == "release":
            if op[1] in adm.held:
                        adm.release(op[1])
        elif op[0] == "disk":
            adm.observe_disk(op[1])
        else:
            _, free_slots, outstanding = op
            n = adm.credits(free_slots, outstanding, now)
            assert 0 <= n <= max(0, free_slots)
            if n:
                assert adm.disk_free > adm.disk_floor
        r = adm.reserved()
        # Admitted jobs always fitted when they were admitted; CPU and memory never overbook.
        assert r.cpu_percent <= 400 + 1e-6 and r.memory_mb <= 8 * GB + 1e-6
        snap = adm.snapshot()
        assert math.isclose(snap["cpu_reserved_percent"], r.cpu_percent, abs_tol=1e-6)
    for key in list(adm.held):
        adm.release(key)
    assert adm.reserved() == Reservation()
