"""The CLI as a user meets it (issue 11), against a real master and agents.

Timeouts that hold, one-line errors, failures readable at a glance and printed once, `jobs list`
filters and truncation, `jobs cancel` ranges and --state, submit's output options, the events
endpoint the master announces, and `--wait` without per-job polling.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from bus.client import Client, Subscriber
from conftest import free_port, wait_for
from ffrtmp import cli as ffrtmp_cli
from ffrtmp import client_cli
from harness import ROOT, Cluster

pytestmark = pytest.mark.timeout(180)

ISO_LOCAL = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path}/ffrtmp.db")
    try:
        c.start_master()
        c.start_agent("cli-a", 4)
        yield c
    finally:
        c.close()


@pytest.fixture
def idle(tmp_path: Path) -> Iterator[Cluster]:
    """A master with no agent: every job stays queued."""
    c = Cluster(tmp_path, f"sqlite:///{tmp_path}/ffrtmp.db")
    try:
        c.start_master()
        yield c
    finally:
        c.close()


def ffrtmp(*args: str, env: dict[str, str] | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m ffrtmp ARGS` with no FFRTMP_* from the test's environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FFRTMP_")}
    return subprocess.run([sys.executable, "-m", "ffrtmp", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout, check=False,
                          env={**base, "PYTHONPATH": str(ROOT), **(env or {})})


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def one_line(proc: subprocess.CompletedProcess[str], status: int = 2) -> str:
    assert proc.returncode == status, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ---- 1. every request honours --timeout; endpoints work or are refused in one line ------------


@pytest.mark.parametrize("args", [
    ["jobs", "list"],
    ["jobs", "show", "1"],
    ["jobs", "watch", "1"],
    ["jobs", "cancel", "1..5"],
    ["jobs", "cancel", "--state", "queued"],
    ["nodes", "list"],
    ["submit", "noop"],
    ["submit", "noop", "--count", "12000"],  # three SUBMIT chunks
    ["submit", "noop", "--count", "3", "--wait"],
], ids=lambda a: "-".join(a))
def test_no_master_every_command_ends_within_the_timeout(args: list[str]) -> None:
    port = free_port()
    started = time.monotonic()
    proc = ffrtmp("--master", f"127.0.0.1:{port}", "--timeout", "2", *args, timeout=30)
    took = time.monotonic() - started
    line = one_line(proc)
    assert line == f"ffrtmp: timeout: no reply from master at tcp://127.0.0.1:{port} within 2s"
    assert proc.stdout == ""
    assert took < 6, f"took {took:.1f}s with --timeout 2"


def test_endpoints_that_cannot_work_are_refused_in_one_line() -> None:
    cases = [
        (["--master", "http://h:1", "jobs", "list"], {}, "--master 'http://h:1': expected"),
        (["--master", "127.0.0.1", "jobs", "list"], {}, "--master '127.0.0.1': expected"),
        (["--events-ep", "nonsense", "jobs", "list"], {}, "--events-ep 'nonsense': expected"),
        (["jobs", "list"], {"FFRTMP_EVENTS": "nonsense"}, "FFRTMP_EVENTS 'nonsense': expected"),
        (["jobs", "list"], {"FFRTMP_MASTER": "nohost"}, "FFRTMP_MASTER 'nohost': expected"),
    ]
    for args, env, needle in cases:
        started = time.monotonic()
        proc = ffrtmp(*args, env=env, timeout=30)
        line = one_line(proc)
        assert line.startswith("ffrtmp: ") and needle in line, (args, line)
        assert time.monotonic() - started < 6, args


def test_a_connect_libzmq_refuses_is_one_line_not_a_hang() -> None:
    """The >10 min hang, reproduced: an endpoint that passes the syntax check but that libzmq
    refuses to connect (here an ipc path over the kernel's 108 bytes) raised out of connect()
    with the socket left open, and Client.close() then waited in Context.term() for ever."""
    long_ipc = "ipc:///tmp/" + "x" * 200
    started = time.monotonic()
    proc = ffrtmp("--master", long_ipc, "--timeout", "2", "jobs", "list", timeout=20)
    line = one_line(proc)
    assert line.startswith("ffrtmp: cannot connect to 'ipc:///tmp/xxx") and "long" in line
    assert time.monotonic() - started < 6


def test_closing_a_client_never_waits_for_a_socket_left_open() -> None:
    """The cause of the >10 min hang: a socket of the client's context left open (there, by a
    connect that raised) made Context.term() in Client.close() wait forever."""
    for make in (lambda: Client(f"tcp://127.0.0.1:{free_port()}", timeout=1),
                 lambda: Subscriber(["job."], f"tcp://127.0.0.1:{free_port()}")):
        obj = make()
        ctx = obj._ctx  # type: ignore[union-attr]
        leftover = ctx.socket(zmq.DEALER)  # what a failed connect used to leave behind
        leftover.connect(f"tcp://127.0.0.1:{free_port()}")
        done = threading.Event()
        thread = threading.Thread(target=lambda o=obj, d=done: (o.close(), d.set()),
                                  daemon=True)
        thread.start()
        assert done.wait(5), f"{type(obj).__name__}.close() hung on a leftover socket"


# ---- 2. jobs watch of an unknown job -----------------------------------------------------------


def test_watch_unknown_job_is_not_found_like_show(cluster: Cluster) -> None:
    for command in ("watch", "show"):
        proc = cluster.cli("jobs", command, "99999")
        assert one_line(proc) == "ffrtmp: not_found: job 99999 not found", command
        assert proc.stdout == ""


# ---- 4. failures readable at a glance, each finished job printed once --------------------------


def finished_lines(proc: subprocess.CompletedProcess[str], job_id: int) -> list[str]:
    """Lines about job_id's end, on stdout and stderr (state lines of a wait excluded)."""
    lines = (proc.stdout + proc.stderr).splitlines()
    states = {f"job {job_id}: {s}" for s in ("queued", "assigned", "running", "cancelling")}
    return [ln for ln in lines if ln.startswith(f"job {job_id}:") and ln.strip() not in states]


