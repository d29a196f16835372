"""Job spec validation at submit: a precise error naming the field, or a normalized spec."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from master.scheduler import PRIORITIES

MAX_SPEC_BYTES = 64 * 1024


class SpecError(ValueError):
    """An invalid spec; the message names the field, e.g. 'priority: must be one of …'."""


# Synthetic workloads: name -> {param: (min, max)}. They run through the same path as ffmpeg.
WORKLOADS: dict[str, dict[str, tuple[float, float]]] = {
    "noop": {},
    "sleep": {"seconds": (0.0, 86_400.0), "ignore_term": (0, 1)},
    "burn": {"cpu_seconds": (0.0, 86_400.0)},
    "hog": {"mb": (1.0, 1_048_576.0), "seconds": (0.0, 86_400.0)},
}

TOP_KEYS = frozenset(
    {"scenario", "input", "output", "params", "priority", "timeout_s", "max_attempts",
     "resource_limits"}
)
LIMITS: dict[str, tuple[int, int]] = {
    "max_cpu_percent": (1, 25_600),
    "max_memory_mb": (16, 1_048_576),
    "max_disk_mb": (1, 10_485_760),
}


@dataclass(frozen=True)
class Validated:
    """A normalized spec plus what the scheduler needs to place it."""

    spec: dict[str, Any]
    priority: int
    requires: str


# A scenario validator checks input/output/params and returns the capability it requires.
ScenarioCheck = Callable[[dict[str, Any]], str]


def _number(name: str, value: Any, lo: float, hi: float, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(f"{name}: must be a number, got {type(value).__name__}")
    if integer and not isinstance(value, int):
        raise SpecError(f"{name}: must be a whole number")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise SpecError(f"{name}: must be between {lo:g} and {hi:g}, got {value!r}")
    return value


def _check_workload(spec: dict[str, Any]) -> str:
    name = spec["scenario"]
    bounds = WORKLOADS[name]
    for key, value in spec["params"].items():
        if key not in bounds:
            allowed = ", ".join(sorted(bounds)) or "none"
            raise SpecError(f"params.{key}: unknown parameter for {name} (allowed: {allowed})")
        _number(f"params.{key}", value, *bounds[key])
    for key in ("input", "output"):
        if spec[key] is not None:
            raise SpecError(f"{key}: the {name} workload takes no {key}")
    return f"workload:{name}"


def validate_spec(raw: Any, scenarios: dict[str, ScenarioCheck] | None = None) -> Validated:
    """Check one submitted spec; raises SpecError naming the first bad field."""
    if not isinstance(raw, dict):
        raise SpecError(f"spec must be a map, got {type(raw).__name__}")
    if _has_nul(raw):
        raise SpecError("spec: strings must not contain NUL characters")
    size = len(msgpack.packb(raw))
    if size > MAX_SPEC_BYTES:  # a JOB must stay far below the agents' 1 MiB message cap
        raise SpecError(f"spec is {size} bytes packed; at most {MAX_SPEC_BYTES}")
    unknown = sorted(k for k in raw if k not in TOP_KEYS)
    if unknown:
        raise SpecError(f"{unknown[0]}: unknown field (allowed: {', '.join(sorted(TOP_KEYS))})")
    scenario = raw.get("scenario")
    if not isinstance(scenario, str) or not scenario:
        raise SpecError("scenario: required, a scenario or workload name")
    checks: dict[str, ScenarioCheck] = {w: _check_workload for w in WORKLOADS}
    checks.update(scenarios or {})
    if scenario not in checks:
        known = ", ".join(sorted(checks))
        raise SpecError(f"scenario: unknown scenario {scenario!r} (known: {known})")
    priority = raw.get("priority", "normal")
    if priority not in PRIORITIES:
        raise SpecError("priority: must be one of high, normal, low")
    params = raw.get("params") or {}
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise SpecError("params: must be a map of names to values")
    for key in ("input", "output"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise SpecError(f"{key}: must be a string")
    timeout = raw.get("timeout_s")
    if timeout is not None:
        _number("timeout_s", timeout, 0.001, 604_800.0)
    max_attempts = raw.get("max_attempts", 3)
    _number("max_attempts", max_attempts, 1, 100, integer=True)
    limits = raw.get("resource_limits") or {}
    if not isinstance(limits, dict):
        raise SpecError("resource_limits: must be a map")
    for key, value in limits.items():
        if key not in LIMITS:
            raise SpecError(
                f"resource_limits.{key}: unknown limit (allowed: {', '.join(sorted(LIMITS))})"
            )
        _number(f"resource_limits.{key}", value, *LIMITS[key], integer=True)
    spec = {
        "scenario": scenario,
        "input": raw.get("input"),
        "output": raw.get("output"),
        "params": dict(params),
        "priority": priority,
        "timeout_s": timeout,
        "max_attempts": max_attempts,
        "resource_limits": dict(limits),
    }
    requires = checks[scenario](spec) + limit_requirements(spec["resource_limits"])
    return Validated(spec, PRIORITIES[priority], requires)


def limit_requirements(limits: dict[str, Any]) -> str:
    """What resource_limits add to a requirement ('+'-joined capabilities, docs/protocol.md).

    `limits`: an agent that holds them (cgroups, or `--limits best-effort`); `cpu>=PCT` and
    `mem>=MB`: floors on the agent's advertised size, so a job never goes where it cannot fit.
    """
    cpu, mem = limits.get("max_cpu_percent"), limits.get("max_memory_mb")
    parts = ["limits"] if cpu is not None or mem is not None else []
    if cpu is not None:
        parts.append(f"cpu>={cpu}")
    if mem is not None:
        parts.append(f"mem>={mem}")
    return "".join("+" + p for p in parts)


def _has_nul(value: Any) -> bool:
    """True if any string (or key) in a nested value holds a NUL (PostgreSQL text refuses it)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False
