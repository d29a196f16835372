"""One detached tmux session on a private server socket, running one command in one pane.

Used by `bench dash-cost` (a real terminal for `ffrtmp dash`) and by the dashboard's tmux test.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

UTF8 = {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


class Session:
    """`tmux -L <unique>`: its own server, so nothing of the user's tmux is touched. A failed
    tmux command raises `error` (the caller's kind: a bench error, a test assertion)."""

    target = "dash:0.0"

    def __init__(self, prefix: str, width: int, height: int,
                 error: type[Exception] = RuntimeError, env: dict[str, str] | None = None
                 ) -> None:
        self.socket = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.width, self.height = width, height
        self.error = error
        self.env = {**os.environ, **UTF8, **(env or {})}
        self.socket_path = ""

    def tmux(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", "-u", *args],
                              capture_output=True, text=True, env=self.env, timeout=10,
                              check=False)
        if check and proc.returncode != 0:
            raise self.error(f"tmux {' '.join(args)}: {proc.returncode} {proc.stderr.strip()}")
        return proc.stdout

    def start(self, command: str, cwd: Path) -> None:
        """Run the shell command in a new session; remain-on-exit keeps the last screen (a
        traceback of a command that died stays readable)."""
        self.tmux("new-session", "-d", "-s", "dash", "-x", str(self.width), "-y",
                  str(self.height), "-c", str(cwd), command, ";",
                  "set-option", "-t", "dash", "remain-on-exit", "on")
        self.socket_path = self.tmux("display-message", "-p", "#{socket_path}").strip()

    def pid(self, what: str) -> int:
        """`#{pid}` (the tmux server) or `#{pane_pid}` (the pane's process)."""
        args = ("-t", self.target) if what == "pane_pid" else ()
        return int(self.tmux("display-message", "-p", *args, f"#{{{what}}}").strip())

    def screen(self, check: bool = True) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.target, check=check)

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", self.target, *keys)

    def kill(self) -> None:
        """Stop the server and remove its socket file (kill-server leaves it behind)."""
        self.tmux("kill-server", check=False)
        if self.socket_path:
            Path(self.socket_path).unlink(missing_ok=True)
