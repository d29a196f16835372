"""The ffmpeg baseline: the identical ffmpeg commands the agents would run, through `xargs -P`.

The argv of each job is rebuilt with the agent's own `build_plan` from the spec as the master
resolves it (preset included), so the only difference to a bench run is the system around it:
submit, store, dispatch, the agent's supervision, progress parsing, the result's commit.
"""

from __future__ import annotations

import resource
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from agent.ffmpeg.argv import build_plan
from agent.ffmpeg.discovery import find_ffmpeg
from bench.profiles import BenchError
from master.scenarios import load_presets, make_checks
from master.spec import SpecError, validate_spec


def resolve(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as the master stores it (validated, preset resolved)."""
    try:
        return validate_spec(dict(spec), make_checks(load_presets(None))).spec
    except SpecError as e:
        raise BenchError(f"ffmpeg workload: {e}") from e


def ffmpeg_version(ffmpeg: str) -> str:
    """The first line of `ffmpeg -version`."""
    try:
        out = subprocess.run([ffmpeg, "-version"], capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.decode("utf-8", "replace").splitlines()[0] if out.stdout else "unknown"


def xargs(lines: list[str], parallel: int, root: Path, what: str) -> tuple[float, float]:
    """Run shell lines with `xargs -P parallel` (commands file in root): makespan and the
    children's CPU, s; BenchError naming `what` if any line failed."""
    cmds = root / "commands.txt"
    cmds.write_text("\n".join(lines) + "\n")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(cmds, "rb") as stdin:
        proc = subprocess.run(["xargs", "-P", str(parallel), "-d", "\n", "-n", "1", "sh", "-c"],
                              stdin=stdin, capture_output=True, check=False)
    makespan = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise BenchError(f"{what} ffmpeg run failed ({proc.returncode}): "
                         f"{err[-1] if err else 'no output'}")
    return makespan, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run_direct(specs: list[dict[str, Any]], parallel: int, workdir: Path) -> dict[str, Any]:
    """Run each spec's ffmpeg command with `xargs -P parallel`; the wall-clock makespan."""
    if shutil.which("xargs") is None:
        raise BenchError("the ffmpeg baseline needs xargs")
    ffmpeg = find_ffmpeg()
    root = workdir / "direct"
    shutil.rmtree(root, ignore_errors=True)
    inputs, outputs = root / "inputs", root / "outputs"
    inputs.mkdir(parents=True)
    outputs.mkdir()
    lines = []
    for i, spec in enumerate(specs):
        job_dir = root / "jobs" / str(i)
        job_dir.mkdir(parents=True)
        plan = build_plan(resolve(spec), ffmpeg, inputs, outputs, job_dir, i)
        lines.append(shlex.join(plan.argv) + " >/dev/null")
    makespan, cpu = xargs(lines, parallel, root, "direct")
    shutil.rmtree(root, ignore_errors=True)
    return {"jobs": len(specs), "parallel": parallel, "makespan_s": round(makespan, 3),
            "cpu_s": round(cpu, 3), "command": lines[0] if lines else ""}