def test_a_failure_is_printed_once_with_its_reason(cluster: Cluster) -> None:
    proc = cluster.cli("submit", "sleep", "--set", "seconds=5", "--timeout", "0.3", "--wait")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    job_id = int(proc.stdout.splitlines()[0].rsplit(" ", 1)[1])
    assert finished_lines(proc, job_id) == [f"job {job_id}: timed_out (timeout)"]

    done = cluster.cli("submit", "noop", "--count", "2", "--wait")
    assert done.returncode == 0
    for line in done.stdout.splitlines()[1:]:
        assert re.fullmatch(r"job \d+: completed  took \d+\.\d\ds", line), line
        assert "->" not in line  # a noop writes nothing

    # --json: stdout is JSON only; each failure once on stderr.
    proc = cluster.cli("submit", "sleep", "--set", "seconds=5", "--timeout", "0.3", "--wait",
                       "--json")
    job = json.loads(proc.stdout)["jobs"][0]
    assert proc.stderr.strip().splitlines() == [f"job {job['id']}: timed_out (timeout)"]


@pytest.mark.ffmpeg
def test_ffmpeg_failure_shows_the_error_line_and_show_has_the_whole_story(
        tmp_path: Path) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path}/ffrtmp.db")
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    (inputs / "corrupt.mp4").write_bytes(os.urandom(20_000))
    try:
        c.start_master()
        c.start_agent("enc", 2, "--input-root", str(inputs), "--output-root", str(outputs))
        bad = c.cli("submit", "720p-h264", "--input", "corrupt.mp4", "--output", "g.mp4",
                    "--wait")
        assert bad.returncode == 1, (bad.stdout, bad.stderr)
        bad_id = int(bad.stdout.splitlines()[0].rsplit(" ", 1)[1])
        lines = finished_lines(bad, bad_id)
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"job {bad_id}: failed (invalid_input): ")
        assert "Invalid data found" in lines[0] and "->" not in lines[0]
        assert not (outputs / "g.mp4").exists()

        # 4 s of media: long enough for PROGRESS (≤ 2/s) to arrive before the end even on an
        # idle machine (1 s encoded in 0.34 s once, with no PROGRESS at all: no bar to see).
        good = ok(c.cli("submit", "720p-h264", "--input", "testsrc:duration=4", "--output",
                        "clips/{id}.mp4", "--wait"))
        good_id = int(good.stdout.splitlines()[0].rsplit(" ", 1)[1])
        written = outputs / "clips" / f"{good_id}.mp4"
        assert written.is_file()
        lines = finished_lines(good, good_id)
        assert len(lines) == 1 and lines[0].startswith(
            f"job {good_id}: completed -> {written}  "), lines
        assert "%" in good.stderr  # the progress bar of one job, from the events

        text = ok(c.cli("jobs", "show", str(good_id))).stdout
        fields = dict(line.strip().split(": ", 1) for line in text.splitlines()
                      if re.match(r"^ +[a-z ]+: ", line))
        assert fields["input"] == "testsrc:duration=4"
        assert fields["output"] == f"clips/{good_id}.mp4"
        assert fields["written"].startswith(f"{written}  (")
        assert "-c:v libx264" in fields["ffmpeg"] and fields["ffmpeg"].endswith(".mp4")
        for key in ("created", "started", "finished"):
            assert ISO_LOCAL.match(fields[key]), (key, fields[key])
        assert "took" in fields["finished"]
        assert re.search(r"#\d+ +\S+ +running -> completed +attempt 1 +enc", text), text

        text = ok(c.cli("jobs", "show", str(bad_id))).stdout
        assert text.startswith(f"job {bad_id}: failed (invalid_input)")
        assert "written: nothing" in text and "Invalid data found" in text
        assert "stderr tail:" in text and "    | " in text
        assert re.search(r"running -> failed +attempt 1 +enc +invalid_input", text), text
    finally:
        c.close()


