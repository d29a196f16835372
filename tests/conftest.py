"""Shared test harness for ffrtmp.

Rules every test follows:

* A test that needs an external thing (PostgreSQL, root + cgroups, ffmpeg) carries the matching
  marker (``postgres``, ``cgroups``, ``ffmpeg``) and/or uses the fixtures below. Locally a missing
  thing *skips* with a clear reason; in CI (``CI=true``) it *fails*: see :func:`require`.
  A test that does not apply to this host at all (e.g. cgroup v2 tests on a cgroup v1 host) calls
  :func:`skip_not_applicable`, the only skip CI accepts on those suites.
* Tests never ``time.sleep`` to wait for something: they poll with :func:`wait_for`.
* Ports come from :func:`free_port` / :func:`free_ports`; databases from ``db_url`` / ``pg_url``.

The helpers are plain functions; import them with ``from conftest import wait_for, free_port``
(``tests/`` has no ``__init__.py`` on purpose, so pytest puts it on ``sys.path``).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest
from hypothesis import HealthCheck, settings

T = TypeVar("T")

IN_CI = os.environ.get("CI") == "true"

#: Markers whose tests must run (not skip) in CI.
MANDATORY_MARKERS = ("postgres", "cgroups", "ffmpeg", "ui")

#: Skips with this reason prefix are accepted in CI even on mandatory suites.
NOT_APPLICABLE_PREFIX = "not applicable on this host: "

DEFAULT_PG_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/test"

# Hypothesis: CI machines are small and busy; timing-based checks there only produce flakes.
settings.register_profile(
    "ci",
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if IN_CI else "default"))


# --------------------------------------------------------------------------- requirements


def require(condition: bool, reason: str) -> None:
    """Skip the current test locally when ``condition`` is false; fail it in CI."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def skip_not_applicable(reason: str) -> None:
    """Skip a test that cannot apply to this host at all (accepted in CI, unlike other skips)."""
    pytest.skip(NOT_APPLICABLE_PREFIX + reason)


def _cgroup2_mounts() -> list[str]:
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    mounts = (line.split() for line in lines)
    return [parts[1] for parts in mounts if len(parts) > 2 and parts[2] == "cgroup2"]


def cgroup_mode() -> str | None:
    """``"v2"`` (unified), ``"v1"`` (legacy/hybrid with a cpu controller) or ``None``."""
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return "v2"
    if os.path.isdir("/sys/fs/cgroup/cpu"):
        return "v1"
    return None


def have_root_cgroups() -> bool:
    """True when running as root with a writable cgroup v1 cpu controller or cgroup2 mount."""
    if os.geteuid() != 0:
        return False
    v1_cpu = "/sys/fs/cgroup/cpu"
    if os.path.isdir(v1_cpu) and os.access(v1_cpu, os.W_OK):
        return True
    return any(
        os.path.exists(os.path.join(mnt, "cgroup.procs")) and os.access(mnt, os.W_OK)
        for mnt in _cgroup2_mounts()
    )


def find_ffmpeg() -> str | None:
    """The ffmpeg an agent would use (PATH, else imageio-ffmpeg's), or None."""
    from agent.ffmpeg.discovery import NoFFmpeg
    from agent.ffmpeg.discovery import find_ffmpeg as discover

    try:
        return discover()
    except NoFFmpeg:
        return None


@pytest.fixture(autouse=True)
def _mandatory_requirements(request: pytest.FixtureRequest) -> None:
    """Marking a test ``postgres``/``cgroups``/``ffmpeg``/``ui`` is enough to require the thing."""
    node = request.node
    if node.get_closest_marker("cgroups"):
        require(
            have_root_cgroups(),
            f"needs root (euid is {os.geteuid()}) and a writable cgroup hierarchy",
        )
    if node.get_closest_marker("ffmpeg"):
        require(find_ffmpeg() is not None, "no ffmpeg on PATH and imageio-ffmpeg has no binary")
    if node.get_closest_marker("postgres"):
        request.getfixturevalue("pg_server_url")
    if node.get_closest_marker("ui"):
        missing = [t for t in ("tmux", "chromium") if shutil.which(t) is None]
        require(not missing, f"needs {' and '.join(missing)} (apt-get install {' '.join(missing)})")


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [
        f"ffrtmp: CI={IN_CI} euid={os.geteuid()} cgroups={cgroup_mode()} "
        f"root_cgroups={have_root_cgroups()} ffmpeg={find_ffmpeg()} "
        f"pg={_redact(os.environ.get('FFRTMP_TEST_PG', DEFAULT_PG_SERVER_URL))}"
    ]


