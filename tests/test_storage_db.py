"""storage.db and storage.backends: URL parsing, defaults, SQLite pragmas, password
redaction, the backend table."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import peewee
import pytest

from storage import BACKENDS, StorageError, Store, backend_for, default_db_url, open_database
from storage.backends import KNOWN, POSTGRESQL, SQLITE, backend_named
from storage.db import redact_url


def test_default_db_url_uses_xdg_data_home_and_creates_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_db_url() == f"sqlite:///{tmp_path}/xdg/ffrtmp/ffrtmp.db"
    assert not (tmp_path / "xdg").exists()
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_db_url() == f"sqlite:///{tmp_path}/.local/share/ffrtmp/ffrtmp.db"


def test_sqlite_urls_absolute_relative_memory(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    db = open_database(f"sqlite:///{tmp_path}/deep/er/x.db")  # sqlite:////abs/path
    assert isinstance(db, peewee.SqliteDatabase) and db.database == f"{tmp_path}/deep/er/x.db"
    assert (tmp_path / "deep" / "er").is_dir()
    monkeypatch.chdir(tmp_path)
    assert open_database("sqlite:///rel/y.db").database.endswith("rel/y.db")
    assert (tmp_path / "rel").is_dir()
    assert open_database("sqlite:///:memory:").database == ":memory:"
    with Store("sqlite:///:memory:") as s:
        assert s.backend == "sqlite" and s.max_job_id() == 0


def test_sqlite_pragmas(tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path}/p.db")
    pragmas = {p: db.execute_sql(f"PRAGMA {p}").fetchone()[0] for p in
               ("journal_mode", "synchronous", "busy_timeout", "foreign_keys", "cache_size")}
    db.close()
    assert pragmas == {"journal_mode": "wal", "synchronous": 1, "busy_timeout": 5000,
                       "foreign_keys": 1, "cache_size": -64000}


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_postgresql_urls(scheme: str) -> None:
    db = open_database(f"{scheme}://u:p%40ss@db.example:6543/jobs?sslmode=require")
    assert isinstance(db, peewee.PostgresqlDatabase) and db.database == "jobs"
    params = db.connect_params
    assert (params["host"], params["port"], params["user"], params["password"]) == (
        "db.example", 6543, "u", "p@ss")
    assert params["sslmode"] == "require" and params["connect_timeout"] > 0


@pytest.mark.parametrize("url", ["mysql://x/y", "nonsense", "sqlite://", "sqlite:///",
                                 "postgresql://127.0.0.1:5432/", "postgresql://h:99999999/x"])
def test_bad_urls_raise_storage_error(url: str) -> None:
    with pytest.raises(StorageError) as err:
        open_database(url)
    assert "\n" not in str(err.value)


def test_password_never_shown() -> None:
    assert redact_url("postgresql://u:secret@h:1/d") == "postgresql://u:***@h:1/d"
    assert redact_url("postgresql://u@h/d") == "postgresql://u@h/d"
    with pytest.raises(StorageError) as err:
        Store("postgresql://u:secret@127.0.0.1:1/d")
    assert "secret" not in str(err.value) and "***" in str(err.value)


def test_backend_table_is_looked_up_by_scheme_and_name(tmp_path: Path) -> None:
    assert set(BACKENDS) == {"sqlite", "postgresql", "postgres"}
    for scheme, backend in BACKENDS.items():
        assert scheme in backend.schemes and backend_named(scheme) is backend
    assert len({b.name for b in KNOWN}) == len(KNOWN)
    assert backend_for("POSTGRES://h/d") is POSTGRESQL and backend_named(" PG ") is POSTGRESQL
    assert backend_for("sqlite:///x.db") is SQLITE and backend_named("mysql") is None
    assert repr(SQLITE) == "Backend('sqlite')"
    with pytest.raises(StorageError, match="use sqlite:///PATH or postgresql://"):
        backend_for("mysql://x/y")
    with Store(f"sqlite:///{tmp_path}/k.db") as s:
        assert s.kind is SQLITE and s.backend == "sqlite" and "'sqlite'" in repr(s)
        assert s.errors == (peewee.PeeweeException, sqlite3.Error)
