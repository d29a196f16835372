"""Synthetic process workloads (sleep, burn, hog), run as real children by the agent."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def _sleep(seconds: float, ignore_term: bool) -> int:
    if ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.5))  # the workload itself: sleeping is what it is for
    return 0


def _burn(cpu_seconds: float) -> int:
    """Spin until this process has used cpu_seconds of CPU time."""
    x = 0
    while time.process_time() < cpu_seconds:
        for i in range(10_000):
            x ^= i
    return 0


def _hog(mb: int, seconds: float) -> int:
    """Allocate and touch mb MiB, then hold it for seconds."""
    block = bytearray(mb * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    _sleep(seconds, False)
    return 0 if block[0] == 1 else 1


def main(argv: list[str] | None = None) -> int:
    """Run one synthetic workload; exit status 0 on success."""
    parser = argparse.ArgumentParser(prog="python -m agent.synthetic")
    parser.add_argument("workload", choices=["sleep", "burn", "hog"])
    parser.add_argument("--seconds", type=float, default=0.0)
    parser.add_argument("--cpu-seconds", type=float, default=1.0)
    parser.add_argument("--mb", type=int, default=64)
    parser.add_argument("--ignore-term", action="store_true")
    args = parser.parse_args(argv)
    os.environ.pop("PYTHONSTARTUP", None)
    if args.workload == "sleep":
        return _sleep(args.seconds, args.ignore_term)
    if args.workload == "burn":
        return _burn(args.cpu_seconds)
    return _hog(args.mb, args.seconds)


if __name__ == "__main__":
    sys.exit(main())
