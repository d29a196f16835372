"""A JOB's spec -> a ready ProcessRun with its hooks, or None for in-agent work (noop)."""

from __future__ import annotations

from typing import Any

from agent.cgroups import CgroupBackend, NoCgroups, resource_hooks
from agent.config import AgentConfig
from agent.ffmpeg.argv import InvalidInput, build_plan
from agent.ffmpeg.hook import FFmpegHook
from agent.runner import Hook, ProcessRun
from agent.workloads import UnsupportedJob, build_argv, check_spec

__all__ = ["InvalidInput", "UnsupportedJob", "prepare"]


def prepare(spec: dict[str, Any], job_id: int, attempt: int, cfg: AgentConfig,
            ffmpeg: str | None, cgroups: CgroupBackend | None = None) -> ProcessRun | None:
    """Build the run for one attempt; UnsupportedJob -> REJECT, InvalidInput -> failed.

    `cgroups` holds the job to its resource_limits (none given: limits cannot be enforced).
    """
    check_spec(spec)
    workdir = cfg.work_dir / "jobs" / f"{job_id}-{attempt}"
    timeout = spec.get("timeout_s") or cfg.default_timeout_s
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
        timeout = cfg.default_timeout_s
    hooks: list[Hook] = []
    if isinstance(spec.get("preset"), dict):
        if ffmpeg is None:
            raise UnsupportedJob("no ffmpeg on this agent")
        plan = build_plan(spec, ffmpeg, cfg.input_root, cfg.output_root, workdir, job_id)
        argv = plan.argv
        hooks.append(FFmpegHook(plan, cfg.stall_s))
    else:
        maybe = build_argv(spec)
        if maybe is None:
            return None
        argv = maybe
    hooks += resource_hooks(spec, job_id, attempt, cgroups or NoCgroups("not configured"),
                            cfg.limits, cfg.pids_max)
    return ProcessRun(argv, workdir, timeout, hooks=hooks, kill_grace_s=cfg.kill_grace_s)
