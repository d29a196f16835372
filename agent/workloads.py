"""Job spec -> how to run it: in-agent (noop) or the argv of a supervised child."""

from __future__ import annotations

import sys
from typing import Any

SYNTHETIC = ("sleep", "burn", "hog")
WORKLOADS = ("noop", *SYNTHETIC)


class UnsupportedJob(Exception):
    """A spec this agent cannot run; the agent REJECTs it with this reason."""


def build_argv(spec: dict[str, Any]) -> list[str] | None:
    """The child argv for a spec, or None for in-agent work (noop)."""
    scenario = spec.get("scenario")
    params = spec.get("params") or {}
    if scenario == "noop":
        return None
    if scenario not in SYNTHETIC:
        raise UnsupportedJob(f"scenario {scenario!r} not supported by this agent")
    argv = [sys.executable, "-m", "agent.synthetic", scenario]
    if scenario == "sleep":
        argv += ["--seconds", str(float(params.get("seconds", 1.0)))]
        if params.get("ignore_term"):
            argv.append("--ignore-term")
    elif scenario == "burn":
        argv += ["--cpu-seconds", str(float(params.get("cpu_seconds", 1.0)))]
    else:
        argv += ["--mb", str(int(params.get("mb", 64))),
                 "--seconds", str(float(params.get("seconds", 1.0)))]
    return argv
