"""Synthetic process workloads (sleep, burn, hog), run as real children by the agent.

Started as a plain script with an isolated interpreter (`python -I -S .../synthetic.py burn
--cpu-seconds 1`, see agent/workloads.py), so it must import nothing but the few stdlib modules
below: no site-packages, no argparse, no `agent` package. `python -m agent.synthetic ...` works
as well (same arguments).

    sleep [--seconds S] [--ignore-term]    sleep S seconds (SIGTERM ignored if asked)
    burn [--cpu-seconds C]                 spin until the process has used C s of CPU
    hog [--mb M] [--seconds S]             allocate and touch M MiB, hold it S seconds
"""

import os
import sys
import time

USAGE = ("usage: synthetic.py {sleep,burn,hog} [--seconds S] [--ignore-term] "
         "[--cpu-seconds C] [--mb M]")
# option -> (name, type); flags have type None
OPTIONS = {"--seconds": ("seconds", float), "--cpu-seconds": ("cpu_seconds", float),
           "--mb": ("mb", int), "--ignore-term": ("ignore_term", None)}


def _sleep(seconds: float, ignore_term: bool) -> int:
    if ignore_term:
        import signal  # only here: it imports enum, which costs more than the rest of start-up

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


class UsageError(Exception):
    """A command line this script does not understand (exit status 2, like argparse)."""


def parse(argv: list[str]) -> tuple[str, dict]:
    """(workload, options) from the arguments after the program name."""
    if not argv or argv[0] not in ("sleep", "burn", "hog"):
        raise UsageError("the workload must be one of sleep, burn, hog")
    opts: dict = {"seconds": 0.0, "cpu_seconds": 1.0, "mb": 64, "ignore_term": False}
    args = iter(argv[1:])
    for arg in args:
        key, eq, value = arg.partition("=")
        if key not in OPTIONS:
            raise UsageError(f"unrecognized argument: {arg}")
        name, kind = OPTIONS[key]
        if kind is None:
            if eq:
                raise UsageError(f"{key} takes no value")
            opts[name] = True
            continue
        if not eq:
            following = next(args, None)
            if following is None:
                raise UsageError(f"{key} needs a value")
            value = following
        try:
            opts[name] = kind(value)
        except ValueError:
            raise UsageError(f"{key}: invalid {kind.__name__} value: {value!r}") from None
    return argv[0], opts


def main(argv: list[str] | None = None) -> int:
    """Run one synthetic workload; exit status 0 on success, 2 for a bad command line."""
    try:
        workload, opts = parse(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(f"{USAGE}\nsynthetic.py: error: {e}", file=sys.stderr)
        return 2
    os.environ.pop("PYTHONSTARTUP", None)
    if workload == "sleep":
        return _sleep(opts["seconds"], opts["ignore_term"])
    if workload == "burn":
        return _burn(opts["cpu_seconds"])
    return _hog(opts["mb"], opts["seconds"])


if __name__ == "__main__":
    sys.exit(main())
