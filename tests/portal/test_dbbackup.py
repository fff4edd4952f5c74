"""The portal's database backup: ``manage.py dbbackup`` / ``dbrestore`` on SQLite, for real.

A migrated SQLite database in a file, a thread writing to it (pairs of rows in
one transaction each) while ``dbbackup`` runs in another process: the backup
holds whole pairs only (one consistent moment), restores into a new file equal
to the backup, and ``manage.py check`` and ``migrate --check`` pass on it.
Bad files are refused and change nothing.  The PostgreSQL path is
``test_dbbackup_pg.py`` (run by tests/pg/run).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from django.conf import settings

ROOT = Path(settings.BASE_DIR)
# SQLite files whatever the test database: the PostgreSQL pass leaves this module out
pytestmark = pytest.mark.db_agnostic


def _manage(db: Path, *args: str, var: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DATABASE_URL=f"sqlite:///{db}", SKYPORT_VAR_DIR=str(var))
    env.pop("DJANGO_SETTINGS_MODULE", None)  # the production settings, as an operator runs it
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def _pairs(db: Path) -> set[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {r[0] for r in conn.execute("SELECT slug FROM tenancy_tenant WHERE slug LIKE 'w%'")}
    finally:
        conn.close()


def _whole(slugs: set[str]) -> bool:
    """Every pair written in one transaction is there with both rows, or not at all."""
    return all(s[:-1] + ("b" if s.endswith("a") else "a") in slugs for s in slugs)


class Writer(threading.Thread):
    """Writes pairs of tenants, one transaction per pair, as fast as SQLite lets it."""

    def __init__(self, db: Path) -> None:
        super().__init__(daemon=True)
        self.db, self.done, self.pairs = db, threading.Event(), 0

    def run(self) -> None:
        conn = sqlite3.connect(self.db, timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        try:
            while not self.done.is_set():
                n = self.pairs
                conn.execute("BEGIN IMMEDIATE")
                for half in "ab":
                    conn.execute(
                        "INSERT INTO tenancy_tenant (slug, name, active, network_egress, created_at) "
                        "VALUES (?, ?, 1, 1, datetime('now'))",
                        (f"w{n:06d}-{half}", "x" * 150),
                    )
                conn.execute("COMMIT")
                self.pairs = n + 1
        finally:
            conn.close()


def test_sqlite_backup_while_writing_restores_consistent_and_equal(tmp_path: Path) -> None:
    src, backup, restored = (tmp_path / f"{n}.sqlite3" for n in ("src", "backup", "restored"))
    assert _manage(src, "migrate", "--noinput", "-v0", var=tmp_path).returncode == 0
    writer = Writer(src)
    writer.start()
    try:
        while writer.pairs < 2000:  # some data first, so the copy takes a while
            time.sleep(0.01)
        before = writer.pairs
        out = _manage(src, "dbbackup", str(backup), var=tmp_path)
        during = writer.pairs - before
    finally:
        writer.done.set()
        writer.join(30)
    assert out.returncode == 0, out.stderr
    assert "SQLite online backup" in out.stdout and str(backup) in out.stdout
    assert during > 0, "the writer should have committed while dbbackup ran"
    assert backup.stat().st_mode & 0o777 == 0o600 and not Path(f"{backup}.partial").exists()
    saved = _pairs(backup)
    assert _whole(saved) and 2 * before <= len(saved) <= 2 * writer.pairs
    assert saved <= _pairs(src)
    # restore into a new database: equal to the backup, and a sound portal database
    out = _manage(restored, "dbrestore", str(backup), var=tmp_path)
    assert out.returncode == 0, out.stderr
    a, b = sqlite3.connect(backup), sqlite3.connect(restored)
    try:
        assert list(a.iterdump()) == list(b.iterdump())
    finally:
        a.close()
        b.close()
    for check in (("check",), ("migrate", "--check")):
        out = _manage(restored, *check, var=tmp_path)
        assert out.returncode == 0, (check, out.stdout, out.stderr)


def test_bad_files_are_refused_and_change_nothing(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite3"
    assert _manage(db, "migrate", "--noinput", "-v0", var=tmp_path).returncode == 0
    before = db.read_bytes()
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a database" * 100)
    other = tmp_path / "other.sqlite3"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    for bad, why in (
        (tmp_path / "missing", "no backup file"),
        (junk, "is not a SQLite database"),
        (other, "is not a Skyport database"),
    ):
        out = _manage(db, "dbrestore", str(bad), var=tmp_path)
        assert out.returncode != 0 and why in out.stderr, (bad, out.stderr)
    assert db.read_bytes() == before
    out = _manage(db, "dbbackup", str(tmp_path / "no-such-dir" / "b"), var=tmp_path)
    assert out.returncode != 0 and "does not exist" in out.stderr


@pytest.mark.parametrize("name", [":memory:"])
def test_an_in_memory_database_cannot_be_backed_up(name: str, tmp_path: Path) -> None:
    from portal.dbbackup import BackupError, backup

    with pytest.raises(BackupError, match="is not a file"):
        backup({"ENGINE": "django.db.backends.sqlite3", "NAME": name}, tmp_path / "b")
