"""`ffrtmp keys generate`: the key layout per role, safe names, and secrets that are never loose."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq.auth

from bus.security import KeyMaterialError, generate, load_peer
from harness import ROOT


def keys_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "ffrtmp", "keys", "generate", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)  # the usual umask: without care a new file is world-readable
    try:
        yield
    finally:
        os.umask(old)


def files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generate_lays_out_one_folder_per_role(tmp_path: Path, umask_022: None) -> None:
    d = tmp_path / "keys"
    made = generate(d, ["a1"], ["c1"], operators=["o1"])
    assert files(d) == {"master.key", "master.key_secret", "agents/a1.key", "clients/c1.key",
                        "operators/o1.key", "private/a1.key_secret", "private/c1.key_secret",
                        "private/o1.key_secret"}
    assert {str(p.relative_to(d)) for p in made} == files(d)
    for name, folder in (("a1", "agents"), ("c1", "clients"), ("o1", "operators")):
        keys = load_peer(str(d / "private" / f"{name}.key_secret"), str(d / "master.key"))
        assert zmq.auth.load_certificate(d / folder / f"{name}.key")[0] == keys.public
        assert keys.server_public == zmq.auth.load_certificate(d / "master.key")[0]
    for path in d.rglob("*.key_secret"):
        assert mode(path) == 0o600, path
    for path in d.rglob("*.key"):
        assert mode(path) == 0o644, path
    assert mode(d / "private") == 0o700


def test_cli_makes_clients_and_operators(tmp_path: Path) -> None:
    # `--client NAME` used to crash: its dest `client` told `ffrtmp` to open a bus client.
    d = tmp_path / "keys"
    proc = keys_cli(str(d), "--client", "c1", "--operator", "o1")
    assert proc.returncode == 0, proc.stderr
    assert files(d) == {"master.key", "master.key_secret", "clients/c1.key", "operators/o1.key",
                        "private/c1.key_secret", "private/o1.key_secret"}
    assert "agents" in {p.name for p in d.iterdir()}  # every allow-list folder exists, if empty


def test_cli_without_names_makes_one_agent_and_one_client(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    assert keys_cli(str(d)).returncode == 0
    assert {"agents/agent.key", "clients/client.key"} <= files(d)


@pytest.mark.parametrize("names", [
    ["--agent", "x", "--agent", "x"],
    ["--agent", "x", "--client", "x"],
    ["--client", "y", "--operator", "x", "--agent", "x"],
])
def test_a_name_given_twice_is_refused_before_anything_is_written(
        tmp_path: Path, names: list[str]) -> None:
    d = tmp_path / "keys"
    proc = keys_cli(str(d), *names)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ffrtmp: keys: ") and "'x'" in lines[0], lines
    assert not d.exists()


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "-x", "a b", "x\n", "é",
                                  "x" * 65])
def test_unsafe_names_are_refused(tmp_path: Path, name: str) -> None:
    d = tmp_path / "keys"
    with pytest.raises(KeyMaterialError, match="name"):
        generate(d, [name], [])
    with pytest.raises(KeyMaterialError, match="name"):
        generate(d, [], [], operators=[name])
    assert not d.exists() and not (tmp_path / "evil.key").exists()


def test_an_existing_name_is_refused_up_front_and_the_master_key_is_kept(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    generate(d, ["a1"], ["c1"])
    master = (d / "master.key").read_bytes()
    before = files(d)
    for agents, clients in ((["a2", "a1"], []), (["a2"], ["a1"]), (["c1"], [])):
        with pytest.raises(KeyMaterialError, match="exists already"):
            generate(d, agents, clients)
        assert files(d) == before  # a2 was not made either
    assert generate(d, ["a2"], [], operators=["o1"])
    assert (d / "master.key").read_bytes() == master
    assert {"agents/a2.key", "operators/o1.key"} <= files(d)


def _fail_on_call(real: Callable[..., Any], n: int) -> Callable[..., Any]:
    calls = {"n": 0}

    def fake(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] >= n:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    return fake


@pytest.mark.parametrize("func,n", [("chmod", 1), ("replace", 1), ("replace", 3),
                                    ("fsync", 4)])
def test_a_failure_while_generating_never_leaves_a_readable_secret(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask_022: None, func: str,
        n: int) -> None:
    d = tmp_path / "keys"
    monkeypatch.setattr(os, func, _fail_on_call(getattr(os, func), n))
    try:
        generate(d, ["a1", "a2"], ["c1"])
    except OSError as e:
        assert "simulated" in str(e)
    monkeypatch.undo()
    for path in d.rglob("*"):
        if path.is_file():
            assert b"secret-key" not in path.read_bytes() or mode(path) & 0o077 == 0, path
            assert path.name.endswith((".key", ".key_secret")), f"temp file left: {path}"
