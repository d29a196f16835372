"""The storage ceiling: how many job lifecycles per second `Store.apply` absorbs, per backend.

No sockets, no master: the same writes a master turn produces for a `noop` job (insert +
`submitted` event, `assigned` update + event, `completed` update + event), applied in group
commits of `batch` jobs, the way the master batches a loop turn. This separates what the
database can take from what the master's CPU can feed it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.env import db_version, fresh_db
from bench.stats import summary
from storage import Store, WriteBatch

SPEC = {"scenario": "noop", "input": None, "output": None, "params": {}, "priority": "normal",
        "timeout_s": None, "max_attempts": 3, "resource_limits": {}}


def _turns(first_id: int, n: int, wall: float) -> list[WriteBatch]:
    ids = range(first_id, first_id + n)
    submit, assign, done = WriteBatch(), WriteBatch(), WriteBatch()
    seq = 3 * first_id  # three events per job, sequence numbers as the master gives them
    for i in ids:
        submit.inserts.append({
            "id": i, "scenario": "noop", "spec": SPEC, "state": "queued", "priority": 1,
            "attempt": 0, "max_attempts": 3, "created_at": wall, "updated_at": wall,
            "timeout_s": None, "output": None, "idem_key": None, "reason": None,
            "extra": {"requires": "workload:noop"}})
        submit.event(id=seq, job_id=i, at=wall, from_state=None, to_state="queued",
                     reason="submitted", agent=None, attempt=0)
        assign.update(i, state="assigned", attempt=1, updated_at=wall, reason=None,
                      agent="bench0", not_before=None)
        assign.event(id=seq + 1, job_id=i, at=wall, from_state="queued", to_state="assigned",
                     reason=None, agent="bench0", attempt=1)
        done.update(i, state="completed", attempt=1, updated_at=wall, reason=None,
                    exit_code=0, bytes_in=0, bytes_out=0, extra={"duration_s": 0.0},
                    finished_at=wall, progress=1.0)
        done.event(id=seq + 2, job_id=i, at=wall, from_state="assigned", to_state="completed",
                   reason=None, agent="bench0", attempt=1)
        seq += 3
    return [submit, assign, done]


def ceiling(db: str, workdir: Path, batches: list[int], jobs: int = 20_000,
            pg: str | None = None, repeat: int = 1) -> dict[str, Any]:
    """{backend, database, rows: [{batch, fenced, jobs_per_s, commit_ms, rounds}]}: each batch
    size with and without the leader's epoch check (master/leader.py), alternating which goes
    first, `repeat` rounds each; jobs_per_s is the median round."""
    url, backend, cleanup = fresh_db(db, workdir, pg)
    rows = []
    try:
        store = Store(url)
        try:
            epoch = store.take_epoch("bench", "", "", "", time.time())
            next_id = 1
            for b in batches:
                n = max(b, (jobs // b) * b)
                rates: dict[bool, list[float]] = {False: [], True: []}
                commits: dict[bool, list[float]] = {False: [], True: []}
                for r in range(max(1, repeat)):
                    for fenced in ((False, True) if r % 2 == 0 else (True, False)):
                        store.fence(epoch if fenced else None)
                        started = time.perf_counter()
                        for first in range(next_id, next_id + n, b):
                            for batch in _turns(first, b, time.time()):
                                t0 = time.perf_counter()
                                store.apply(batch)
                                commits[fenced].append(1000 * (time.perf_counter() - t0))
                        rates[fenced].append(n / (time.perf_counter() - started))
                        next_id += n
                for fenced in (False, True):
                    got = sorted(rates[fenced])
                    rows.append({"batch": b, "jobs": n, "fenced": fenced,
                                 "jobs_per_s": round(got[len(got) // 2], 1),
                                 "rounds": [round(x, 1) for x in rates[fenced]],
                                 "commit_ms": summary(commits[fenced])})
        finally:
            store.fence(None)
            store.close()
        return {"backend": backend, "database": db_version(url), "rows": rows}
    finally:
        cleanup()
