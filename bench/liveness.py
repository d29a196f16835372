"""Liveness on a saturated host: is a busy agent ever declared lost?

    python -m bench.liveness --minutes 10

A master (SQLite, heartbeat 1 s x liveness 3, the defaults) and one real agent whose slots are
kept full with 2 CPU-saturating `burn` jobs and 1 ffmpeg encode per core for the whole run.
At the end it reads the agent's loop figures (`ffrtmp_agent_loop_worst_turn_seconds`, turns
over 100 ms from `ffrtmp_agent_loop_turn_seconds`), the host's load, and every agent loss or
`agent_lost` requeue the master recorded. Figures: docs/PERFORMANCE.md "Liveness under load".
A measurement tool: it prints; it does not assert.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
import time
import urllib.request

from bench.cluster import LocalCluster
from bus.client import Client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def _value(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - a measurement tool
    p = argparse.ArgumentParser(prog="python -m bench.liveness")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--encode", default="720p-h264", help="scenario of the encode jobs")
    args = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    burns, encodes = 2 * cores, cores
    port = _free_port()
    cluster = LocalCluster(None, agents=1, slots=burns + encodes, agent_args=[
        "--metrics", f"127.0.0.1:{port}", "--cgroup", "none", "--limits", "best-effort"])
    cluster.start()
    end = time.monotonic() + args.minutes * 60
    ids: list[int] = []
    try:
        with Client(cluster.clients_ep, timeout=10) as client:
            def top_up() -> None:
                live = [j for j in client.get(ids)[0] if j["state"] in ("queued", "assigned",
                                                                       "running")] if ids else []
                want_burn = burns - sum(1 for j in live if j["scenario"] == "burn")
                want_enc = encodes - sum(1 for j in live if j["scenario"] == args.encode)
                specs = [{"scenario": "burn", "params": {"cpu_seconds": 30}}] * want_burn + \
                    [{"scenario": args.encode, "input": "testsrc:duration=60"}] * want_enc
                if specs:
                    ids.extend(client.submit(specs))

            loads = []
            while time.monotonic() < end:
                top_up()
                loads.append(os.getloadavg()[0])
                time.sleep(1.0)  # the sampling period of a tool
            text = _scrape(port)
            jobs = [j for i in range(0, len(ids), 1000)
                    for j in client.get(ids[i:i + 1000], events=True)[0]]
        lost = sum(1 for j in jobs for e in j.get("events", []) if e.get("reason") == "agent_lost")
        turns = _value(text, "ffrtmp_agent_loop_turn_seconds_count")
        under = _value(text, "ffrtmp_agent_loop_turn_seconds_bucket", '{le="0.1"}')
        master_log = (cluster.workdir / "master.log").read_text(errors="replace")
        print(f"{args.minutes:g} min, {cores} cores, {burns} burn + {encodes} {args.encode} "
              f"kept running ({len(ids)} jobs submitted), load1 median "
              f"{sorted(loads)[len(loads) // 2]:.1f}")
        print(f"agent loop: worst turn {_value(text, 'ffrtmp_agent_loop_worst_turn_seconds'):.3f}"
              f" s, {turns - under:.0f} of {turns:.0f} turns over 100 ms")
        print(f"master: {master_log.count(': lost')} agent losses logged, {lost} agent_lost "
              "requeues in the audit trail")
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
