"""Job kinds: one registry that turns a JOB's spec into what the agent runs.

Each kind claims the specs it knows by scenario (ffmpeg takes every scenario that is not a
synthetic workload, which the master resolved to a preset) and prepares an attempt: a
supervised process (`Ready`), a result without a process (`Finished`: noop, or a spec this
agent refuses to run as invalid), or a refusal the master requeues without charging an attempt
(`Refused`). `prepare()` is the one entry point and never
raises: any exception while preparing ends that attempt alone with a precise reason.

Preparation may touch the filesystem and name resolution, so the agent runs it off its event
loop (a worker thread); the kinds themselves are plain functions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.cgroups import CgroupBackend, NoCgroups, resource_hooks
from agent.config import AgentConfig
from agent.ffmpeg.argv import InvalidInput, build_plan
from agent.ffmpeg.hook import FFmpegHook
from agent.ffmpeg.publish import OutputExists
from agent.runner import Hook, ProcessRun, Result
from agent.workloads import UnsupportedJob, build_argv, check_spec
from bus import vocab

log = logging.getLogger("ffrtmp.agent")


@dataclass(frozen=True)
class Ready:
    """A process to start for the attempt."""

    run: ProcessRun


@dataclass(frozen=True)
class Finished:
    """The attempt's result without a process (noop completed; invalid input failed)."""

    result: Result


@dataclass(frozen=True)
class Refused:
    """This agent cannot run the attempt (REJECT: requeued, not charged)."""

    reason: str


Prepared = Ready | Finished | Refused


@dataclass(frozen=True)
class Context:
    """What preparing an attempt may use: the config and the host's discoveries."""

    cfg: AgentConfig
    ffmpeg: str | None = None
    cgroups: CgroupBackend | None = None


@dataclass(frozen=True)
class Kind:
    """A kind of job: which specs it claims and how to build the process of an attempt."""

    name: str
    claims: Callable[[dict[str, Any]], bool]
    build: Callable[[dict[str, Any], int, int, Context], tuple[list[str], list[Hook]] | None]


def _synthetic(spec: dict[str, Any], job_id: int, attempt: int,
               ctx: Context) -> tuple[list[str], list[Hook]] | None:
    try:
        argv = build_argv(spec)
    except UnsupportedJob as e:  # the workload is ours: what is wrong is the spec's knobs
        raise InvalidInput(str(e)) from e
    return None if argv is None else (argv, [])


def _ffmpeg(spec: dict[str, Any], job_id: int, attempt: int,
            ctx: Context) -> tuple[list[str], list[Hook]]:
    if "preset" not in spec:  # not resolved by a master as an ffmpeg scenario: another kind
        raise UnsupportedJob(f"scenario {spec.get('scenario')!r:.60} not supported by this "
                             "agent")
    if ctx.ffmpeg is None:
        raise UnsupportedJob("no ffmpeg on this agent")
    if not isinstance(spec["preset"], dict):
        raise InvalidInput("preset: must be a map")
    plan = build_plan(spec, ctx.ffmpeg, ctx.cfg.input_root, ctx.cfg.output_root,
                      workdir(ctx.cfg, job_id, attempt), job_id, allow_url=ctx.cfg.allow_url)
    return plan.argv, [FFmpegHook(plan, ctx.cfg.stall_s)]


# Order matters: the first kind that claims a spec prepares it (ffmpeg is the catch-all: the
# master resolves every other scenario name to a preset). The next kind (packaging, say) goes
# before it with its own claim.
KINDS: tuple[Kind, ...] = (
    Kind("synthetic", lambda spec: spec.get("scenario") in vocab.WORKLOADS, _synthetic),
    Kind("ffmpeg", lambda spec: isinstance(spec.get("scenario"), str), _ffmpeg),
)


def kind_for(spec: dict[str, Any]) -> Kind:
    """The kind that claims a spec; UnsupportedJob if none does."""
    for kind in KINDS:
        if kind.claims(spec):
            return kind
    raise UnsupportedJob(f"scenario {spec.get('scenario')!r:.60} not supported by this agent")


def workdir(cfg: AgentConfig, job_id: int, attempt: int) -> Any:
    """The attempt's scratch directory."""
    return cfg.work_dir / "jobs" / f"{job_id}-{attempt}"


def _timeout(spec: dict[str, Any], cfg: AgentConfig) -> float | None:
    timeout = spec.get("timeout_s") or cfg.default_timeout_s
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
        return cfg.default_timeout_s
    return float(timeout)


def build(spec: dict[str, Any], job_id: int, attempt: int, ctx: Context) -> Prepared:
    """Prepare one attempt; raises UnsupportedJob / InvalidInput (see `prepare`)."""
    if not isinstance(spec, dict):
        raise InvalidInput("spec: must be a map")
    kind = kind_for(spec)
    try:
        check_spec(spec)  # the shape every kind relies on (params, timeout_s, limits)
    except UnsupportedJob as e:
        raise InvalidInput(str(e)) from e
    built = kind.build(spec, job_id, attempt, ctx)
    if built is None:
        return Finished(Result(vocab.COMPLETED, None, 0, 0.0))
    argv, hooks = built
    hooks += resource_hooks(spec, job_id, attempt, ctx.cgroups or NoCgroups("not configured"),
                            ctx.cfg.limits, ctx.cfg.pids_max)
    return Ready(ProcessRun(argv, workdir(ctx.cfg, job_id, attempt), _timeout(spec, ctx.cfg),
                            hooks=hooks, kill_grace_s=ctx.cfg.kill_grace_s,
                            nice=ctx.cfg.job_nice))


def failed(reason: str, text: str) -> Finished:
    """A failed attempt that never ran, with its reason and the error text."""
    return Finished(Result(vocab.FAILED, reason, None, 0.0, {"error": text[:2000]}))


def in_agent(spec: Any) -> bool:
    """True for work done inside the agent with no process and no I/O to prepare (`noop`):
    the loop prepares it on its own thread instead of handing it to a worker thread."""
    return isinstance(spec, dict) and spec.get("scenario") == "noop"


def prepare(spec: Any, job_id: int, attempt: int, ctx: Context) -> Prepared:
    """Prepare one attempt; never raises.

    UnsupportedJob -> Refused (REJECT: another agent may run it); InvalidInput -> Finished
    failed `invalid_input` (not retried); OutputExists -> Finished failed `output_exists` (not
    retried); anything else -> Finished failed `agent_error` with
    the exception in `extra.error` (retried elsewhere, charged), logged with its traceback.
    """
    try:
        return build(spec, job_id, attempt, ctx)
    except UnsupportedJob as e:
        return Refused(str(e)[:200])
    except InvalidInput as e:
        return failed(vocab.INVALID_INPUT, str(e))
    except OutputExists as e:  # overwrite: false and a file at the output path (not retried)
        return failed(vocab.OUTPUT_EXISTS, str(e))
    except Exception as e:  # containment: one job's bug ends that job, never the agent
        log.exception("job %s attempt %s: preparing failed", job_id, attempt)
        return failed(vocab.AGENT_ERROR, f"preparing failed: {type(e).__name__}: {e}")
