"""Backup and restore of the portal's own database (``manage.py dbbackup`` / ``dbrestore``).

SQLite: the sqlite3 online backup API copies the database in one step under
one read transaction, so the copy is the database as of one commit even while
the portal writes (WAL mode lets writers go on meanwhile); the copy is checked
(``PRAGMA integrity_check``) and renamed into place.  A restore copies the
backup into the database with the same API (one write transaction: other
connections see the old or the new database, never half of each) after
checking that the file is a sound SQLite database of this portal.

PostgreSQL: ``pg_dump -Fc`` (one repeatable-read snapshot, consistent while
the portal writes) and ``pg_restore --clean --if-exists --no-owner
--single-transaction`` (all or nothing).  The connection comes from the same
``DATABASES`` setting the portal uses, handed to the tools through libpq's
environment variables (the password never appears on a command line).

Both write ``<file>.partial`` and rename, so a failed backup never leaves a
file that looks complete.  docs/deploy.md says when to stop the portal.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: what pg_dump / pg_restore may take (a large database on a slow disk)
PG_TIMEOUT = 6 * 3600


class BackupError(Exception):
    """The backup or restore failed or was refused; the message says why in one sentence."""


def _partial(target: Path) -> Path:
    return target.with_name(target.name + ".partial")


def vendor(db: Mapping[str, Any]) -> str:
    engine = str(db["ENGINE"])
    if engine.endswith("sqlite3"):
        return "sqlite"
    if "postgresql" in engine:
        return "postgresql"
    raise BackupError(f"no backup procedure for database engine {engine}")


def backup(db: Mapping[str, Any], target: Path) -> str:
    """Write a consistent backup of ``db`` (a ``DATABASES`` entry) to ``target``; returns a summary."""
    target = target.resolve()
    if not target.parent.is_dir():
        raise BackupError(f"directory {target.parent} does not exist")
    partial = _partial(target)
    partial.unlink(missing_ok=True)
    try:
        what = _sqlite_backup(db, partial) if vendor(db) == "sqlite" else _pg_dump(db, partial)
        os.chmod(partial, 0o600)  # it holds password hashes and tokens' digests
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return f"{what}: {target.stat().st_size} bytes in {target}"


def restore(db: Mapping[str, Any], source: Path) -> str:
    """Replace database ``db``'s contents with the backup at ``source``; returns a summary."""
    if not source.is_file():
        raise BackupError(f"no backup file {source}")
    return _sqlite_restore(db, source) if vendor(db) == "sqlite" else _pg_restore(db, source)


# -- SQLite --------------------------------------------------------------------------------------


def _sqlite_path(db: Mapping[str, Any]) -> Path:
    name = str(db["NAME"])
    if name in ("", ":memory:") or name.startswith("file:"):
        raise BackupError(f"database {name!r} is not a file")
    return Path(name)


def _check_sqlite(path: Path, what: str) -> None:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            (verdict,) = conn.execute("PRAGMA integrity_check").fetchone()
            portal = conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE type='table' AND name='django_migrations'"
            ).fetchone()[0]
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{what} {path} is not a SQLite database: {exc}") from exc
    if verdict != "ok":
        raise BackupError(f"{what} {path} fails SQLite's integrity check: {verdict}")
    if not portal:
        raise BackupError(f"{what} {path} is not a Skyport database (no django_migrations table)")


def _sqlite_backup(db: Mapping[str, Any], partial: Path) -> str:
    path = _sqlite_path(db)
    if not path.is_file():
        raise BackupError(f"database file {path} does not exist")
    src = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    dst = sqlite3.connect(partial)
    try:
        src.backup(dst)  # pages=-1: one step, one read transaction, one consistent copy
    except sqlite3.Error as exc:
        raise BackupError(f"SQLite backup of {path} failed: {exc}") from exc
    finally:
        dst.close()
        src.close()
    with open(partial, "rb") as f:
        os.fsync(f.fileno())
    _check_sqlite(partial, "the backup")
    return f"SQLite online backup of {path}"


def _sqlite_restore(db: Mapping[str, Any], source: Path) -> str:
    path = _sqlite_path(db)
    _check_sqlite(source, "the backup")
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    dst = sqlite3.connect(path, timeout=30)
    try:
        src.backup(dst)
    except sqlite3.Error as exc:
        raise BackupError(f"SQLite restore into {path} failed: {exc}") from exc
    finally:
        dst.close()
        src.close()
    _check_sqlite(path, "the restored database")
    return f"restored {path} from {source} ({source.stat().st_size} bytes)"


# -- PostgreSQL ----------------------------------------------------------------------------------


def _pg_env(db: Mapping[str, Any]) -> dict[str, str]:
    """libpq's variables for the connection (the password goes in the environment, not on argv)."""
    env = dict(os.environ)
    pairs = {
        "PGHOST": db.get("HOST"),
        "PGPORT": db.get("PORT"),
        "PGUSER": db.get("USER"),
        "PGPASSWORD": db.get("PASSWORD"),
        "PGDATABASE": db.get("NAME"),
    }
    for key, value in pairs.items():
        env.pop(key, None)
        if value:
            env[key] = str(value)
    sslmode = (db.get("OPTIONS") or {}).get("sslmode")
    if sslmode:
        env["PGSSLMODE"] = str(sslmode)
    return env


def _pg_tool(argv: list[str], db: Mapping[str, Any]) -> None:
    if shutil.which(argv[0]) is None:
        raise BackupError(f"{argv[0]} is not installed (Debian package postgresql-client)")
    try:
        proc = subprocess.run(
            argv, env=_pg_env(db), capture_output=True, text=True, timeout=PG_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BackupError(f"{argv[0]} did not finish in {PG_TIMEOUT} s") from exc
    if proc.returncode != 0:
        detail = " ".join(proc.stderr.split())[-500:]
        raise BackupError(f"{argv[0]} failed: {detail}")


def _pg_dump(db: Mapping[str, Any], partial: Path) -> str:
    _pg_tool(["pg_dump", "--format=custom", "--no-password", f"--file={partial}"], db)
    return f"pg_dump -Fc of database {db['NAME']}"


def _pg_restore(db: Mapping[str, Any], source: Path) -> str:
    _pg_tool(["pg_restore", "--list", "--no-password", str(source)], db)  # refuses a file that is no dump
    _pg_tool(
        [
            "pg_restore",
            "--clean",
            "--if-exists",
            "--no-owner",
            "--single-transaction",
            "--exit-on-error",
            "--no-password",
            f"--dbname={db['NAME']}",
            str(source),
        ],
        db,
    )
    return f"restored database {db['NAME']} from {source} ({source.stat().st_size} bytes)"
