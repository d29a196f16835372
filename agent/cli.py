"""`ffrtmp agent`: parse options, build the config, run the loop.

Only what the parser needs is imported with this module (it is part of every `ffrtmp`
command's grammar); the agent itself (cgroups, ffmpeg, metrics, the loop) when it runs.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from agent.admission import Reservation
from agent.defaults import CGROUP_MODES as MODES
from agent.defaults import LIMIT_POLICIES as POLICIES
from agent.defaults import METRICS_HOST, METRICS_PORT
from bus.sockets import DEFAULT_AGENTS, EndpointError, endpoint, is_loopback

if TYPE_CHECKING:
    from agent.workdir import WorkDirLock
    from bus.security import PeerKeys

log = logging.getLogger("ffrtmp.agent")
MAX_PER_HOST = 64  # default names NAME, NAME-2, ... NAME-64


def _state_home() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "ffrtmp" / "agents"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the agent subcommand."""
    p = sub.add_parser("agent", help="run an agent that executes jobs")
    p.add_argument("--master", default=DEFAULT_AGENTS,
                   help="the master's agent endpoint, tcp://HOST:PORT or HOST:PORT; with "
                        "standbys every master's, comma-separated (the agent follows the "
                        "leader)")
    p.add_argument("--name", default=None,
                   help="unique agent name (default: the --key's name with CURVE keys, which "
                        "the master requires, else the host name, or HOST-2, HOST-3, ... when "
                        "another agent on this host holds it)")
    p.add_argument("--slots", type=int, default=4, help="jobs run at once")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="scratch and job directories, one agent each (default: "
                        "$XDG_STATE_HOME/ffrtmp/agents/NAME, ~/.local/state if unset)")
    p.add_argument("--metrics", default=None,
                   help=f"HOST:PORT for /metrics, or 'off' (default: {METRICS_HOST}:"
                        f"{METRICS_PORT}, or the next free port up to {METRICS_PORT + 63})")
    p.add_argument("--insecure", action="store_true",
                   help="allow a master that is not on loopback without CURVE keys (traffic "
                        "and jobs unauthenticated)")
    p.add_argument("--stop-grace", type=float, default=30.0,
                   help="on SIGTERM, running jobs may finish this long before they are "
                        "stopped and handed back to the master (not charged), s")
    p.add_argument("--allow-url", action="append", default=[], metavar="CIDR|HOST",
                   help="also allow URL inputs/outputs to this network or host (repeatable; "
                        "default: public addresses only; docs/INPUTS.md)")
    p.add_argument("--job-nice", type=int, default=10,
                   help="run jobs this much nicer than the agent (0-19), so a saturated host "
                        "never delays the agent's heartbeat")
    p.add_argument("--timeout", type=float, default=None,
                   help="default hard time limit for jobs without timeout_s, s")
    p.add_argument("--ffmpeg", default=None,
                   help="ffmpeg binary (default: ffmpeg on PATH, else the imageio-ffmpeg one)")
    p.add_argument("--input-root", type=Path, default=None,
                   help="directory job inputs are relative to (default: WORK_DIR/inputs)")
    p.add_argument("--output-root", type=Path, default=None,
                   help="directory job outputs are written under (default: WORK_DIR/outputs)")
    p.add_argument("--stall-timeout", type=float, default=300.0,
                   help="kill a job whose progress stopped for this long, s (0: never)")
    p.add_argument("--cgroup", choices=MODES, default="auto",
                   help="job cgroups: auto (v2, else v1, else none), v2, v1 or none")
    p.add_argument("--cgroup-parent", default=None, metavar="PATH",
                   help="parent cgroup (path in the hierarchy; default: ffrtmp-NAME under the "
                        "agent's own cgroup)")
    p.add_argument("--limits", choices=POLICIES, default="required",
                   help="required: refuse jobs whose limits cannot be enforced; best-effort: "
                        "run them unlimited and say so (limits_enforced: false)")
    p.add_argument("--disk-floor-mb", type=float, default=1024.0,
                   help="take no work while the work dir's free space is under this, MB")
    p.add_argument("--kill-grace", type=float, default=5.0,
                   help="SIGTERM -> SIGKILL delay for timeouts and disk/stall stops, s")
    p.add_argument("--default-reservation", type=Reservation.parse, default="10:64:0",
                   metavar="CPU:MB[:DISK]", help="what a job without limits reserves")
    p.add_argument("--typical-reservation", type=Reservation.parse, default=None,
                   metavar="CPU:MB[:DISK]",
                   help="what must still fit to grant a credit (default: --default-reservation)")
    p.add_argument("--bandwidth-mbps", type=float, default=None,
                   help="link capacity for the bandwidth utilisation metric, Mbit/s "
                        "(default: the NIC's speed)")
    p.add_argument("--key", default=None, metavar="FILE",
                   help="this agent's CURVE secret key file (from `ffrtmp keys generate`)")
    p.add_argument("--master-key", default=None, metavar="FILE",
                   help="the master's public key file (master.key)")
    p.set_defaults(func=run)


