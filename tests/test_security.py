"""CURVE encryption and ZAP authentication with separate allow-lists for agents and clients."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from bus.client import Client, Subscriber
from bus.errors import ClientError
from bus.security import KeyMaterialError, generate, load_peer
from bus.sockets import AGENT_MAX_MSG, BindError, bind_router, is_loopback
from conftest import free_port, wait_for
from harness import Cluster


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
