"""Isolation of peers on a LIVE master: no agent, client or subscriber can hurt the others.

Regression tests for attacks on `python -m ffrtmp master` (real processes, real sockets, CURVE
where stated). The contract they hold the master to:

A. With `--keys DIR` an agent's name is bound to its key (`DIR/agents/<name>.key`): another
   agent's key saying `HELLO name=<not mine>` gets `ERROR forbidden` (naming both names) and
   changes nothing; what that connection sends next is `ERROR unknown_agent`.
B. Without keys a name is held by the connection that has it: a second process saying HELLO with
   the same name gets `ERROR name_taken` ("already connected"); the same `instance` (the same
   agent process reconnecting) takes its name back.
C. An agent never holds more credit than it has slots (the excess is counted).
D. One client that pipelines expensive requests and never reads cannot stall the master for the
   others or make it buffer without bound: unread replies are dropped and counted.
E. A whole message is capped (not only each frame): `ERROR too_large` / `bad_frame`.
F. HELLO fields are bounded (`bad_body` naming the field), NODES is paged (`limit`, `after`,
   `next`), and a reply larger than the client's 8 MiB cap is `ERROR too_large`, not silence.
G. Subscribers that never read cost the master a bounded amount of memory.
H. An idempotency key reused with a different request is `ERROR conflict`.
I. Client keys have roles: `DIR/clients` may submit and read, `DIR/operators` may also
   CANCEL, RETRY and DRAIN; anything else is `ERROR forbidden`.
J. A spec with a bytes key is `ERROR bad_body`, not `internal`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from bus.client import Client, Subscriber
from bus.codec import HEADER, encode
from bus.errors import ClientError
from bus.security import PeerKeys, apply_peer, load_peer
from conftest import wait_for
from harness import ROOT, Cluster

MB = 1024 * 1024

# --------------------------------------------------------------------------- helpers


class IsoCluster(Cluster):
    """A Cluster whose agents are keyed by a label, so two processes may share a name."""

    def spawn_agent(self, label: str, name: str, slots: int, *extra: str,
                    ) -> tuple[subprocess.Popen[bytes], Path]:
        """Start `ffrtmp agent --name NAME` (own work dir and metrics port); (process, log)."""
        proc = self._spawn(f"agent-{label}", [
            "agent", "--master", self.agents_ep, "--name", name, "--slots", str(slots),
            "--work-dir", str(self.tmp / f"work-{label}"),
            "--metrics", self._metrics_arg(f"agent-{label}"), *extra])
        self.agents[label] = proc  # Cluster.close() stops every process in here
        return proc, self._logs[-1]

    def rss(self) -> int:
        """The master's resident set size, bytes."""
        return master_rss(self)

    def metric(self, name: str) -> float | None:
        """Sum over all label sets of one sample name on the master's /metrics (None: absent)."""
        return metric_value(self.scrape("master"), name)


def master_rss(cluster: Cluster) -> int:
    assert cluster.master is not None
    return int(psutil.Process(cluster.master.pid).memory_info().rss)


def metric_value(text: str, name: str) -> float | None:
    total, found = 0.0, False
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m and m.group(1) == name:
            total += float(m.group(3))
            found = True
    return total if found else None


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    try:
        yield context
    finally:
        while Peer.open:
            Peer.open.pop().close()
        context.destroy(linger=0)  # closes whatever else a test left open, then terms


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., IsoCluster]]:
    """make(master_args=..., metrics=..., client_keys=...) -> a started IsoCluster."""
    made: list[IsoCluster] = []

    def make(master_args: list[str] | None = None, metrics: bool = False,
             client_keys: PeerKeys | None = None) -> IsoCluster:
        tmp = tmp_path / f"cluster{len(made)}"
        tmp.mkdir()
        c = IsoCluster(tmp, f"sqlite:///{tmp}/ffrtmp.db", master_args=master_args,
                       metrics=metrics)
        c.client_keys = client_keys
        made.append(c)
        c.start_master()
        return c

    try:
        yield make
    finally:
        for c in made:
            c.close()