def default_name(key_file: str | None) -> str:
    """The agent's name when --name is not given: with CURVE the master binds a name to its key
    (DIR/private/NAME.key_secret is agent NAME), so the key's name; else the host name."""
    import socket

    stem = Path(key_file).name.removesuffix(".key_secret") if key_file else ""
    return stem or socket.gethostname()


def _claim(work_dir: Path) -> WorkDirLock | None:
    from agent.workdir import WorkDirBusy, WorkDirLock

    try:
        return WorkDirLock.claim(work_dir)
    except WorkDirBusy:
        return None


def place(name: str | None, work_dir: Path | None, key_file: str | None,
          ) -> tuple[str, Path, WorkDirLock]:
    """This agent's name and work dir, with the work dir locked for its lifetime.

    Defaults give every agent on a host its own: the first takes the host name (or its key's
    name) and STATE/agents/NAME; while that work dir is held by a running agent the next one
    takes NAME-2, NAME-3, ... An explicit name or work dir that is held is refused."""
    if name is not None or work_dir is not None:
        name = name or default_name(key_file)
        work_dir = work_dir or _state_home() / name
        lock = _claim(work_dir)
        if lock is None:
            raise SystemExit(f"ffrtmp agent: work dir {work_dir} is in use by another agent "
                             "on this host; give this one its own --name or --work-dir")
        return name, work_dir, lock
    base = default_name(key_file)
    if key_file:  # the master binds the name to the key: no other name would be accepted
        candidates = [base]
    else:
        candidates = [base] + [f"{base}-{n}" for n in range(2, MAX_PER_HOST + 1)]
    for candidate in candidates:
        lock = _claim(_state_home() / candidate)
        if lock is not None:
            return candidate, _state_home() / candidate, lock
    raise SystemExit(f"ffrtmp agent: the work dir of agent {candidates[-1]!r} is in use by "
                     "another agent on this host; give this one --name and --work-dir")


def check_master(target: str, keys: PeerKeys | None, insecure: bool) -> str:
    """The master endpoint, normalised; refuses a keyless non-loopback master (one line)."""
    try:
        master = endpoint(target, "--master")
    except EndpointError as e:
        raise SystemExit(f"ffrtmp agent: {e}") from e
    if keys is None and not insecure and not is_loopback(master):
        raise SystemExit(f"ffrtmp agent: refusing to connect to {master} without CURVE keys: "
                         "anyone on the path could send this agent jobs (it runs them as "
                         f"{os.environ.get('USER') or 'this user'}); give --key and "
                         "--master-key, or --insecure")
    return master


