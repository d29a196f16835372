"""`ffrtmp agent`: parse options, build the config, run the loop."""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

from agent.admission import Reservation
from agent.cgroups import MODES, POLICIES, CgroupError
from agent.config import AgentConfig
from agent.ffmpeg.discovery import NoFFmpeg
from agent.loop import Agent
from agent.metrics import MetricsError
from bus.security import KeyMaterialError, load_peer
from bus.sockets import DEFAULT_AGENTS, BindError


def _default_work_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "ffrtmp" / "agent"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the agent subcommand."""
    p = sub.add_parser("agent", help="run an agent that executes jobs")
    p.add_argument("--master", default=DEFAULT_AGENTS, help="the master's agent endpoint")
    p.add_argument("--name", default=None,
                   help="unique agent name (default: the --key's name with CURVE keys, which "
                        "the master requires, else the host name)")
    p.add_argument("--slots", type=int, default=4, help="jobs run at once")
    p.add_argument("--work-dir", type=Path, default=None, help="scratch and job directories")
    p.add_argument("--metrics", default="127.0.0.1:9471", help="HOST:PORT for /metrics, or 'off'")
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
    stem = Path(key_file).name.removesuffix(".key_secret") if key_file else ""
    return stem or socket.gethostname()


def run(args: argparse.Namespace) -> int:
    """Run the agent until SIGTERM/SIGINT."""
    if args.slots < 1:
        raise SystemExit("ffrtmp agent: --slots must be at least 1")
    keys = None
    if args.key or args.master_key:
        if not (args.key and args.master_key):
            raise SystemExit("ffrtmp agent: --key and --master-key go together")
        try:
            keys = load_peer(args.key, args.master_key)
        except KeyMaterialError as e:
            raise SystemExit(f"ffrtmp agent: {e}") from e
    if args.name is None:
        args.name = default_name(args.key)
    work_dir = args.work_dir or _default_work_dir()
    cfg = AgentConfig(
        work_dir=work_dir, ffmpeg=args.ffmpeg, keys=keys, stall_s=args.stall_timeout,
        input_root=args.input_root or work_dir / "inputs",
        output_root=args.output_root or work_dir / "outputs", master=args.master, name=args.name,
        slots=args.slots, metrics=None if args.metrics in ("off", "", "none") else args.metrics,
        default_timeout_s=args.timeout, cgroup=args.cgroup, cgroup_parent=args.cgroup_parent,
        limits=args.limits, disk_floor_mb=args.disk_floor_mb, kill_grace_s=args.kill_grace,
        default_reservation=args.default_reservation,
        typical_reservation=args.typical_reservation, bandwidth_mbps=args.bandwidth_mbps,
    )
    cfg.input_root.mkdir(parents=True, exist_ok=True)
    cfg.output_root.mkdir(parents=True, exist_ok=True)
    try:
        agent = Agent(cfg)
    except (NoFFmpeg, CgroupError) as e:
        raise SystemExit(f"ffrtmp agent: {e}") from e
    agent.install_signals()
    try:
        agent.run()
    except (MetricsError, BindError) as e:
        raise SystemExit(f"ffrtmp agent: {e}") from e
    return 0