def test_wait_again_with_the_same_idempotency_key_ends_at_once(cluster: Cluster) -> None:
    """A repeated key answers with jobs that may have ended before the wait's stream position:
    the wait must not wait for events that are already behind it."""
    args = ("submit", "noop", "--count", "3", "--idempotency-key", "again", "--wait")
    first = ok(cluster.cli(*args, timeout=30))
    started = time.monotonic()
    second = ok(cluster.cli(*args, timeout=30))
    assert time.monotonic() - started < 10
    assert second.stdout == first.stdout


def test_jobs_show_renders_times_and_the_audit_trail(cluster: Cluster) -> None:
    job_id = cluster.client.submit([{"scenario": "sleep", "params": {"seconds": 0.1}}])[0]
    cluster.wait_terminal([job_id], timeout=20)
    text = ok(cluster.cli("jobs", "show", str(job_id))).stdout
    assert text.startswith(f"job {job_id}: completed\n")
    assert re.search(r"created: " + ISO_LOCAL.pattern, text)
    assert re.search(r"finished: " + ISO_LOCAL.pattern + r"  \(took \d", text)
    trail = [line.split() for line in text.split("events:\n")[1].splitlines()]
    assert [row[4] for row in trail] == ["queued", "assigned", "running", "completed"]
    assert [int(row[0][1:]) for row in trail] == sorted(int(row[0][1:]) for row in trail)
    assert all(ISO_LOCAL.fullmatch(row[1]) for row in trail)


# ---- 5. jobs list: columns, filters, truncation; jobs cancel: ranges, --state -----------------


