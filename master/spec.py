"""Job spec validation at submit: a precise error naming the field, or a normalized spec."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import Any

import msgpack

from bus.scenarios import OUTPUT_SCHEMES, ScenarioError, check_relative, check_url
from master.scheduler import PRIORITIES

MAX_SPEC_BYTES = 64 * 1024


class SpecError(ValueError):
    """An invalid spec; the message names the field, e.g. 'priority: must be one of …'."""

    code = "invalid_spec"  # the ERROR code a client gets


class SpecTooLarge(SpecError):
    """A spec over MAX_SPEC_BYTES packed: a size limit, not a field's content."""

    code = "too_large"


# Synthetic workloads: name -> {param: (min, max)}. They run through the same path as ffmpeg.
WORKLOADS: dict[str, dict[str, tuple[float, float]]] = {
    "noop": {},
    "sleep": {"seconds": (0.0, 86_400.0), "ignore_term": (0, 1)},
    "burn": {"cpu_seconds": (0.0, 86_400.0)},
    "hog": {"mb": (1.0, 1_048_576.0), "seconds": (0.0, 86_400.0)},
}

TOP_KEYS = frozenset(
    {"scenario", "input", "output", "params", "priority", "timeout_s", "max_attempts",
     "resource_limits", "overwrite", "retry_timeouts"}
)
# Keys only the master writes into a stored spec (a client sending one gets "unknown field"):
# `preset`, the resolved scenario; `output_template`, the output as submitted when it held
# {id}/{n} (the stored `output` is filled in). Agents ignore `output_template`.
OUTPUT_TEMPLATE = "output_template"
MASTER_KEYS = frozenset({"preset", OUTPUT_TEMPLATE})
# Output templates: {id} is the job id, {n} the spec's index in its SUBMIT (0-based).
TEMPLATE = re.compile(r"\{(id|n)\}")
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


def fmt_number(x: float) -> str:
    """A bound as people write it: 1048576, not 1.04858e+06; 0.001 stays 0.001."""
    if isinstance(x, int) or (math.isfinite(x) and x.is_integer()):
        return str(int(x))
    return repr(x)


def _number(name: str, value: Any, lo: float, hi: float, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(f"{name}: must be a number, got {type(value).__name__}")
    if integer and not isinstance(value, int):
        raise SpecError(f"{name}: must be a whole number")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise SpecError(f"{name}: must be between {fmt_number(lo)} and {fmt_number(hi)}, "
                        f"got {value!r}")
    return value


def _flag(name: str, value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise SpecError(f"{name}: must be true or false, got {type(value).__name__}")
    return value


def _check_template(output: str) -> None:
    """Braces in an output only as {id} or {n}."""
    rest = TEMPLATE.sub("", output)
    if "{" in rest or "}" in rest:
        bad = re.search(r"\{[^{}/]{0,20}\}?|\}", rest)
        token = bad.group() if bad else "{"
        raise SpecError(f"output: only {{id}} (the job id) and {{n}} (the spec's index in the "
                        f"SUBMIT) may appear in braces, got {token!r}")


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


def validate_spec(raw: Any, scenarios: dict[str, ScenarioCheck] | None = None,
                  packed: bytes | None = None) -> Validated:
    """Check one submitted spec; raises SpecError naming the first bad field. `packed`:
    msgpack.packb(raw), if the caller has it already."""
    if not isinstance(raw, dict):
        raise SpecError(f"spec must be a map, got {type(raw).__name__}")
    if _has_nul(raw):
        raise SpecError("spec: strings must not contain NUL characters")
    size = len(packed if packed is not None else msgpack.packb(raw))
    if size > MAX_SPEC_BYTES:  # a JOB must stay far below the agents' 1 MiB message cap
        raise SpecTooLarge(f"spec is {size} bytes packed; at most {MAX_SPEC_BYTES}")
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
    if raw.get("output") is not None:
        _check_template(raw["output"])
    overwrite = _flag("overwrite", raw.get("overwrite"))
    retry_timeouts = _flag("retry_timeouts", raw.get("retry_timeouts"))
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
        "overwrite": overwrite,
        "retry_timeouts": retry_timeouts,
    }
    requires = checks[scenario](spec) + limit_requirements(spec["resource_limits"])
    return Validated(spec, PRIORITIES[priority], requires)


def expand_outputs(checked: list[Validated], first_id: int) -> list[Validated]:
    """The specs of one SUBMIT with their output templates filled in (job ids are allocated
    in spec order from first_id); raises SpecError("specs[i].output: ...") on a collision.

    A filled-in spec keeps its template under `output_template` (see `as_submitted`). The
    given specs are never modified: they are what an idempotent replay is compared with.
    Two specs collide when they would write one file (paths compared normalized, a nil output
    as the agent's default `job-<id>.<ext>`) or push to one URL.
    """
    seen: dict[str, int] = {}
    out: list[Validated] = []
    for n, v in enumerate(checked):
        job_id = first_id + n
        output = v.spec.get("output")
        if isinstance(output, str) and TEMPLATE.search(output):
            filled = fill_template(output, job_id, n)
            try:  # the filled-in output within the path and URL bounds too
                if filled.startswith(OUTPUT_SCHEMES_PREFIXES):
                    check_url("output", filled, OUTPUT_SCHEMES)
                else:
                    check_relative("output", filled)
            except ScenarioError as e:
                raise SpecError(f"specs[{n}].{e}") from e
            v = replace(v, spec={**v.spec, "output": filled, OUTPUT_TEMPLATE: output})
            output = filled
        key = _output_key(v.spec, job_id)
        if key is not None:
            if key in seen:
                raise SpecError(f"specs[{n}].output: same output as specs[{seen[key]}] "
                                f"({key!r}); use {{id}} or {{n}} in the output")
            seen[key] = n
        out.append(v)
    return out


OUTPUT_SCHEMES_PREFIXES = tuple(f"{s}://" for s in OUTPUT_SCHEMES)


def fill_template(template: str, job_id: int, n: int) -> str:
    """An output template with {id} and {n} replaced."""
    values = {"id": str(job_id), "n": str(n)}
    return TEMPLATE.sub(lambda m: values[m.group(1)], template)


def _output_key(spec: dict[str, Any], job_id: int) -> str | None:
    """What a job writes to, for collisions: a normalized relative path, a URL, or None."""
    output = spec.get("output")
    preset = spec.get("preset")
    if output is None:
        if isinstance(preset, dict) and preset.get("extension"):  # the agent's default
            return f"job-{job_id}.{preset['extension']}"
        return None
    if output.startswith(OUTPUT_SCHEMES_PREFIXES):
        return output
    return str(PurePosixPath(output))


def as_submitted(spec: Any) -> Any:
    """A stored spec as validate_spec returned it at its SUBMIT (template restored, defaults
    of keys added since filled in): what an idempotent replay of that SUBMIT is compared with."""
    if not isinstance(spec, dict):
        return spec
    out = dict(spec)
    template = out.pop(OUTPUT_TEMPLATE, None)
    if template is not None:
        out["output"] = template
    out.setdefault("overwrite", False)
    out.setdefault("retry_timeouts", False)
    return out


def resubmittable(spec: dict[str, Any]) -> dict[str, Any]:
    """A stored spec as a client could submit it (RETRY): without the master's keys; the
    output stays as filled in (a retry writes where the original was to write)."""
    return {k: v for k, v in spec.items() if k not in MASTER_KEYS}


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
