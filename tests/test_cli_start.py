"""`ffrtmp jobs list` starts light: the client path imports only what it needs (issue 14).

The CLI's start-up time is mostly imports; building the argparse tree must not pull in the
master, the store, the agent, the dashboard or the bench tools, nor their heavy dependencies:
those load in the run function of the subcommand that needs them. This runs the real command
(the console script, as a user does) against a real master and reads the modules it imported
from `-X importtime` (PYTHONPROFILEIMPORTTIME). Wall time is measured by `bench.cli_start`,
not asserted here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness import ROOT, Cluster

pytestmark = pytest.mark.timeout(90)

# Packages `ffrtmp jobs list` must not import at all (the command's own process)...
HEAVY = ("peewee", "psycopg2", "textual", "textual_serve", "aiohttp", "prometheus_client",
         "psutil", "hypothesis", "yaml", "asyncio")
# ...and of these, only the subcommand's module that registers its grammar (add_parser) and the
# light modules that grammar needs (choices and defaults: stdlib only).
OWN = ("master", "storage", "agent", "tui", "bench")
GRAMMAR = frozenset({
    "master", "master.cli",
    "storage", "storage.cli", "storage.db", "storage.errors",  # storage/__init__ is lazy
    "agent", "agent.cli", "agent.defaults", "agent.admission",  # --default-reservation's type
    "tui", "tui.cli",
    "bench", "bench.cli", "bench.profiles",
})

_IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \| ( *)(\S+)$")


def ffrtmp_command() -> list[str]:
    """The `ffrtmp` console script of this interpreter's environment (what a user runs), else
    `python -m ffrtmp`."""
    script = Path(sys.executable).with_name("ffrtmp")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ffrtmp"]


def run_traced(cluster: Cluster, *args: str) -> tuple[subprocess.CompletedProcess[str],
                                                      list[str]]:
    """Run `ffrtmp --master <clients> ARGS` with import tracing: the result (import-time lines
    taken out of stderr) and the modules the process imported, in order."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONPROFILEIMPORTTIME": "1"}
    for name in ("FFRTMP_MASTER", "FFRTMP_EVENTS", "FFRTMP_CLIENT_KEY", "FFRTMP_MASTER_KEY"):
        env.pop(name, None)
    proc = subprocess.run([*ffrtmp_command(), "--master", cluster.clients_ep, *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
                          check=False)
    modules, other = [], []
    for line in proc.stderr.splitlines():
        m = _IMPORTED.match(line)
        if m:
            modules.append(m.group(2))
        elif not line.startswith("import time: self [us]"):
            other.append(line)
    proc.stderr = "\n".join(other)
    return proc, modules


def test_jobs_list_imports_nothing_heavy(cluster: Cluster) -> None:
    ids = cluster.client.submit([{"scenario": "noop"}] * 3)
    proc, modules = run_traced(cluster, "jobs", "list")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    listed = {int(n) for n in re.findall(r"^\s*(\d+)\s", proc.stdout, re.MULTILINE)}
    assert set(ids) <= listed, proc.stdout
    assert "ffrtmp.client_cli" in modules and "zmq" in modules, modules  # the trace works
    heavy = sorted({m for m in modules if m.split(".")[0] in HEAVY
                    or (m.split(".")[0] in OWN and m not in GRAMMAR)})
    assert not heavy, f"`ffrtmp jobs list` imported {heavy}"