@pytest.mark.slow  # left out of the per-version CI runs
def test_jobs_list_columns_filters_and_truncation(cluster: Cluster) -> None:
    ids = cluster.client.submit([{"scenario": "noop"}] * 3
                                + [{"scenario": "sleep", "params": {"seconds": 0}}] * 2)
    cluster.wait_terminal(ids, timeout=20)

    text = ok(cluster.cli("jobs", "list")).stdout.splitlines()
    assert text[0].split() == ["ID", "SCENARIO", "STATE", "PRIO", "ATT", "AGENT", "PROG",
                               "CREATED", "TOOK", "REASON", "OUTPUT"]
    assert len(text) == 6 and text[1].split()[0] == str(ids[-1])
    row = text[1].split()
    assert re.fullmatch(r"\d\d:\d\d:\d\d", row[7]) and re.fullmatch(r"\d+\.\d\ds", row[8])

    narrow = ffrtmp("--master", cluster.clients_ep, "jobs", "list", env={"COLUMNS": "50"})
    lines = ok(narrow).stdout.splitlines()
    assert all(len(line) <= 50 for line in lines), lines
    assert lines[0].split()[:3] == ["ID", "SCENARIO", "STATE"] and len(lines) == 6

    def listed(*args: str) -> list[int]:
        return [j["id"] for j in json.loads(ok(cluster.cli("jobs", "list", "--json",
                                                             *args)).stdout)]

    assert listed("--scenario", "sleep") == ids[:2:-1]
    assert listed("--scenario", "noop,sleep") == ids[::-1]
    assert listed("--scenario", "noop", "--scenario", "sleep") == ids[::-1]
    assert listed("--agent", "cli-a") == ids[::-1]
    assert listed("--agent", "nobody") == []
    assert listed("--since", "10m") == ids[::-1]
    assert listed("--since", "2000-01-01") == ids[::-1]
    assert listed("--since", "2999-01-01T00:00") == []
    assert listed("--state", "completed", "--scenario", "noop", "--since", "1h") == ids[2::-1]
    line = one_line(cluster.cli("jobs", "list", "--since", "yesterday"))
    assert line.startswith("ffrtmp jobs list: --since 'yesterday': expected an age")

    page = cluster.cli("jobs", "list", "--limit", "2")
    assert len(ok(page).stdout.splitlines()) == 3
    assert page.stderr.strip() == f"… more; use --limit or --before {ids[-2]}"
    assert ok(cluster.cli("jobs", "list", "--limit", "5")).stderr == ""
    rest = listed("--before", str(ids[-2]))
    assert rest == ids[2::-1]


def test_jobs_cancel_takes_the_ranges_submit_prints(idle: Cluster) -> None:
    out = ok(idle.cli("submit", "noop", "--count", "6")).stdout.strip()
    span = out.split(": ", 1)[1]
    first, last = (int(x) for x in span.split(".."))
    assert out == f"submitted 6 job(s): {first}..{last}"
    lines = ok(idle.cli("jobs", "cancel", f"{first}..{first + 2}", f"{first + 4},{last}")
               ).stdout.splitlines()
    assert lines == [f"job {i}: cancelled" for i in (first, first + 1, first + 2, first + 4,
                                                     last)]
    assert idle.job(first + 3)["state"] == "queued"
    for bad, needle in (("9..3", "ends before it starts"), ("x", "'x' is not a job id"),
                        ("1...3", "'1...3' is not a job id")):
        line = one_line(idle.cli("jobs", "cancel", bad))
        assert line.startswith("ffrtmp jobs cancel: ") and needle in line, line
    assert "name jobs" in one_line(idle.cli("jobs", "cancel"))
    line = one_line(idle.cli("jobs", "cancel", f"{last + 100}..{last + 101}"), status=1)
    assert line == f"ffrtmp: not_found: jobs {last + 100}..{last + 101} not found"


def test_jobs_cancel_state_queued_pages_and_chunks(idle: Cluster) -> None:
    """10,500 queued jobs: LIST is paged (1000 a page), CANCEL sent in chunks of 10,000."""
    ids: list[int] = []
    for _ in range(3):
        ids += idle.client.submit([{"scenario": "noop"}] * 3500)
    listed = json.loads(ok(idle.cli("jobs", "list", "--limit", "1500", "--json")).stdout)
    assert [j["id"] for j in listed] == ids[::-1][:1500]
    proc = ok(idle.cli("jobs", "cancel", "--state", "queued", timeout=120))
    assert proc.stdout.strip() == "10500 job(s): 10500 cancelled"
    assert all(j["state"] == "cancelled" for j in idle.jobs(ids).values())
    assert ok(idle.cli("jobs", "cancel", "--state", "queued")).stdout.strip() == \
        "no queued jobs to cancel"