class Peer:
    """A raw DEALER speaking the wire protocol (bus.codec.encode out, plain msgpack in)."""

    open: list[Peer] = []  # closed by the ctx fixture

    def __init__(self, ctx: zmq.Context, endpoint: str, keys: PeerKeys | None = None,
                 identity: bytes | None = None, **options: int) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        apply_peer(self.sock, keys)
        if identity is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, identity)
        for opt, value in options.items():
            self.sock.setsockopt(getattr(zmq, opt.upper()), value)
        self.sock.connect(endpoint)
        Peer.open.append(self)
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.keepalive = False  # send HEARTBEAT while waiting (an agent that stays alive)
        self._last_beat = time.monotonic()

    def send(self, command: str, body: dict[str, Any] | None = None) -> None:
        self.sock.send_multipart(encode(command, body or {}))

    def recv(self, timeout: float) -> tuple[str, dict[str, Any]] | None:
        if not self.sock.poll(max(1, int(timeout * 1000))):
            return None
        frames = self.sock.recv_multipart()
        command = frames[1].decode("ascii", "replace") if len(frames) > 1 else "?"
        try:
            body = msgpack.unpackb(frames[2], raw=False, strict_map_key=False) \
                if len(frames) == 3 else {"frames": len(frames)}
        except Exception as e:  # a test helper: report, do not hide
            body = {"undecodable": repr(e)}
        item = (command, body if isinstance(body, dict) else {"body": body})
        self.seen.append(item)
        return item

    def until(self, done: Callable[[str, dict[str, Any]], bool], timeout: float,
              what: str) -> tuple[str, dict[str, Any]]:
        """The first message `done` accepts (keeping alive meanwhile if asked)."""
        start = len(self.seen)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self._beat()
            item = self.recv(min(left, 0.2))
            if item is not None and done(*item):
                return item
        got = [(c, b.get("code"), b.get("text", "")[:120]) for c, b in self.seen[start:]]
        raise AssertionError(f"no {what} within {timeout:g}s; got {got[-20:]}")

    def collect(self, seconds: float) -> list[tuple[str, dict[str, Any]]]:
        """Everything that arrives within `seconds` (a deadline, keeping alive meanwhile)."""
        start = len(self.seen)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._beat()
            self.recv(min(left, 0.1))
        return self.seen[start:]

    def reply(self, timeout: float = 10.0, what: str = "a reply") -> tuple[str, dict[str, Any]]:
        """The next WELCOME or ERROR (HELLO's answer), skipping nothing else but HEARTBEAT."""
        return self.until(lambda c, b: c in ("WELCOME", "ERROR", "REPLY", "SUBMITTED"),
                          timeout, what)

    def _beat(self) -> None:
        now = time.monotonic()
        if self.keepalive and now - self._last_beat >= 0.3:
            self._last_beat = now
            self.send("HEARTBEAT")

    def close(self) -> None:
        self.sock.close(linger=0)


def hello(name: str, slots: int = 1, **extra: Any) -> dict[str, Any]:
    """A HELLO body as a real agent sends it."""
    return {"name": name, "version": "test", "slots": slots,
            "resources": {"cpus": 1.0, "memory_mb": 1024, "disk_mb": 10_000},
            "workloads": ["noop", "sleep"], "encoders": [], "cgroup": "none",
            "limits": "best-effort", "running": [], "results": [], **extra}


def agent_node(cluster: Cluster, name: str) -> dict[str, Any] | None:
    nodes = [n for n in cluster.client.nodes() if n["name"] == name]
    return nodes[0] if nodes and nodes[0]["state"] in ("alive", "draining") else None


def wait_state(cluster: Cluster, job_id: int, states: tuple[str, ...], timeout: float,
               ) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def reached() -> bool:
        found.update(cluster.job(job_id))
        return found["state"] in states

    try:
        wait_for(reached, timeout, interval=0.05)
    except AssertionError as e:
        raise AssertionError(f"job {job_id} not in {states} (is {found.get('state')}): {e}\n"
                             f"{cluster.dump_logs()}") from None
    return found


