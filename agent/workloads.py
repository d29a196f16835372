"""Job spec -> how to run it: in-agent (noop) or the argv of a supervised child.

A synthetic child must cost next to nothing to start, or the benchmarks measure interpreter
start-up instead of the system (`python -m agent.synthetic` took ~39 ms of CPU per child: site
hooks of the editable install, argparse, the `agent` package). So:

- `sleep` is coreutils `sleep` exec'd under the name `agent.synthetic` (`runner.named_argv`:
  a `bash -c 'exec -a ...'` wrapper, which a bash standby runs as its own exec): one process,
  ~1 ms, SIGTERM ignored by `trap ''` if asked (SIG_IGN survives exec), and named in its command
  line like every synthetic workload (ps, tests).
- `burn` and `hog` (and `sleep` where bash or sleep is missing) run agent/synthetic.py as a
  script with an isolated interpreter (`-I -S`: no site-packages, no environment, ~10 ms);
  `-X agent.synthetic` names it (the interpreter ignores unknown -X options).
"""

from __future__ import annotations

import functools
import math
import shutil
import sys
from pathlib import Path
from typing import Any

from agent.runner import named_argv
from bus.vocab import SYNTHETIC, WORKLOADS  # noqa: F401  (re-exported)


class UnsupportedJob(Exception):
    """A spec this agent cannot run; the agent REJECTs it with this reason."""


def _number(name: str, value: Any, positive: bool = False) -> float:
    """A finite number >= 0 (> 0 if positive); UnsupportedJob naming the field otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise UnsupportedJob(f"{name}: must be a finite number {'>' if positive else '>='} 0, "
                             f"got {value!r:.40}")
    return float(value)


def check_spec(spec: dict[str, Any]) -> None:
    """The shape of a spec the agent relies on (params, timeout_s, resource_limits), checked
    before anything reads it: UnsupportedJob (-> REJECT) naming the field, never a crash."""
    for key in ("params", "resource_limits"):
        if spec.get(key) is not None and not isinstance(spec[key], dict):
            raise UnsupportedJob(f"{key}: must be a map, got {type(spec[key]).__name__}")
    if spec.get("timeout_s") is not None:
        _number("timeout_s", spec["timeout_s"], positive=True)
    limits = spec.get("resource_limits") or {}
    for key in ("max_cpu_percent", "max_memory_mb", "max_disk_mb"):
        if limits.get(key) is not None:
            _number(f"resource_limits.{key}", limits[key])


def build_argv(spec: dict[str, Any]) -> list[str] | None:
    """The child argv for a spec, or None for in-agent work (noop); UnsupportedJob if invalid."""
    scenario = spec.get("scenario")
    params = spec.get("params")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise UnsupportedJob(f"params: must be a map, got {type(params).__name__}")
    if scenario == "noop":
        return None
    if scenario not in SYNTHETIC:
        raise UnsupportedJob(f"scenario {scenario!r:.60} not supported by this agent")

    def knob(key: str, default: float) -> float:
        return _number(f"params.{key}", params.get(key, default))

    if scenario == "sleep":
        seconds, ignore_term = knob("seconds", 1.0), bool(params.get("ignore_term"))
        sleep = _sleep()
        named = named_argv(NAME, [sleep, repr(seconds)], ignore_term) if sleep else None
        if named is not None:
            return named
        return python_argv("sleep", "--seconds", repr(seconds),
                           *(["--ignore-term"] if ignore_term else []))
    if scenario == "burn":
        return python_argv("burn", "--cpu-seconds", repr(knob("cpu_seconds", 1.0)))
    return python_argv("hog", "--mb", str(int(knob("mb", 64))),
                       "--seconds", repr(knob("seconds", 1.0)))


NAME = "agent.synthetic"  # how a synthetic workload appears in its command line
SCRIPT = str(Path(__file__).with_name("synthetic.py"))


def python_argv(*args: str) -> list[str]:
    """The argv of agent/synthetic.py run in an isolated interpreter with these arguments."""
    return [sys.executable, "-I", "-S", "-X", NAME, SCRIPT, *args]


@functools.cache
def _sleep() -> str | None:
    """coreutils sleep, if installed (resolved once per agent)."""
    return shutil.which("sleep")
