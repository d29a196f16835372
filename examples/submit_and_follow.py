#!/usr/bin/env python3
"""Submit N jobs and follow them to the end, using nothing but pyzmq and msgpack.

    python examples/submit_and_follow.py [SCENARIO] [--param seconds=0.2] [-n 3] [--timeout 60]

Exit status: 0 all jobs completed, 1 some ended otherwise, 2 ERROR reply or timeout.
Everything here follows docs/protocol.md; nothing is imported from ffrtmp.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import Any

import msgpack
import zmq

HEADER = b"FFR\x01\x00"  # "FFR", major 1, minor 0
TERMINAL = {"completed", "failed", "timed_out", "cancelled"}


def pack(command: str, body: dict[str, Any]) -> list[bytes]:
    """The three frames of a message: header, command, msgpack map."""
    return [HEADER, command.encode("ascii"), msgpack.packb(body, use_bin_type=True)]


def unpack(frames: list[bytes]) -> tuple[str, dict[str, Any]] | None:
    """(command, body) of a well-formed 1.x message, else None."""
    if len(frames) != 3 or len(frames[0]) != 5 or frames[0][:4] != HEADER[:4]:
        return None
    body = msgpack.unpackb(frames[2], raw=False)
    return (frames[1].decode("ascii"), body) if isinstance(body, dict) else None


def param(text: str) -> tuple[str, Any]:
    """KEY=VALUE, VALUE read as JSON if it is JSON (numbers, true, null), else as a string."""
    key, _, value = text.partition("=")
    with contextlib.suppress(ValueError):
        return key, json.loads(value)
    return key, value


def main() -> int:
    ap = argparse.ArgumentParser(description="Submit N jobs and follow them to the end.")
    ap.add_argument("scenario", nargs="?", default="sleep")
    ap.add_argument("--param", type=param, action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("-n", "--count", type=int, default=3, help="jobs to submit")
    ap.add_argument("--clients", default="tcp://127.0.0.1:5556", help="master client endpoint")
    ap.add_argument("--events", default="tcp://127.0.0.1:5557", help="master events endpoint")
    ap.add_argument("--timeout", type=float, default=60.0, help="overall limit, s")
    ap.add_argument("--poll", type=float, default=1.0, help="GET interval, s")
    args = ap.parse_args()
    params = dict(args.param) or ({"seconds": 0.2} if args.scenario == "sleep" else {})
    specs = [{"scenario": args.scenario, "params": params}] * args.count

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"job.")  # all jobs, before SUBMIT: our ids are not known yet
    sub.connect(args.events)
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(args.clients)
    poller = zmq.Poller()
    poller.register(sub, zmq.POLLIN)
    poller.register(dealer, zmq.POLLIN)
    try:
        return follow(args, specs, sub, dealer, poller)
    finally:
        ctx.destroy(linger=0)


def follow(args: argparse.Namespace, specs: list[dict[str, Any]], sub: zmq.Socket,
           dealer: zmq.Socket, poller: zmq.Poller) -> int:
    deadline = time.monotonic() + args.timeout
    rid = 1  # the SUBMIT's; every later request (GET) gets the next number
    dealer.send_multipart(pack("SUBMIT", {"rid": rid, "specs": specs}))
    states: dict[int, str] = {}  # our jobs once SUBMITTED arrives
    next_get = deadline
    while not states or any(s not in TERMINAL for s in states.values()):
        now = time.monotonic()
        if now >= deadline:
            pending = sorted(i for i, s in states.items() if s not in TERMINAL)
            print(f"timeout after {args.timeout:g}s; unfinished: {pending or 'no reply'}")
            return 2
        if now >= next_get:  # PUB drops events for slow subscribers: also poll GET, slowly
            rid += 1
            ids = [i for i, s in states.items() if s not in TERMINAL]
            dealer.send_multipart(pack("GET", {"rid": rid, "ids": ids}))
            next_get = now + args.poll
        for sock, _ in poller.poll(max(1, int((min(deadline, next_get) - now) * 1000))):
            frames = sock.recv_multipart()
            if sock is sub:  # [topic, header, command, body]; skip job.<id>.progress
                frames = frames[1:] if frames[0].endswith(b".state") else []
            if (msg := unpack(frames)) is None:
                continue
            command, body = msg
            if command == "ERROR" and body.get("rid") in (1, rid):
                print(f"error {body.get('code')}: {body.get('text')}")
                return 2
            if command == "SUBMITTED" and body.get("rid") == 1:
                states = {i: "queued" for i in body["ids"]}
                print("submitted", " ".join(map(str, body["ids"])))
                next_get = time.monotonic()  # catch up on what the events told before this
            elif command == "REPLY" and body.get("rid") == rid:
                for job in body["jobs"]:
                    update(states, job["id"], job["state"], job.get("agent"), "get")
            elif command == "STATE":
                update(states, body["id"], body["state"], body.get("agent"), "event")
    bad = {i: s for i, s in states.items() if s != "completed"}
    print(f"done: {len(states) - len(bad)} of {len(states)} completed"
          + (f"; others: {bad}" if bad else ""))
    return 1 if bad else 0


def update(states: dict[int, str], job_id: int, state: str, agent: Any, via: str) -> None:
    """Record and print a job's new state (events and GET replies may repeat or lag)."""
    if job_id in states and states[job_id] not in TERMINAL and states[job_id] != state:
        states[job_id] = state
        print(f"job {job_id} {state} agent={agent or '-'} via={via}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