# ---- 6. submit: output templates, overwrite, retry_timeouts ------------------------------------


def test_submit_output_options_reach_the_spec(idle: Cluster) -> None:
    def submitted(*args: str) -> list[dict[str, Any]]:
        ids = json.loads(ok(idle.cli("submit", *args, "--json")).stdout)["ids"]
        got = idle.jobs(ids)
        return [got[i] for i in ids]

    plain = submitted("sleep", "--set", "seconds=1")[0]["spec"]
    assert not plain.get("overwrite") and not plain.get("retry_timeouts")
    flagged = submitted("sleep", "--set", "seconds=1", "--overwrite", "--retry-timeouts")
    assert flagged[0]["spec"]["overwrite"] is True
    assert flagged[0]["spec"]["retry_timeouts"] is True

    jobs = submitted("720p-h264", "--input", "testsrc:duration=1", "--output",
                     "out/{id}.mp4", "--count", "3")
    assert [j["output"] for j in jobs] == [f"out/{j['id']}.mp4" for j in jobs]
    # {n} counts through the whole --count, also past a SUBMIT chunk (5000 specs).
    jobs = submitted("720p-h264", "--input", "testsrc:duration=1", "--output", "n/{n}.mp4",
                     "--count", "5002")
    assert [jobs[i]["output"] for i in (0, 1, 4999, 5000, 5001)] == [
        "n/0.mp4", "n/1.mp4", "n/4999.mp4", "n/5000.mp4", "n/5001.mp4"]

    line = one_line(idle.cli("submit", "720p-h264", "--input", "testsrc:duration=1",
                             "--output", "c.mp4", "--count", "2"))
    assert line.startswith("ffrtmp submit: --count 2 would write every job to 'c.mp4'")
    line = one_line(idle.cli("submit", "1080p-vp9", "--input", "testsrc:duration=1",
                             "--output", "x.mp4"))
    assert line.startswith("ffrtmp: invalid_spec: specs[0].output: ") and "webm" in line


# ---- 7. the events endpoint comes from the master (INFO) unless given ---------------------------


