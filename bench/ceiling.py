"""The bus ceiling: raw pyzmq dispatch + ack, with no database and no state machine.

`measure(agents, slots, jobs)` runs a ROUTER "master" and `agents` DEALER "agents", each in a
process of its own, over TCP loopback, with the real flow control and the real frames:

- an agent says HELLO and grants CREDIT for its `slots`;
- the master sends JOB (the bus codec's frames and a body the size of the real JOB of a noop:
  id, attempt, the normalized noop spec, epoch) to an agent with credit, round robin;
- the agent answers every JOB with DONE at once (the body the real agent sends) and, after each
  batch of JOBs it read, one CREDIT for the slots they freed;
- the master decodes every message with the bus codec (schema checks included, as the real master
  does) and sends one DONE_ACK per agent per turn for the DONEs of that turn.

What is left out against the real master is exactly the system: the database, the job state
machine, the scheduler, events and metrics. The master's CPU is its own process's (all threads:
libzmq's I/O thread too), counted over the measured window only, after a warm-up; agents are
separate processes, so, as in `ffrtmp bench`, their CPU is not in the master's figure.

`python -m bench.ceiling master|agent ...` are the two roles (started by `measure`); at module
level the roles need only the standard library, pyzmq and msgpack.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import zmq

from bench.profiles import CEILING_JOBS

DEFAULT_JOBS = CEILING_JOBS  # what `ffrtmp bench` measures beside every run
WARMUP = 1_000  # jobs sent before the measured window (connections, allocator, caches warm)
MAX_PER_TURN = 2_000  # messages read per loop turn before dispatching (the master reads in turns)
# The normalized noop spec, as master/spec.validate_spec stores it and the master sends it in JOB.
NOOP_SPEC: dict[str, Any] = {"scenario": "noop", "input": None, "output": None, "params": {},
                             "priority": "normal", "timeout_s": None, "max_attempts": 3,
                             "resource_limits": {}, "overwrite": False, "retry_timeouts": False}
_NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)


def _send(sock: zmq.Socket, frames: list[bytes]) -> None:
    """send_multipart(frames, NOBLOCK) the way master/server.py sends (no per-frame flag
    arithmetic)."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, _NOBLOCK if i == last else _MORE)


def _recv(sock: zmq.Socket) -> list[bytes]:
    """One whole message (NOBLOCK; zmq.Again if none), read frame by frame like the master."""
    frames = [sock.recv(_NOBLOCK)]
    while sock.getsockopt(_RCVMORE):
        frames.append(sock.recv())
    return frames


def _done_body(job_id: int, attempt: int) -> dict[str, Any]:
    """The DONE body the real agent sends for a noop (agent/core.py `_finish`)."""
    return {"id": job_id, "attempt": attempt, "status": "completed", "reason": None,
            "exit_code": 0, "bytes_in": 0, "bytes_out": 0, "duration_s": 1.2e-05, "extra": {}}


# ---- the two roles ---------------------------------------------------------------------------


def run_master(endpoint: str, agents: int, jobs: int, warmup: int, timeout: float) -> dict:
    """Bind, wait for `agents` HELLOs, dispatch warmup + jobs; the measured window's figures."""
    from bus.codec import decode, encode  # here: `ffrtmp`'s grammar imports this module
    from bus.schemas import AGENT_TO_MASTER

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.bind(endpoint)
    credit: dict[bytes, int] = {}
    acks: dict[bytes, list[list[int]]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(credit) < agents:  # start-up: every agent connected and granting credit
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(credit)} of {agents} agents said HELLO")
            if sock.poll(100):
                ident, *frames = sock.recv_multipart()
                msg = decode(frames, AGENT_TO_MASTER)
                if msg.command == "CREDIT":
                    credit[ident] = credit.get(ident, 0) + msg["n"]
                acks.setdefault(ident, [])
        total = warmup + jobs
        sent = done = 0
        t0 = c0 = 0.0
        order = list(credit)
        while done < total:
            if done >= warmup and not t0:  # the measured window opens
                t0, c0 = time.perf_counter(), time.process_time()
            # dispatch: round robin over the agents with credit, as the real master does
            progressed = True
            while sent < total and progressed:
                progressed = False
                for ident in order:
                    if credit[ident] > 0 and sent < total:
                        sent += 1
                        credit[ident] -= 1
                        _send(sock, [ident, *encode("JOB", {
                            "id": sent, "attempt": 1, "spec": NOOP_SPEC, "epoch": 1})])
                        progressed = True
            # one turn: read what is there (block for the first), then ack per agent
            if not sock.poll(int(max(0.0, deadline - time.monotonic()) * 1000) + 1):
                raise RuntimeError(f"timed out with {done}/{total} jobs done")
            for _ in range(MAX_PER_TURN):
                try:
                    ident, *frames = _recv(sock)
                except zmq.Again:
                    break
                msg = decode(frames, AGENT_TO_MASTER)
                if msg.command == "DONE":
                    acks[ident].append([msg["id"], msg["attempt"]])
                    done += 1
                elif msg.command == "CREDIT":
                    credit[ident] += msg["n"]
            for ident, pending in acks.items():
                if pending:
                    _send(sock, [ident, *encode("DONE_ACK", {"acks": pending, "epoch": 1})])
                    acks[ident] = []
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        for ident in order:
            _send(sock, [ident, *encode("BYE", {})])
        return {"jobs": jobs, "wall_s": wall, "cpu_s": cpu,
                "job_bytes": len(msgpack.packb({"id": total, "attempt": 1, "spec": NOOP_SPEC,
                                                "epoch": 1}))}
    finally:
        sock.close(linger=200)
        ctx.term()


