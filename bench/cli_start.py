"""How long one `ffrtmp jobs list` takes, end to end, as a user runs it (issue 14: <= 80 ms).

    python -m bench.cli_start --calls 30 [--baseline-tree DIR] [--no-bytecode-cache]

Starts a master (SQLite, free loopback ports, no agents) with a few queued jobs, then times
`--calls` runs of the `ffrtmp` console script next to this interpreter (`python -m ffrtmp` if
there is none), process start to exit, output discarded; prints median, p90, min and max, the
interpreter's own start (`python -c pass`) as the floor, and the import-time top 10 of one
traced call (`-X importtime`). With --baseline-tree (e.g. `git archive HEAD | tar -x -C DIR`)
the same calls run from that source tree too, interleaved with this one's, so both sides see
the same machine load.

Bytecode: by default the calls may cache compiled modules (in a temporary PYTHONPYCACHEPREFIX,
so nothing is written into the trees), as an installed ffrtmp has them; one warm-up call per
side fills the cache. --no-bytecode-cache sets PYTHONDONTWRITEBYTECODE=1 instead: every call
compiles the project's modules again (a checkout with bytecode writing disabled).
A measurement tool: it prints figures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench.cluster import LocalCluster
from bench.stats import percentile
from bus.client import Client

ROOT = Path(__file__).resolve().parent.parent
_IMPORT = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)$")


def ffrtmp_command() -> list[str]:
    """The console script of this interpreter's environment, else `python -m ffrtmp`."""
    script = Path(sys.executable).with_name("ffrtmp")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ffrtmp"]


def side_env(tree: Path, cache: Path | None) -> dict[str, str]:
    """The environment of one side's calls: its tree first on the path, no FFRTMP_* settings,
    bytecode cached under `cache` (None: not written at all)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FFRTMP_") and k not in ("PYTHONPROFILEIMPORTTIME",
                                                        "PYTHONPYCACHEPREFIX")}
    env["PYTHONPATH"] = str(tree)
    if cache is None:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    else:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(cache)
    return env


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Seconds one run took, wall and CPU (user + system: less moved by a busy machine);
    exits the tool if the command failed."""
    cpu = _children_cpu()
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bench.cli_start: {' '.join(argv)} exited {proc.returncode}: "
                         f"{proc.stderr.strip()[-2000:]}")
    return took, _children_cpu() - cpu


def import_profile(argv: list[str], env: dict[str, str]) -> list[tuple[int, int, int, str]]:
    """(cumulative us, self us, depth, module) of every import of one traced run."""
    proc = subprocess.run(argv, env={**env, "PYTHONPROFILEIMPORTTIME": "1"}, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          timeout=60, check=False)
    rows = []
    for line in proc.stderr.splitlines():
        m = _IMPORT.match(line)
        if m:
            rows.append((int(m.group(2)), int(m.group(1)), len(m.group(3)) // 2, m.group(4)))
    return rows


def figures(samples: list[float]) -> str:
    v = sorted(samples)
    ms = [percentile(v, q) * 1000 for q in (50, 90)]
    return (f"median {ms[0]:6.1f} ms  p90 {ms[1]:6.1f} ms  min {v[0] * 1000:6.1f} ms  "
            f"max {v[-1] * 1000:6.1f} ms  (n={len(v)})")


def print_imports(label: str, rows: list[tuple[int, int, int, str]], top: int) -> None:
    total = sum(r[1] for r in rows)
    by_package: dict[str, int] = defaultdict(int)
    for _, own, _, name in rows:
        by_package[name.split(".")[0]] += own
    print(f"\n{label}: {len(rows)} modules imported, {total / 1000:.1f} ms of imports "
          "(one traced call)")
    print(f"  top {top} packages (own time of all their modules):")
    for name, own in sorted(by_package.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {own / 1000:7.1f} ms  {name}")
    print(f"  top {top} modules (own time):")
    for _, own, _, name in sorted(rows, key=lambda r: -r[1])[:top]:
        print(f"    {own / 1000:7.1f} ms  {name}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cli_start", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=30, help="timed calls per side (default 30)")
    ap.add_argument("--jobs", type=int, default=5, help="jobs queued before (default 5)")
    ap.add_argument("--command", default="jobs list",
                    help="the ffrtmp command timed (default: 'jobs list')")
    ap.add_argument("--baseline-tree", type=Path, action="append", default=[], metavar="DIR",
                    help="also time the CLI of this source tree, interleaved (repeatable; "
                         "shown by the directory's name)")
    ap.add_argument("--no-bytecode-cache", action="store_true",
                    help="PYTHONDONTWRITEBYTECODE=1: every call compiles the project again")
    ap.add_argument("--top", type=int, default=10, help="import-time entries shown")
    args = ap.parse_args(argv)
    if args.calls < 1:
        raise SystemExit("bench.cli_start: --calls must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="ffrtmp-cli-start-"))
    cluster = LocalCluster(f"sqlite:///{work}/cli.db", agents=0, slots=1, workdir=work)
    try:
        cluster.start()
        with Client(cluster.clients_ep, timeout=10) as client:
            client.submit([{"scenario": "noop"}] * args.jobs)
        command = [*ffrtmp_command(), "--master", cluster.clients_ep, *args.command.split()]
        trees = {str(d): d.resolve() for d in args.baseline_tree}
        trees["this tree"] = ROOT
        envs = {label: side_env(tree, None if args.no_bytecode_cache else work / f"pyc-{i}")
                for i, (label, tree) in enumerate(trees.items())}
        floor_env = envs["this tree"]
        floor = [sys.executable, "-c", "pass"]
        for env in envs.values():  # warm-up: bytecode cache, page cache
            timed(command, env)
        samples: dict[str, list[tuple[float, float]]] = {
            label: [] for label in [*envs, "python -c pass"]}
        for _ in range(args.calls):
            for label, env in envs.items():
                samples[label].append(timed(command, env))
            samples["python -c pass"].append(timed(floor, floor_env))
        print(f"`ffrtmp {args.command}` against a master with {args.jobs} jobs, "
              f"{args.calls} calls per side, interleaved; command: {' '.join(command[:1])} ...; "
              f"bytecode {'not cached' if args.no_bytecode_cache else 'cached'}")
        width = max(len(label) for label in samples)
        for label, values in samples.items():
            print(f"  {label:<{width}}  wall {figures([w for w, _ in values])}")
            print(f"  {'':<{width}}  cpu  {figures([c for _, c in values])}")
        print(f"  (machine load average at the end: {os.getloadavg()[0]:.2f} on "
              f"{os.cpu_count()} CPUs)")
        for label, env in envs.items():
            print_imports(label, import_profile(command, env), args.top)
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