def test_wait_and_watch_use_the_events_endpoint_the_master_announces(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    c = Cluster(tmp_path, f"sqlite:///{tmp_path}/ffrtmp.db",
                master_args=["--events", f"tcp://0.0.0.0:{port}", "--insecure"])
    seen: list[str] = []
    real = client_cli.EventFollower

    def recording(client: Client, events_ep: str, *args: Any, **kw: Any) -> Any:
        seen.append(events_ep)
        return real(client, events_ep, *args, **kw)

    monkeypatch.setattr(client_cli, "EventFollower", recording)
    for var in ("FFRTMP_EVENTS", "FFRTMP_MASTER"):
        monkeypatch.delenv(var, raising=False)
    try:
        c.start_master()
        c.start_agent("ev", 2)
        master = c.clients_ep.replace("tcp://", "")  # scheme-less, as a user types it
        assert ffrtmp_cli.main(["--master", master, "submit", "sleep", "--set", "seconds=0.2",
                                "--wait"]) == 0
        assert seen == [f"tcp://127.0.0.1:{port}"]  # 0.0.0.0 -> the host of --master
        job_id = c.client.submit([{"scenario": "sleep", "params": {"seconds": 3}}])[0]
        assert ffrtmp_cli.main(["--master", master, "jobs", "watch", str(job_id)]) == 0
        assert seen[-1] == f"tcp://127.0.0.1:{port}"
        monkeypatch.setenv("FFRTMP_EVENTS", f"127.0.0.1:{port}")
        assert ffrtmp_cli.main(["--master", master, "submit", "noop", "--wait"]) == 0
        assert seen[-1] == f"tcp://127.0.0.1:{port}"
        assert ffrtmp_cli.main(["--master", master, "--events-ep", "127.0.0.1:1", "submit",
                                "noop", "--wait"]) == 0  # gaps filled from EVENTS
        assert seen[-1] == "tcp://127.0.0.1:1"
        out = capsys.readouterr().out
        assert out.count(": completed") == 4
    finally:
        c.close()


@pytest.mark.slow  # left out of the per-version CI runs
def test_wait_says_when_the_master_is_gone_and_carries_on_after_its_restart(
        cluster: Cluster) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FFRTMP_")}
    lines: list[str] = []
    with subprocess.Popen(
            [sys.executable, "-m", "ffrtmp", "--master", cluster.clients_ep, "--timeout", "1",
             "submit", "sleep", "--set", "seconds=12", "--wait"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env={**env, "PYTHONPATH": str(ROOT)}) as proc:
        assert proc.stderr is not None and proc.stdout is not None
        err = proc.stderr
        reader = threading.Thread(target=lambda: lines.extend(err), daemon=True)
        reader.start()
        try:
            running = wait_for(lambda: cluster.client.list_jobs(states=["running"]), 20)
            assert cluster.master is not None
            cluster.kill9(cluster.master)
            wait_for(lambda: any("still waiting" in line for line in lines), 20,
                     message="the wait saying the master is gone")
            cluster.start_master()
            proc.wait(timeout=60)
            reader.join(10)
            stdout, stderr = proc.stdout.read(), "".join(lines)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, (stdout, stderr)
    assert stdout.splitlines()[1].startswith(f"job {running[0]['id']}: completed")
    assert f"ffrtmp: timeout: no reply from master at {cluster.clients_ep} within 1s; still " \
           "waiting (Ctrl-C to stop)" in stderr
    assert "ffrtmp: the master answers again" in stderr


def test_ffrtmp_events_is_documented() -> None:
    ops = (ROOT / "docs" / "OPERATIONS.md").read_text()
    assert "FFRTMP_EVENTS" in ops
    assert "FFRTMP_EVENTS" in ffrtmp("--help").stdout


@pytest.mark.ffmpeg
def test_progress_of_a_remote_style_master_without_events_flag(tmp_path: Path) -> None:
    """The master binds events on a wildcard host and no --events-ep is given: `--wait` still
    shows the live progress bar (PROGRESS only travels on the PUB socket)."""
    port = free_port()
    c = Cluster(tmp_path, f"sqlite:///{tmp_path}/ffrtmp.db",
                master_args=["--events", f"tcp://0.0.0.0:{port}", "--insecure"])
    try:
        c.start_master()
        c.start_agent("enc", 1, "--output-root", str(tmp_path / "out"))
        proc = ok(ffrtmp("--master", c.clients_ep, "submit", "720p-h264", "--input",
                         "testsrc:duration=4", "--output", "p.mp4", "--wait"))
        assert re.search(r"job \d+ \[[#-]+\] +\d+\.\d%", proc.stderr), proc.stderr
    finally:
        c.close()


# ---- 8. --wait follows the event stream: no per-job GET polling --------------------------------


def client_messages_in(c: Cluster) -> float:
    for line in c.scrape().splitlines():
        if line.startswith("ffrtmp_bus_messages_total{") and 'socket="client"' in line \
                and 'direction="in"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_wait_on_many_jobs_needs_a_handful_of_requests(tmp_path: Path) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path}/ffrtmp.db", metrics=True)
    try:
        c.start_master()
        c.start_agent("w1", 8)
        c.client.stats()
        before = client_messages_in(c)
        proc = ok(c.cli("submit", "noop", "--count", "3000", "--wait", timeout=120))
        requests = client_messages_in(c) - before
        # INFO + SUBMIT + EVENTS catch-ups; the old engine sent a GET per terminal event.
        assert requests <= 30, requests
        assert "3000 jobs: 3000 completed" in proc.stdout
        assert "3000/3000 finished" in proc.stderr
        assert len(proc.stdout.splitlines()) == 2  # the submitted line and the summary

        before = client_messages_in(c)
        proc = ok(c.cli("submit", "noop", "--count", "200", "--wait", "--json", timeout=60))
        out = json.loads(proc.stdout)
        assert [j["id"] for j in out["jobs"]] == out["ids"]
        assert {j["state"] for j in out["jobs"]} == {"completed"}
        assert client_messages_in(c) - before <= 20  # one GET for the 200 views at the end
    finally:
        c.close()