def run_agent(endpoint: str, names: list[str], slots: int) -> None:
    """One DEALER per name (HELLO + CREDIT for `slots`), then DONE for every JOB at once and
    CREDIT for what a batch freed; returns on BYE (or a silent master)."""
    from bus.codec import encode

    ctx = zmq.Context()
    poller = zmq.Poller()
    socks = []
    for name in names:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, name.encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.connect(endpoint)
        sock.send_multipart(encode("HELLO", {"name": name, "slots": slots}))
        sock.send_multipart(encode("CREDIT", {"n": slots}))
        poller.register(sock, zmq.POLLIN)
        socks.append(sock)
    live = len(socks)
    try:
        while live:
            ready = poller.poll(30_000)
            if not ready:
                return  # the master is gone
            for sock, _ in ready:
                if not _serve(sock):
                    poller.unregister(sock)
                    live -= 1
    finally:
        for sock in socks:
            sock.close()
        ctx.term()


def _serve(sock: zmq.Socket) -> bool:
    """Answer what one agent connection has waiting; False once the master said BYE."""
    from bus.codec import HEADER, encode

    freed = 0
    while True:
        try:
            frames = _recv(sock)
        except zmq.Again:
            break
        command = frames[1] if len(frames) == 3 else b""
        if command == b"JOB":  # the agent's own cost is kept small: it is not measured
            body = msgpack.unpackb(frames[2])
            _send(sock, [HEADER, b"DONE", msgpack.packb(_done_body(body["id"], body["attempt"]))])
            freed += 1
        elif command == b"BYE":
            return False
    if freed:
        _send(sock, encode("CREDIT", {"n": freed}))
    return True


# ---- the measurement -------------------------------------------------------------------------


def _free_port() -> int:
    from bench.cluster import free_ports

    return free_ports(1)[0]


def measure(agents: int, slots: int, jobs: int = DEFAULT_JOBS, *, warmup: int = WARMUP,
            timeout: float | None = None, one_process: bool = False) -> dict[str, Any]:
    """One measurement: jobs/s and the master's CPU µs per job, `agents` x `slots`.

    Each agent is a process of its own, unless `one_process` (as `bench.sim` holds simulated
    agents): then one process holds every agent's connection."""
    if agents < 1 or slots < 1 or jobs < 1:
        raise ValueError("agents, slots and jobs must be at least 1")
    timeout = timeout or 60.0 + (jobs + warmup) / 2_000
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
    py = [sys.executable, "-m", "bench.ceiling"]
    with tempfile.TemporaryDirectory(prefix="ffrtmp-ceiling-") as tmp:
        out = Path(tmp) / "master.json"
        procs: list[subprocess.Popen[bytes]] = []
        try:
            master = subprocess.Popen(
                [*py, "master", "--endpoint", endpoint, "--agents", str(agents),
                 "--jobs", str(jobs), "--warmup", str(warmup), "--timeout", str(timeout),
                 "--out", str(out)], env=env, stderr=subprocess.PIPE)
            procs.append(master)
            groups = [list(range(agents))] if one_process else [[i] for i in range(agents)]
            for group in groups:
                procs.append(subprocess.Popen(
                    [*py, "agent", "--endpoint", endpoint, "--slots", str(slots),
                     *(a for i in group for a in ("--name", f"ceiling{i}"))], env=env))
            try:
                _, err = master.communicate(timeout=timeout + 30)
            except subprocess.TimeoutExpired:
                raise RuntimeError("bus ceiling: the master did not finish in time") from None
            if master.returncode != 0:
                raise RuntimeError(f"bus ceiling: the master failed: "
                                   f"{err.decode(errors='replace').strip()[-500:]}")
            res = json.loads(out.read_text())
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    wall, cpu = res["wall_s"], res["cpu_s"]
    return {"rate": round(jobs / wall, 1) if wall > 0 else None,
            "master_us_per_job": round(1e6 * cpu / jobs, 2),
            "master_cpu_pct": round(100 * cpu / wall, 1) if wall > 0 else None,
            "agents": agents, "slots": slots, "jobs": jobs, "warmup_jobs": warmup,
            "wall_s": round(wall, 4), "master_cpu_s": round(cpu, 4),
            "job_body_bytes": res["job_bytes"], "transport": "tcp loopback",
            "agent_processes": 1 if one_process else agents}


