"""CURVE encryption and ZAP authentication with separate allow-lists for agents and clients."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from bus import security, sockets
from bus.client import Client, Subscriber
from bus.errors import ClientError
from bus.security import KeyMaterialError, apply_peer, generate, load_peer
from bus.sockets import AGENT_MAX_MSG, BindError, bind_router, is_loopback
from bus.vocab import ROLE_OPERATE, ROLE_SUBMIT
from conftest import free_port, wait_for
from harness import ROOT, Cluster


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    generate(directory, agents=["a1"], clients=["ops"])
    return directory


@pytest.fixture
def secure(tmp_path: Path, keys: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path}/db.sqlite", master_args=["--keys", str(keys)])
    c.client_keys = load_peer(str(keys / "private" / "ops.key_secret"), str(keys / "master.key"))
    try:
        c.start_master()
        yield c
    finally:
        c.close()


def _agent_args(keys: Path, name: str) -> list[str]:
    return ["--key", str(keys / "private" / f"{name}.key_secret"),
            "--master-key", str(keys / "master.key")]


def test_keyed_agent_and_client_work_end_to_end(secure: Cluster, keys: Path) -> None:
    secure.start_agent("a1", 2, *_agent_args(keys, "a1"))
    sub = Subscriber(["job.", "stats"], secure.events_ep, keys=secure.client_keys)
    try:
        # Stats are published every second: one arriving proves the keyed SUB is connected.
        wait_for(lambda: sub.recv(0.2) is not None, 10, message="no events for a keyed client")
        (job_id,) = secure.client.submit([{"scenario": "noop"}])
        assert secure.wait_terminal([job_id], 20)[job_id]["state"] == "completed"

        def job_event() -> bool:
            item = sub.recv(0.2)
            return item is not None and item[0].startswith(f"job.{job_id}.")

        wait_for(job_event, 10, message="no job events for a keyed client")
    finally:
        sub.close()


def test_a_client_key_cannot_act_as_an_agent_and_vice_versa(secure: Cluster, keys: Path) -> None:
    # The client's keypair on the agents endpoint: ZAP refuses it, the agent never registers.
    secure.start_agent("impostor", 1, "--key", str(keys / "private" / "ops.key_secret"),
                       "--master-key", str(keys / "master.key"), wait=False)
    secure.start_agent("a1", 1, *_agent_args(keys, "a1"))  # a real one registers meanwhile
    assert [n["name"] for n in secure.client.nodes()] == ["a1"]
    # The agent's keypair on the clients endpoint, and no keys at all: no answer.
    agent_keys = load_peer(str(keys / "private" / "a1.key_secret"), str(keys / "master.key"))
    for peer in (agent_keys, None):
        with Client(secure.clients_ep, timeout=1.5, keys=peer) as c, \
                pytest.raises(ClientError) as err:
            c.stats()
        assert err.value.code == "timeout"


def test_no_keys_means_loopback_only() -> None:
    assert is_loopback("tcp://127.0.0.1:5555") and is_loopback("tcp://localhost:1")
    assert not is_loopback("tcp://0.0.0.0:5555") and not is_loopback("tcp://10.1.2.3:5555")
    ctx = zmq.Context()
    try:
        with pytest.raises(BindError, match="not loopback"):
            bind_router(ctx, f"tcp://0.0.0.0:{free_port()}", AGENT_MAX_MSG)
    finally:
        ctx.term()


def test_bad_key_material_is_a_clear_error(tmp_path: Path, keys: Path) -> None:
    with pytest.raises(KeyMaterialError):
        load_peer(str(keys / "master.key"), str(keys / "master.key"))  # a public key only
    with pytest.raises(KeyMaterialError):
        load_peer(str(tmp_path / "missing"), str(keys / "master.key"))
    with pytest.raises(KeyMaterialError, match="exists already"):
        generate(keys, agents=["a1"], clients=[])
    secret = (keys / "private" / "a1.key_secret")
    assert secret.stat().st_mode & 0o077 == 0
    assert "***" in repr(load_peer(str(secret), str(keys / "master.key")))


# ---------------------------------------------------------------------------- ZAP, real sockets


@pytest.fixture
def roles(tmp_path: Path) -> Path:
    directory = tmp_path / "roles"
    security.generate(directory, ["a1", "a2"], ["c1"], operators=["o1"])
    return directory


class Server:
    """A ROUTER per domain, bound the way the master binds them, behind MasterSecurity."""

    def __init__(self, ctx: zmq.Context, keys: Path) -> None:
        self.security = security.MasterSecurity(ctx, str(keys))
        self.endpoints: dict[str, str] = {}
        self.socks: dict[str, zmq.Socket] = {}
        for domain in (security.AGENTS_DOMAIN, security.CLIENTS_DOMAIN):
            sock = ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            self.security.serve(sock, domain)
            sock.bind("tcp://127.0.0.1:0")
            self.socks[domain] = sock
            self.endpoints[domain] = sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def user_id(self, domain: str) -> str | None:
        """The ZAP User-Id of the next message on a domain's socket (the master's way)."""
        sock = self.socks[domain]
        assert sock.poll(5000), "nothing arrived"
        frames = sock.recv_multipart(copy=False)
        user_id = frames[-1].get("User-Id")
        assert user_id is None or isinstance(user_id, str)
        return user_id

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close(linger=0)
        self.security.stop()


@pytest.fixture
def server(ctx: zmq.Context, roles: Path) -> Iterator[Server]:
    s = Server(ctx, roles)
    try:
        yield s
    finally:
        s.close()


def dial(ctx: zmq.Context, endpoint: str, keys: Path, name: str) -> tuple[zmq.Socket, bool]:
    """A keyed DEALER and whether its CURVE handshake (with ZAP) succeeded, waited for by event."""
    peer = load_peer(str(keys / "private" / f"{name}.key_secret"), str(keys / "master.key"))
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    apply_peer(sock, peer)
    monitor = sock.get_monitor_socket(
        zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    try:
        sock.connect(endpoint)
        assert monitor.poll(5000), "no handshake outcome within 5 s"
        event = recv_monitor_message(monitor)
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
    return sock, event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED


def test_the_zap_user_id_names_the_peer_and_its_role(ctx: zmq.Context, server: Server,
                                                     roles: Path) -> None:
    for domain, name, expected in ((security.AGENTS_DOMAIN, "a1", "agent:a1"),
                                   (security.AGENTS_DOMAIN, "a2", "agent:a2"),
                                   (security.CLIENTS_DOMAIN, "c1", "submit:c1"),
                                   (security.CLIENTS_DOMAIN, "o1", "operate:o1")):
        sock, ok = dial(ctx, server.endpoints[domain], roles, name)
        assert ok, name
        sock.send(b"hello")
        assert server.user_id(domain) == expected
        sock.close(linger=0)


def test_a_key_is_accepted_in_its_own_domain_only(ctx: zmq.Context, server: Server,
                                                  roles: Path) -> None:
    for domain, name in ((security.AGENTS_DOMAIN, "c1"), (security.AGENTS_DOMAIN, "o1"),
                         (security.CLIENTS_DOMAIN, "a1")):
        sock, ok = dial(ctx, server.endpoints[domain], roles, name)
        sock.close(linger=0)
        assert not ok, (domain, name)
    assert not server.socks[security.AGENTS_DOMAIN].poll(0)


def test_deleting_a_key_file_refuses_new_connections_at_once(ctx: zmq.Context, server: Server,
                                                             roles: Path) -> None:
    old, ok = dial(ctx, server.endpoints[security.AGENTS_DOMAIN], roles, "a1")
    assert ok
    (roles / "agents" / "a1.key").unlink()
    (roles / "operators" / "o1.key").unlink()
    for domain, name in ((security.AGENTS_DOMAIN, "a1"), (security.CLIENTS_DOMAIN, "o1")):
        sock, ok = dial(ctx, server.endpoints[domain], roles, name)
        sock.close(linger=0)
        assert not ok, f"{name} still admitted after its key file was deleted"
    # Documented limit: a connection made before the deletion keeps working.
    old.send(b"still here")
    assert server.user_id(security.AGENTS_DOMAIN) == "agent:a1"
    old.close(linger=0)
    # Other keys are unaffected, and a key added now is admitted without a restart.
    security.generate(roles, ["a3"], [])
    for name in ("a2", "a3"):
        sock, ok = dial(ctx, server.endpoints[security.AGENTS_DOMAIN], roles, name)
        sock.close(linger=0)
        assert ok, name


def test_parse_user_id() -> None:
    Peer, parse = security.Peer, security.parse_user_id
    assert parse("agent:a1") == Peer("agent", "a1")
    assert parse("submit:c-1.x") == Peer(ROLE_SUBMIT, "c-1.x")
    assert parse("operate:o1") == Peer(ROLE_OPERATE, "o1")
    for bad in (None, "", "anonymous", "agent:", ":a1", "root:a1", "agent:../x", "agent:a b",
                "Agent:a1", "agent:a1\n", "rYp#Z)1[w$3+9Nd@hZq9K(g8cH2JX6rZ}L-f0o/j"):
        assert parse(bad) is None, bad


# ---------------------------------------------------------------------------- HTTP binds


def test_check_http_bind_follows_the_bus_rule() -> None:
    check_http_bind = sockets.check_http_bind
    for hostport in ("127.0.0.1:9471", ":9471", "localhost:1", "[::1]:9471", "127.0.0.2:0"):
        check_http_bind(hostport, insecure=False, secured=False)
    for hostport in ("0.0.0.0:9471", "10.1.2.3:80", "[::]:9471"):
        with pytest.raises(BindError, match="not loopback"):
            check_http_bind(hostport, insecure=False, secured=False)
        check_http_bind(hostport, insecure=True, secured=False)
        check_http_bind(hostport, insecure=False, secured=True)


def test_agent_refuses_a_public_metrics_endpoint_without_keys(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "ffrtmp", "agent", "--name", "m1", "--work-dir", str(tmp_path),
         "--metrics", "0.0.0.0:0", "--cgroup", "none", "--limits", "best-effort",
         "--master", f"tcp://127.0.0.1:{free_port()}"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert proc.returncode != 0
    assert "refusing to bind 0.0.0.0:0" in proc.stderr, proc.stderr