# --------------------------------------------------------------------------- PostgreSQL


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _pg_connect(url: str):  # -> psycopg2 connection
    import psycopg2

    return psycopg2.connect(url, connect_timeout=3)


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """URL of a reachable PostgreSQL server database (``FFRTMP_TEST_PG``); skip/fail if down."""
    import psycopg2

    url = os.environ.get("FFRTMP_TEST_PG", DEFAULT_PG_SERVER_URL)
    error = ""
    try:
        _pg_connect(url).close()
    except psycopg2.Error as exc:
        error = " ".join(str(exc).split()) or type(exc).__name__
    require(not error, f"PostgreSQL not reachable at {_redact(url)}: {error}")
    return url


@pytest.fixture
def pg_url(pg_server_url: str) -> Iterator[str]:
    """A fresh, empty database ``ffrtmp_t_<hex>`` on the test server, dropped afterwards."""
    name = f"ffrtmp_t_{uuid.uuid4().hex[:12]}"
    _pg_admin(pg_server_url, f'CREATE DATABASE "{name}" TEMPLATE template0')
    parts = urlsplit(pg_server_url)
    try:
        yield urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))
    finally:
        _pg_admin(pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _pg_admin(server_url: str, sql: str) -> None:
    conn = _pg_connect(server_url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
    ]
)
def db_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """Each test using it runs twice: on a fresh SQLite file and on a fresh PostgreSQL db."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ffrtmp.db"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def ctx():  # -> Iterator[zmq.Context]
    """A ZeroMQ context for the test's own sockets, destroyed (closing them all) afterwards."""
    import zmq

    context = zmq.Context()
    try:
        yield context
    finally:
        context.destroy(linger=0)


# --------------------------------------------------------------------------- a running master


@pytest.fixture
def cluster(tmp_path):  # -> Iterator[harness.Cluster]
    """A master on a fresh SQLite file, started; the test starts the agents it needs."""
    from harness import Cluster  # here, not at the top: harness imports this module

    c = Cluster(tmp_path, f"sqlite:///{tmp_path}/ffrtmp.db")
    try:
        c.start_master()
        yield c
    finally:
        c.close()


# --------------------------------------------------------------------------- ports and waiting


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """One TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def wait_for(
    predicate: Callable[[], T], timeout: float, interval: float = 0.02, message: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy and return that value.

    Raises ``AssertionError`` (with ``message``) if it is still falsy after ``timeout`` seconds.
    Exceptions from ``predicate`` propagate. This is the only sanctioned way for a test to wait.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            what = message or getattr(predicate, "__qualname__", repr(predicate))
            raise AssertionError(
                f"timed out after {timeout:g}s waiting for {what} (last value: {value!r})"
            )
        time.sleep(min(interval, remaining))


# --------------------------------------------------------------------------- CI: no skipped suites

_mandatory_items: dict[str, tuple[str, ...]] = {}
_mandatory_skips: list[tuple[str, tuple[str, ...], str]] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        marks = tuple(m for m in MANDATORY_MARKERS if item.get_closest_marker(m))
        if marks:
            _mandatory_items[item.nodeid] = marks


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    marks = _mandatory_items.get(report.nodeid)
    if not marks:
        return
    reason = _skip_reason(report)
    if not reason.startswith(NOT_APPLICABLE_PREFIX):
        _mandatory_skips.append((report.nodeid, marks, reason))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if IN_CI and _mandatory_skips and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not (IN_CI and _mandatory_skips):
        return
    tr = terminalreporter
    tr.write_sep("=", f"{len(_mandatory_skips)} mandatory test(s) skipped in CI", red=True)
    for nodeid, marks, reason in _mandatory_skips:
        tr.write_line(f"SKIPPED-IN-CI [{','.join(marks)}] {nodeid}: {reason}")