def check_masters(targets: str, keys: PeerKeys | None, insecure: bool) -> tuple[str, ...]:
    """`--master A,B,…`: each endpoint checked as check_master does, duplicates dropped."""
    out: list[str] = []
    for item in targets.split(","):
        master = check_master(item, keys, insecure)
        if master not in out:
            out.append(master)
    return tuple(out)


def run(args: argparse.Namespace) -> int:
    """Run the agent until SIGTERM/SIGINT (a second one stops running jobs at once)."""
    from agent.ffmpeg.netpolicy import NetPolicy
    from bus.security import KeyMaterialError, load_peer

    if args.slots < 1:
        raise SystemExit("ffrtmp agent: --slots must be at least 1")
    if not 0 <= args.job_nice <= 19:
        raise SystemExit("ffrtmp agent: --job-nice must be 0 to 19")
    if not 0 <= args.stop_grace <= 86400:
        raise SystemExit("ffrtmp agent: --stop-grace must be 0 to 86400 s")
    keys = None
    if args.key or args.master_key:
        if not (args.key and args.master_key):
            raise SystemExit("ffrtmp agent: --key and --master-key go together")
        try:
            keys = load_peer(args.key, args.master_key)
        except KeyMaterialError as e:
            raise SystemExit(f"ffrtmp agent: {e}") from e
    masters = check_masters(args.master, keys, args.insecure)
    try:
        allow_url = NetPolicy.parse(args.allow_url)
    except ValueError as e:
        raise SystemExit(f"ffrtmp agent: --allow-url: {e}") from e
    name, work_dir, lock = place(args.name, args.work_dir, args.key)
    try:
        return _serve(args, keys, masters, allow_url, name, work_dir)
    finally:
        lock.release()


def _serve(args: argparse.Namespace, keys: PeerKeys | None, masters: tuple[str, ...],
           allow_url: object,
           name: str,
           work_dir: Path) -> int:
    from agent.cgroups import CgroupError
    from agent.config import AgentConfig
    from agent.ffmpeg.discovery import NoFFmpeg
    from agent.host import discover
    from agent.loop import Agent
    from agent.metrics import MetricsError
    from bus.sockets import BindError

    metrics_auto = args.metrics is None
    metrics = None if args.metrics in ("off", "", "none") else \
        args.metrics or f"{METRICS_HOST}:{METRICS_PORT}"
    cfg = AgentConfig(
        work_dir=work_dir, ffmpeg=args.ffmpeg, keys=keys, stall_s=args.stall_timeout,
        input_root=args.input_root or work_dir / "inputs",
        output_root=args.output_root or work_dir / "outputs", master=masters[0],
        masters=masters, name=name,
        slots=args.slots, metrics=metrics, metrics_tries=64 if metrics_auto else 1,
        default_timeout_s=args.timeout, cgroup=args.cgroup, cgroup_parent=args.cgroup_parent,
        limits=args.limits, disk_floor_mb=args.disk_floor_mb, kill_grace_s=args.kill_grace,
        default_reservation=args.default_reservation,
        typical_reservation=args.typical_reservation, bandwidth_mbps=args.bandwidth_mbps,
        allow_url=allow_url, insecure=args.insecure, job_nice=args.job_nice,
        stop_grace_s=args.stop_grace,
    )
    cfg.input_root.mkdir(parents=True, exist_ok=True)
    cfg.output_root.mkdir(parents=True, exist_ok=True)
    try:
        host = discover(cfg)
    except (NoFFmpeg, CgroupError) as e:
        raise SystemExit(f"ffrtmp agent: {e}") from e
    try:
        agent = Agent(cfg, host)
    except Exception:
        host.cgroups.close()
        raise
    agent.install_signals()
    log.info("agent %s, work dir %s, master%s %s", name, work_dir,
             "s" if len(masters) > 1 else "", ", ".join(masters))
    try:
        agent.run()
    except (MetricsError, BindError) as e:
        raise SystemExit(f"ffrtmp agent: {e}") from e
    return 0
