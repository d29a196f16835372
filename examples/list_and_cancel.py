#!/usr/bin/env python3
"""List queued and running jobs and cancel some by id, using nothing but pyzmq and msgpack.

    python examples/list_and_cancel.py [ID ...] [--all] [--states queued,running] [--grace 30]

Without ids (and without --all) it only lists. Jobs whose CANCEL result is `cancelling` (they
were running) are followed on the events socket, with a slow GET as a safety net, until final.
Exit status: 0 all done, 2 ERROR reply or timeout. Follows docs/protocol.md; imports no ffrtmp.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import msgpack
import zmq

HEADER = b"FFR\x01\x00"  # "FFR", major 1, minor 0
TERMINAL = {"completed", "failed", "timed_out", "cancelled"}


class RequestFailed(Exception):
    """An ERROR reply, or no reply in time."""


class Master:
    """Request/reply over one DEALER, replies matched by rid; all within one deadline."""

    def __init__(self, ctx: zmq.Context, endpoint: str, timeout: float) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.connect(endpoint)
        self.deadline = time.monotonic() + timeout
        self.rid = 0

    def request(self, command: str, body: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return its reply body; raises RequestFailed."""
        self.rid += 1
        payload = msgpack.packb({**body, "rid": self.rid}, use_bin_type=True)
        self.sock.send_multipart([HEADER, command.encode("ascii"), payload])
        while (left := self.deadline - time.monotonic()) > 0:
            if not self.sock.poll(max(1, int(left * 1000))):
                break
            frames = self.sock.recv_multipart()
            if len(frames) != 3 or frames[0][:4] != HEADER[:4]:
                continue  # not protocol 1.x
            reply = msgpack.unpackb(frames[2], raw=False)
            if not isinstance(reply, dict) or reply.get("rid") != self.rid:
                continue  # a late reply to an earlier request
            if frames[1] == b"ERROR":
                raise RequestFailed(f"{command}: error {reply.get('code')}: {reply.get('text')}")
            return reply
        raise RequestFailed(f"timeout: no reply to {command}")


def main() -> int:
    ap = argparse.ArgumentParser(description="List queued/running jobs and cancel some by id.")
    ap.add_argument("ids", nargs="*", type=int, help="job ids to cancel")
    ap.add_argument("--all", action="store_true", help="cancel every listed job")
    ap.add_argument("--states", default="queued,running", help="comma-separated states to list")
    ap.add_argument("--limit", type=int, default=100, help="jobs to list (newest first)")
    ap.add_argument("--grace", type=float, default=30.0, help="SIGTERM-to-SIGKILL grace, s")
    ap.add_argument("--clients", default="tcp://127.0.0.1:5556", help="master client endpoint")
    ap.add_argument("--events", default="tcp://127.0.0.1:5557", help="master events endpoint")
    ap.add_argument("--timeout", type=float, default=30.0, help="overall limit, s")
    args = ap.parse_args()

    ctx = zmq.Context()
    master = Master(ctx, args.clients, args.timeout)
    try:
        states = [s for s in args.states.split(",") if s]
        jobs = master.request("LIST", {"states": states, "limit": args.limit})["jobs"]
        print(f"listed {len(jobs)} jobs in {','.join(states)}")
        for job in jobs:
            print(f"job {job['id']} {job['state']} {job['scenario']} "
                  f"priority={job['priority']} agent={job['agent'] or '-'}")
        ids = list(args.ids) + ([job["id"] for job in jobs] if args.all else [])
        if not ids:
            return 0
        sub = ctx.socket(zmq.SUB)  # subscribe before CANCEL so no final state slips by
        for job_id in ids:
            sub.setsockopt(zmq.SUBSCRIBE, f"job.{job_id}.state".encode())
        sub.connect(args.events)
        reply = master.request("CANCEL", {"ids": ids, "grace_s": args.grace})
        for item in reply["results"]:
            print(f"cancel {item['id']} {item['result']}")
        waiting = {i["id"] for i in reply["results"] if i["result"] == "cancelling"}
        while waiting:
            if time.monotonic() >= master.deadline:
                raise RequestFailed(f"timeout: still cancelling {sorted(waiting)}")
            if sub.poll(500):  # a STATE event: [topic, header, command, body]
                body = msgpack.unpackb(sub.recv_multipart()[3], raw=False)
                finals = [body] if body.get("state") in TERMINAL else []
            else:  # PUB may drop events: ask
                finals = [j for j in master.request("GET", {"ids": sorted(waiting)})["jobs"]
                          if j["state"] in TERMINAL]
            for job in finals:
                if job["id"] in waiting:
                    waiting.discard(job["id"])
                    print(f"job {job['id']} {job['state']} reason={job['reason']}")
    except RequestFailed as e:
        print(e)
        return 2
    finally:
        ctx.destroy(linger=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
