"""Job spec -> how to run it: in-agent (noop) or the argv of a supervised child."""

from __future__ import annotations

import math
import sys
from typing import Any

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

    argv = [sys.executable, "-m", "agent.synthetic", scenario]
    if scenario == "sleep":
        argv += ["--seconds", str(knob("seconds", 1.0))]
        if params.get("ignore_term"):
            argv.append("--ignore-term")
    elif scenario == "burn":
        argv += ["--cpu-seconds", str(knob("cpu_seconds", 1.0))]
    else:
        argv += ["--mb", str(int(knob("mb", 64))), "--seconds", str(knob("seconds", 1.0))]
    return argv