def log_lines(path: Path, needle: str) -> list[str]:
    try:
        return [ln for ln in path.read_text(errors="replace").splitlines() if needle in ln]
    except OSError:
        return []


# --------------------------------------------------------------------------- CURVE keys


def make_keys(directory: Path) -> Path:
    """Keys for agents a1, a2, client c1 and operator o1, laid out as `ffrtmp keys generate`.

    Uses `ffrtmp keys generate DIR --agent a1 --agent a2 --client c1 --operator o1`; while that
    flag does not exist, writes the same layout with zmq.auth.create_certificates.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "ffrtmp", "keys", "generate", str(directory), "--agent", "a1",
         "--agent", "a2", "--client", "c1", "--operator", "o1"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=False)
    if done.returncode != 0:
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        zmq.auth.create_certificates(directory, "master")
        private = directory / "private"
        private.mkdir(mode=0o700)
        for kind, names in (("agents", ["a1", "a2"]), ("clients", ["c1"]),
                            ("operators", ["o1"])):
            (directory / kind).mkdir()
            for name in names:
                public, secret = zmq.auth.create_certificates(private, name)
                shutil.move(public, directory / kind / f"{name}.key")
                os.chmod(secret, 0o600)
    for path in ("master.key", "master.key_secret", "agents/a1.key", "agents/a2.key",
                 "clients/c1.key", "operators/o1.key", "private/a2.key_secret",
                 "private/c1.key_secret", "private/o1.key_secret"):
        assert (directory / path).is_file(), f"key layout: {path} missing"
    return directory


def peer_keys(keys: Path, name: str) -> PeerKeys:
    return load_peer(str(keys / "private" / f"{name}.key_secret"), str(keys / "master.key"))


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    return make_keys(tmp_path / "keys")


@pytest.fixture
def secure(make_cluster: Callable[..., IsoCluster], keys: Path) -> IsoCluster:
    """A CURVE master (`--keys DIR`, metrics on); its `client` is client c1."""
    return make_cluster(master_args=["--keys", str(keys)], metrics=True,
                        client_keys=peer_keys(keys, "c1"))


def keyed_agent(cluster: IsoCluster, keys: Path, name: str, slots: int = 2) -> None:
    cluster.spawn_agent(name, name, slots, "--key", str(keys / "private" / f"{name}.key_secret"),
                        "--master-key", str(keys / "master.key"))
    wait_for(lambda: agent_node(cluster, name) is not None, 20,
             message=f"keyed agent {name} registered")


def running_sleep(cluster: IsoCluster, seconds: float) -> dict[str, Any]:
    (job_id,) = cluster.client.submit([{"scenario": "sleep", "params": {"seconds": seconds}}])
    return wait_state(cluster, job_id, ("running",), 15)


# --------------------------------------------------------------------------- A: names bound to keys


def test_curve_agent_key_cannot_claim_another_agents_name_or_forge_its_results(
        secure: IsoCluster, keys: Path, ctx: zmq.Context) -> None:
    keyed_agent(secure, keys, "a1")
    job = running_sleep(secure, 4)
    job_id = job["id"]
    assert (job["agent"], job["attempt"]) == ("a1", 1), job

    impostor = Peer(ctx, secure.agents_ep, keys=peer_keys(keys, "a2"))
    impostor.send("HELLO", hello("a1", running=[{"id": job_id, "attempt": 1}]))
    command, body = impostor.reply(what="an answer to HELLO name=a1 from key a2")
    assert (command, body.get("code")) == ("ERROR", "forbidden"), (command, body)
    assert "a1" in body["text"] and "a2" in body["text"], body

    # It never said a HELLO that counted: its forged result is not taken.
    impostor.send("DONE", {"id": job_id, "attempt": 1, "status": "completed", "reason": None,
                           "exit_code": 0, "bytes_in": 0, "bytes_out": 999_999,
                           "duration_s": 0.1})
    command, body = impostor.until(lambda c, b: c == "ERROR", 10, "ERROR for the forged DONE")
    assert body.get("code") == "unknown_agent", body
    now = secure.job(job_id)
    assert (now["state"], now["attempt"], now["agent"]) == ("running", 1, "a1"), now

    final = secure.wait_terminal([job_id], 30)[job_id]
    assert final["state"] == "completed" and final["agent"] == "a1", final
    assert final["bytes_out"] != 999_999, final
    events = secure.job(job_id, events=True)["events"]
    completed = [e for e in events if e["state"] == "completed"]
    assert len(completed) == 1 and completed[0]["agent"] == "a1", events
    assert secure.metric("ffrtmp_agent_hellos_total") == 1, "a1 had to say HELLO again"


def test_curve_agent_key_saying_hello_as_another_does_not_requeue_its_jobs(
        secure: IsoCluster, keys: Path, ctx: zmq.Context) -> None:
    keyed_agent(secure, keys, "a1")
    job = running_sleep(secure, 4)
    impostor = Peer(ctx, secure.agents_ep, keys=peer_keys(keys, "a2"))
    impostor.send("HELLO", hello("a1", running=[]))  # "I run nothing": would requeue a1's job
    command, body = impostor.reply(what="an answer to HELLO name=a1 running=[] from key a2")
    now = secure.job(job["id"])
    assert (now["state"], now["attempt"], now["agent"]) == ("running", 1, "a1"), \
        f"a2's HELLO as a1 touched a1's job: {now['state']} attempt {now['attempt']} ({command} " \
        f"{body})"
    assert (command, body.get("code")) == ("ERROR", "forbidden"), (command, body)
    final = secure.wait_terminal([job["id"]], 30)[job["id"]]
    assert (final["state"], final["attempt"], final["agent"]) == ("completed", 1, "a1"), final


# --------------------------------------------------------------------------- B: duplicate names


def test_second_agent_process_with_a_taken_name_is_refused(
        make_cluster: Callable[..., IsoCluster]) -> None:
    cluster = make_cluster(metrics=True)
    first, _ = cluster.spawn_agent("same-1", "same", 2)
    wait_for(lambda: agent_node(cluster, "same") is not None, 20, message="first agent")
    second, second_log = cluster.spawn_agent("same-2", "same", 2)

    def master_lines() -> list[str]:
        return [ln for ln in cluster.log_text("master").splitlines() if "already connected" in ln]

    try:
        wait_for(lambda: log_lines(second_log, "already connected"), 15,
                 message="the second agent to log 'already connected'")
        wait_for(master_lines, 5,
                 message="the master to log 'already connected'")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{cluster.dump_logs()}") from None
    agent_lines = log_lines(second_log, "already connected")
    assert len(agent_lines) == 1 and "name_taken" in agent_lines[0], agent_lines
    assert len(master_lines()) == 1, master_lines()

    ids = cluster.client.submit([{"scenario": "sleep", "params": {"seconds": 0.1}}] * 20)
    final = cluster.wait_terminal(ids, 60)
    bad = [(j["id"], j["state"], j["reason"], j["attempt"]) for j in final.values()
           if j["state"] != "completed" or j["attempt"] != 1]
    assert not bad, f"jobs lost to the name fight: {bad}"
    same = [n for n in cluster.client.nodes() if n["name"] == "same"]
    assert len(same) == 1 and same[0]["state"] == "alive", same
    assert first.poll() is None, "the first agent died"
    assert cluster.metric("ffrtmp_agent_hellos_total") == 1, "the first agent had to reconnect"


def test_raw_hello_with_a_taken_name_is_refused_unless_same_instance(
        cluster: Cluster, ctx: zmq.Context) -> None:
    x = Peer(ctx, cluster.agents_ep)
    x.keepalive = True
    x.send("HELLO", hello("n", instance="i1", workloads=["noop"]))
    assert x.reply(what="WELCOME for X")[0] == "WELCOME", x.seen

    y = Peer(ctx, cluster.agents_ep)
    y.send("HELLO", hello("n", instance="i2", workloads=["noop"]))
    command, body = y.reply(what="an answer to Y's HELLO")
    assert (command, body.get("code")) == ("ERROR", "name_taken"), (command, body)
    assert "already connected" in body["text"], body

    # X still holds the name: the master heartbeats it and its credit gets it work.
    beats = len([c for c, _ in x.seen if c == "HEARTBEAT"])
    x.until(lambda c, b: c == "HEARTBEAT" and len(
        [m for m, _ in x.seen if m == "HEARTBEAT"]) > beats, 5, "a HEARTBEAT for X")
    x.send("CREDIT", {"n": 1})
    (job_id,) = cluster.client.submit([{"scenario": "noop"}])
    x.until(lambda c, b: c == "JOB" and b.get("id") == job_id, 10, f"JOB {job_id} for X")
    x.send("DONE", {"id": job_id, "attempt": 1, "status": "completed", "bytes_out": 7,
                    "duration_s": 0.0})
    final = cluster.wait_terminal([job_id], 10)[job_id]
    assert (final["state"], final["agent"], final["bytes_out"]) == ("completed", "n", 7), final

    # The same instance on a new connection is the same process reconnecting: accepted.
    z = Peer(ctx, cluster.agents_ep)
    z.send("HELLO", hello("n", instance="i1", workloads=["noop"]))
    command, body = z.reply(what="an answer to Z's HELLO (same instance)")
    assert command == "WELCOME", (command, body)


# --------------------------------------------------------------------------- C: credit <= slots


@pytest.mark.parametrize("how", ["one_credit_of_200", "200_credits_of_1"])
def test_credit_is_capped_at_slots(make_cluster: Callable[..., IsoCluster], ctx: zmq.Context,
                                   how: str) -> None:
    cluster = make_cluster(metrics=True)
    ids = cluster.client.submit([{"scenario": "sleep", "params": {"seconds": 60}}] * 200)
    assert len(ids) == 200
    agent = Peer(ctx, cluster.agents_ep)
    agent.keepalive = True
    agent.send("HELLO", hello("greedy", slots=1, workloads=["sleep"]))
    assert agent.reply(what="WELCOME")[0] == "WELCOME", agent.seen
    if how == "one_credit_of_200":
        agent.send("CREDIT", {"n": 200})
    else:
        for _ in range(200):
            agent.send("CREDIT", {"n": 1})
    got = agent.collect(2.0)
    jobs = [b["id"] for c, b in got if c == "JOB"]
    assert len(jobs) <= 1, f"an agent with 1 slot got {len(jobs)} JOBs"
    capped = cluster.metric("ffrtmp_agent_credit_capped_total")
    assert capped is not None and capped > 0, f"ffrtmp_agent_credit_capped_total = {capped}"


# --------------------------------------------------------------------------- D: a flooding client


@pytest.mark.slow
def test_a_client_that_pipelines_and_never_reads_cannot_stall_the_master(
        make_cluster: Callable[..., IsoCluster], ctx: zmq.Context) -> None:
    cluster = make_cluster(metrics=True)
    cluster.spawn_agent("worker", "worker", 4)
    wait_for(lambda: agent_node(cluster, "worker") is not None, 20, message="worker")
    ids = cluster.client.submit([{"scenario": "noop"}] * 1000)
    cluster.wait_terminal(ids, 60)
    running = running_sleep(cluster, 6)
    hellos_before = cluster.metric("ffrtmp_agent_hellos_total")
    rss_before = rss_peak = cluster.rss()

    attacker = Peer(ctx, cluster.clients_ep, rcvhwm=1, rcvbuf=4096, sndhwm=10_000)
    for i in range(2000):
        attacker.send("LIST", {"rid": i, "limit": 1000})
    latencies: list[float] = []
    with Client(cluster.clients_ep, timeout=5) as probe:
        for _ in range(30):
            started = time.monotonic()
            try:
                probe.stats()
                latencies.append(time.monotonic() - started)
            except ClientError as e:
                assert e.code == "timeout", e
                latencies.append(float("inf"))
                break  # stalled: no need to wait out 29 more timeouts
            finally:
                rss_peak = max(rss_peak, cluster.rss())

    def figures() -> str:
        hellos = cluster.metric("ffrtmp_agent_hellos_total")  # (/metrics has its own thread)
        return (f"STATS latency median {statistics.median(latencies):.3f}s worst "
                f"{max(latencies):.3f}s over {len(latencies)} requests; master RSS "
                f"+{(rss_peak - rss_before) / MB:.0f} MB; agent HELLOs {hellos_before} -> "
                f"{hellos}; replies dropped "
                f"{cluster.metric('ffrtmp_client_replies_dropped_total')}")

    if max(latencies) > 0.5:
        message = f"one client stalled the master: {figures()}"
        assert cluster.master is not None
        cluster.kill9(cluster.master)  # still serving the flood, it would take 10 s to stop
        raise AssertionError(message)
    final = cluster.wait_terminal([running["id"]], 30)[running["id"]]
    rss_peak = max(rss_peak, cluster.rss())
    attacker.close()
    assert (final["state"], final["attempt"]) == ("completed", 1), f"{final} {figures()}"
    assert cluster.metric("ffrtmp_agent_hellos_total") == hellos_before == 1, \
        f"the agent had to reconnect: {figures()}"
    assert rss_peak - rss_before <= 150 * MB, f"master buffered replies nobody reads: {figures()}"
    dropped = cluster.metric("ffrtmp_client_replies_dropped_total")
    assert dropped is not None and dropped > 0, f"unread replies not counted: {figures()}"
    print(figures())  # the figures docs/PERFORMANCE.md quotes (pytest -s shows them)


# --------------------------------------------------------------------------- E: whole-message caps


def test_whole_message_size_and_frame_count_are_capped(
        cluster: Cluster, ctx: zmq.Context) -> None:
    cluster.client.stats()
    before = master_rss(cluster)
    sender = Peer(ctx, cluster.clients_ep, sndhwm=1000)
    frame = b"\x00" * (7 * MB)  # under the 8 MiB per-frame cap; 40 of them are 280 MiB
    for round_ in range(3):
        sender.sock.send_multipart([frame] * 40, copy=False)
        command, body = sender.until(lambda c, b: c == "ERROR", 60,
                                     f"ERROR for the 280 MiB message (round {round_ + 1})")
        assert body.get("code") == "too_large", body
        assert any(s in body.get("text", "") for s in ("8388608", "8 MiB", "8MiB")), \
            f"the text should state the limit: {body}"
    after = master_rss(cluster)
    assert after - before <= 60 * MB, \
        f"master RSS grew {(after - before) / MB:.0f} MB across three 280 MiB messages"

    sender.sock.send_multipart([HEADER, b"STATS", msgpack.packb({"rid": 1}), b"x", b"y"])
    command, body = sender.until(lambda c, b: c == "ERROR", 10, "ERROR for 5 frames")
    assert body.get("code") in ("bad_frame", "too_large"), body
    assert cluster.master is not None and cluster.master.poll() is None, "master died"
    assert isinstance(cluster.client.stats()["agents"], int)


# ------------------------------------------------------------------ F: bounded HELLO and NODES


def test_oversized_hello_fields_are_refused_and_nodes_still_answers(
        cluster: Cluster, ctx: zmq.Context) -> None:
    encoders = [f"{i:06d}" + "e" * 24 for i in range(30_000)]  # 30 000 x 30 chars: ~930 KB
    peers = []
    for i in range(10):
        peer = Peer(ctx, cluster.agents_ep)
        peer.send("HELLO", hello(f"big{i}", encoders=encoders))
        peers.append(peer)
    answers = [p.reply(timeout=20, what="an answer to a 930 KB HELLO") for p in peers]
    for command, body in answers:
        assert (command, body.get("code")) == ("ERROR", "bad_body"), (command, body)
        assert "HELLO.encoders" in body["text"], body
    done = cluster.cli("nodes", "list", "--json", timeout=30)
    assert done.returncode == 0, done.stderr
    names = [n["name"] for n in json.loads(done.stdout)]
    assert not [n for n in names if n.startswith("big")], names

    peer = Peer(ctx, cluster.agents_ep)
    peer.send("HELLO", hello("evil\nname"))
    command, body = peer.reply(what="an answer to a HELLO with a newline in its name")
    assert (command, body.get("code")) == ("ERROR", "bad_body"), (command, body)
    assert "HELLO.name" in body["text"], body


def test_nodes_is_paged(cluster: Cluster, ctx: zmq.Context) -> None:
    names = [f"p{i}" for i in range(5)]
    for name in names:
        peer = Peer(ctx, cluster.agents_ep)
        peer.send("HELLO", hello(name))
        assert peer.reply(what=f"WELCOME for {name}")[0] == "WELCOME", peer.seen
    wait_for(lambda: len(cluster.client.nodes()) == 5, 10, message="5 nodes known")

    first = cluster.client.request("NODES", limit=2)
    assert [n["name"] for n in first["nodes"]] == names[:2], first
    assert isinstance(first.get("next"), str), f"no 'next' cursor: {first}"
    second = cluster.client.request("NODES", limit=2, after=first["next"])
    assert [n["name"] for n in second["nodes"]] == names[2:4], second
    assert isinstance(second.get("next"), str), second
    third = cluster.client.request("NODES", limit=2, after=second["next"])
    assert [n["name"] for n in third["nodes"]] == names[4:], third
    assert third.get("next") is None, third

    done = cluster.cli("nodes", "list", "--json")
    assert done.returncode == 0, done.stderr
    assert sorted(n["name"] for n in json.loads(done.stdout)) == names


def test_a_reply_over_the_clients_limit_is_an_error_not_silence(cluster: Cluster) -> None:
    # A spec may carry an input path of up to 1 KiB: 8,000 such jobs are a GET reply of more
    # than 8 MiB (the clients' cap).
    spec = {"scenario": "720p-h264", "input": "in/" + "/".join(["a" * 200] * 5)}
    ids: list[int] = []
    for _ in range(4):  # 2,000 specs (~2.5 MB) per SUBMIT, under the 8 MiB request cap
        ids += cluster.client.submit([spec] * 2000)
    with Client(cluster.clients_ep, timeout=5) as client, pytest.raises(ClientError) as err:
        client.get(ids)
    assert err.value.code == "too_large", f"{err.value.code}: {err.value.text}"
    jobs, _ = cluster.client.get(ids[:10])  # a smaller request still works
    assert len(jobs) == 10


# --------------------------------------------------------------------------- G: slow subscribers


@pytest.mark.slow
def test_subscribers_that_never_read_cost_bounded_memory(
        make_cluster: Callable[..., IsoCluster], ctx: zmq.Context) -> None:
    cluster = make_cluster()
    for name in ("g1", "g2"):
        cluster.spawn_agent(name, name, 8)
    wait_for(lambda: all(agent_node(cluster, n) for n in ("g1", "g2")), 20, message="agents")
    subs, monitors = [], []
    for _ in range(30):
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 1)
        sub.setsockopt(zmq.RCVBUF, 4096)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        monitors.append(sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED))
        sub.connect(cluster.events_ep)
        subs.append(sub)
    for mon in monitors:
        assert mon.poll(10_000), "a subscriber did not connect"
        recv_monitor_message(mon)
    for sub, mon in zip(subs, monitors, strict=True):
        sub.disable_monitor()
        mon.close(linger=0)

    before = peak = cluster.rss()
    started = time.monotonic()
    for _ in range(20):
        ids = cluster.client.submit([{"scenario": "noop"}] * 1000)
        final = cluster.wait_terminal(ids, 120)
        assert all(j["state"] == "completed" for j in final.values())
        peak = max(peak, cluster.rss())
    took = time.monotonic() - started
    for sub in subs:
        sub.close(linger=0)
    assert peak - before <= 80 * MB, \
        f"30 stuck subscribers grew the master by {(peak - before) / MB:.0f} MB " \
        f"(20 000 jobs in {took:.0f}s)"


# ------------------------------------------------------------------ H: idempotency conflict


def test_idempotency_key_reused_for_a_different_request_is_a_conflict(
        cluster: Cluster, ctx: zmq.Context) -> None:
    a, b = {"scenario": "noop"}, {"scenario": "noop", "priority": "high"}
    ids = cluster.client.submit([a], idempotency_key="k1")
    assert cluster.client.submit([a], idempotency_key="k1") == ids
    with pytest.raises(ClientError) as err:
        cluster.client.submit([b], idempotency_key="k1")
    assert err.value.code == "conflict" and "k1" in err.value.text, \
        f"{err.value.code}: {err.value.text}"

    # The same within one turn (the first is not committed yet when the second is read).
    peer = Peer(ctx, cluster.clients_ep)
    peer.send("SUBMIT", {"rid": 1, "specs": [a], "idempotency_key": "k2"})
    peer.send("SUBMIT", {"rid": 2, "specs": [a], "idempotency_key": "k2"})
    peer.send("SUBMIT", {"rid": 3, "specs": [b], "idempotency_key": "k2"})
    replies = {}
    for _ in range(3):
        command, body = peer.reply(what="a SUBMIT reply")
        replies[body.get("rid")] = (command, body)
    assert replies[1][0] == replies[2][0] == "SUBMITTED", replies
    assert replies[2][1]["ids"] == replies[1][1]["ids"], replies
    command, body = replies[3]
    assert (command, body.get("code")) == ("ERROR", "conflict") and "k2" in body["text"], body


# --------------------------------------------------------------------------- I: roles


def test_client_keys_have_roles(secure: IsoCluster, keys: Path) -> None:
    c1 = secure.client
    ids = c1.submit([{"scenario": "noop"}, {"scenario": "noop"}])
    jobs, missing = c1.get(ids)
    assert len(jobs) == 2 and not missing
    assert {j["id"] for j in c1.list_jobs()} >= set(ids)
    assert c1.nodes() == []
    assert isinstance(c1.stats()["agents"], int)

    for what, call in (("CANCEL", lambda: c1.cancel([ids[0]])),
                       ("DRAIN", lambda: c1.drain("a1"))):
        with pytest.raises(ClientError) as err:
            call()
        assert err.value.code == "forbidden", f"c1 {what}: {err.value.code}: {err.value.text}"
    assert secure.job(ids[0])["state"] == "queued"

    with Client(secure.clients_ep, timeout=5, keys=peer_keys(keys, "o1")) as o1:
        assert o1.cancel([ids[0]]) == [{"id": ids[0], "result": "cancelled"}]
        with pytest.raises(ClientError) as err:
            c1.retry(ids[0])
        assert err.value.code == "forbidden", f"c1 RETRY: {err.value.code}: {err.value.text}"
        assert o1.retry(ids[0]) > ids[1]

    sub = Subscriber(["stats"], secure.events_ep, keys=peer_keys(keys, "c1"))
    try:
        wait_for(lambda: sub.recv(0.2) is not None, 10, message="a stats event for c1")
    finally:
        sub.close()


# --------------------------------------------------------------------------- J: bytes keys


@pytest.mark.parametrize("spec", [
    {"scenario": "noop", b"x": 1},
    {"scenario": "noop", "zz": 1, b"x": 1},  # two unknown keys: sorting str with bytes
], ids=["one_bytes_key", "bytes_and_str_unknown_keys"])
def test_spec_with_a_bytes_key_is_bad_body_not_internal(
        cluster: Cluster, ctx: zmq.Context, spec: dict[Any, Any]) -> None:
    peer = Peer(ctx, cluster.clients_ep)
    peer.send("SUBMIT", {"rid": "bin", "specs": [spec]})
    command, body = peer.reply(what="a reply to the SUBMIT")
    assert (command, body.get("code")) == ("ERROR", "bad_body"), (command, body)
    assert body.get("rid") == "bin", body
    assert cluster.client.submit([{"scenario": "noop"}])