def series(agents: int, slots: int, jobs: int = DEFAULT_JOBS, repeat: int = 1,
           one_process: bool = False) -> dict[str, Any]:
    """`repeat` measurements: the medians (rate, master µs/job) with min – max and each run."""
    runs = [measure(agents, slots, jobs, one_process=one_process)
            for _ in range(max(1, repeat))]
    out = dict(runs[len(runs) // 2]) if len(runs) == 1 else {
        **runs[0], "rate": statistics.median(r["rate"] for r in runs),
        "master_us_per_job": statistics.median(r["master_us_per_job"] for r in runs),
        "master_cpu_pct": statistics.median(r["master_cpu_pct"] for r in runs)}
    out["repeat"] = len(runs)
    out["rate_range"] = [min(r["rate"] for r in runs), max(r["rate"] for r in runs)]
    out["master_us_per_job_range"] = [min(r["master_us_per_job"] for r in runs),
                                      max(r["master_us_per_job"] for r in runs)]
    out["runs"] = [{k: r[k] for k in ("rate", "master_us_per_job", "wall_s")} for r in runs]
    return out


WHAT = ("raw pyzmq ROUTER/DEALER over tcp loopback with the bus codec's frames and flow control "
        "(JOB → DONE + CREDIT → DONE_ACK per turn), no database, no state machine")


def beside(report: dict[str, Any], ceiling: dict[str, Any]) -> dict[str, Any]:
    """The report's `ceiling` section: the ceiling and this run's share of it."""
    rate = report.get("completion_rate")
    us = ((report.get("processes") or {}).get("master") or {}).get("cpu_us_per_job")
    out = {**ceiling, "what": WHAT,
           "completion_pct_of_ceiling": (round(100 * rate / ceiling["rate"], 1)
                                         if rate and ceiling.get("rate") else None),
           "master_cpu_x_ceiling": (round(us / ceiling["master_us_per_job"], 2)
                                    if us and ceiling.get("master_us_per_job") else None)}
    return out


def for_run(spec: Any, report: dict[str, Any], bar: Any, jobs: int = DEFAULT_JOBS
            ) -> dict[str, Any]:
    """The `ceiling` section of a run report: measured now (after the runs), on the run's
    agents x slots; skipped (with the reason) against a --master cluster or with jobs 0."""
    if spec.target:
        return {"skipped": "the run drove a cluster given by --master: its agents, slots and "
                           "machine are not known here, so no ceiling of this machine would "
                           "describe it (run `ffrtmp bench ceiling` on the master's machine)"}
    if jobs < 1:
        return {"skipped": "--ceiling-jobs 0"}
    p = spec.profile
    bar.phase(f"bus ceiling: {jobs:,} raw pyzmq dispatch + ack on {p.agents} x {p.slots}"
              f"{' (agents in one process, as simulated)' if p.simulated else ''}")
    res = beside(report, measure(p.agents, p.slots, jobs, one_process=p.simulated))
    res["when"] = "once in this invocation, after the runs"
    bar.phase(f"completion rate = {_n(res['completion_pct_of_ceiling'])} % of the bus ceiling "
              f"({_n(res['rate'])} jobs/s); master CPU per job = "
              f"{_n(res['master_cpu_x_ceiling'], 2)} x the ceiling's "
              f"({_n(res['master_us_per_job'], 2)} µs)")
    return res


def markdown_lines(r: dict[str, Any]) -> list[str]:
    """The report.md section for a run report's `ceiling` (nothing if it has none)."""
    c = r.get("ceiling")
    if not c:
        return []
    lines = ["## Bus ceiling (same machine, same invocation)", ""]
    if c.get("skipped"):
        return [*lines, f"Not measured: {c['skipped']}", ""]
    pct, x = c.get("completion_pct_of_ceiling"), c.get("master_cpu_x_ceiling")
    lines += [
        f"Measured {c.get('when', 'in this invocation')}: {c['jobs']:,} jobs on "
        f"{c['agents']} x {c['slots']} slots ({_layout(c)}), {WHAT}.", "",
        "| figure | this run (median) | bus ceiling |", "|---|---|---|",
        f"| completion rate, jobs/s | {_n(r.get('completion_rate'))} | {_n(c.get('rate'))} |",
        f"| master CPU, µs per job | "
        f"{_n(((r.get('processes') or {}).get('master') or {}).get('cpu_us_per_job'))} | "
        f"{_n(c.get('master_us_per_job'))} |", "",
        f"- completion rate = **{_n(pct)} % of the bus ceiling**",
        f"- master CPU per job = **{_n(x, 2)} × the ceiling's**", ""]
    return lines


def _layout(c: dict[str, Any]) -> str:
    if c.get("agent_processes") == 1 and c.get("agents", 1) > 1:
        return "every agent connection in one process, as the simulated agents are"
    return "each agent a process of its own, as in the run"


def _n(x: Any, digits: int = 1) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


# ---- `ffrtmp bench ceiling` ------------------------------------------------------------------


def run_mode(out: Path, agents: int, slots: int, jobs: int, repeat: int,
             machine: dict[str, Any]) -> dict[str, Path]:
    """The mode of its own: report.json + report.md of `repeat` ceiling measurements."""
    from bench.report import write_plain

    res = series(agents, slots, jobs, repeat)
    doc = {"tool": "ffrtmp bench ceiling", "schema": 1,
           "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": machine, "what": WHAT, **res}
    m = machine
    md = "\n".join([
        "# ffrtmp bench ceiling: the bus alone", "",
        f"{doc['created_at']} · {m['cpus']} CPUs ({m['cpu_model']}) · Python {m['python']}, "
        f"pyzmq {m['pyzmq']} / libzmq {m['libzmq']}", "",
        f"{WHAT}. {jobs:,} measured jobs per run after {WARMUP:,} warm-up jobs, "
        f"{agents} agents x {slots} slots ({_layout(res)}; credit window = slots), "
        f"{res['repeat']} run(s): "
        "medians, min – max beside them.", "",
        "| figure | median | min – max |", "|---|---|---|",
        f"| dispatch + ack rate, jobs/s | {_n(res['rate'])} | {_n(res['rate_range'][0])} – "
        f"{_n(res['rate_range'][1])} |",
        f"| master CPU, µs per job | {_n(res['master_us_per_job'], 2)} | "
        f"{_n(res['master_us_per_job_range'][0], 2)} – "
        f"{_n(res['master_us_per_job_range'][1], 2)} |",
        f"| master CPU, % of one core | {_n(res['master_cpu_pct'])} | |",
        f"| JOB body, bytes | {res['job_body_bytes']} | |", ""])
    return write_plain(out, doc, md)


def main(argv: list[str] | None = None) -> int:
    """The master and agent roles (`python -m bench.ceiling master|agent ...`)."""
    p = argparse.ArgumentParser(prog="python -m bench.ceiling")
    p.add_argument("role", choices=("master", "agent"))
    p.add_argument("--endpoint", required=True)
    p.add_argument("--agents", type=int, default=1)
    p.add_argument("--slots", type=int, default=1)
    p.add_argument("--name", action="append", default=None,
                   help="agent: a connection of this name (repeat for more in one process)")
    p.add_argument("--jobs", type=int, default=DEFAULT_JOBS)
    p.add_argument("--warmup", type=int, default=WARMUP)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.role == "agent":
        run_agent(a.endpoint, a.name or ["ceiling0"], a.slots)
        return 0
    res = run_master(a.endpoint, a.agents, a.jobs, a.warmup, a.timeout)
    text = json.dumps(res)
    if a.out:
        Path(a.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
