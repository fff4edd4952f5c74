"""tests/pg/run (make pytest-pg): the throwaway PostgreSQL cluster is stopped and removed, pass or fail."""

from __future__ import annotations

import glob
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.hostcaps import require

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "tests/pg/run"


def _running(pid: int) -> bool:
    """Alive and not a zombie (PID 1 may reap late on these machines)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return not re.search(r"^State:\s*Z", status, re.M)


def _run(tmp_path: Path, test_source: str) -> tuple[subprocess.CompletedProcess[str], int, Path]:
    require(
        bool(glob.glob("/usr/lib/postgresql/*/bin/initdb")),
        "PostgreSQL's initdb (Debian package postgresql, in the Makefile's DEBS)",
    )
    test = tmp_path / "test_probe.py"
    test.write_text(test_source)
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CI")}
    env.update(SKYPORT_PG_TESTS=str(test), SKYPORT_PG_ARTIFACTS=str(tmp_path / "artifacts"))
    out = subprocess.run(
        [str(RUN), "-q", "-p", "no:cacheprovider", "-p", "no:django"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    started = re.search(r"\(PID (\d+)\) on (\S+)/run,", out.stdout)
    assert started, out.stdout + out.stderr
    return out, int(started[1]), Path(started[2])


@pytest.mark.slow
def test_the_cluster_is_stopped_and_removed_when_the_tests_fail(tmp_path: Path) -> None:
    out, pid, base = _run(tmp_path, "def test_fails():\n    assert 1 == 2\n")
    assert out.returncode == 1, out.stdout + out.stderr  # pytest's status, passed through
    assert "1 failed" in out.stdout
    assert base.name.startswith("pg-test-") and not base.exists()
    assert not _running(pid), f"the server (PID {pid}) still runs"
    assert "database system is shut down" in (tmp_path / "artifacts/pg-server.log").read_text()


@pytest.mark.slow
def test_the_tests_get_a_database_url_of_that_cluster(tmp_path: Path) -> None:
    source = (
        "import os, psycopg\n"
        "def test_connects():\n"
        "    with psycopg.connect(os.environ['DATABASE_URL'].replace('postgres://', 'postgresql://')) as c:\n"
        "        assert c.execute('select current_user').fetchone() == ('skyport',)\n"
        "        assert c.execute('show listen_addresses').fetchone() == ('',)\n"
    )
    out, pid, base = _run(tmp_path, source)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed" in out.stdout
    assert not base.exists() and not _running(pid)


@pytest.mark.parametrize("ci", ["", "1"])
def test_without_postgresql_it_skips_locally_and_fails_in_ci(tmp_path: Path, ci: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(SKYPORT_PG_BINDIR=str(tmp_path / "no-such-dir"), SKYPORT_PG_ARTIFACTS=str(tmp_path))
    if ci:
        env["CI"] = ci
    out = subprocess.run([str(RUN)], env=env, capture_output=True, text=True, timeout=60)
    assert f"no initdb/pg_ctl found in {tmp_path / 'no-such-dir'}" in out.stderr
    if ci:
        assert (
            out.returncode == 1 and "pytest-pg: FAILED: PostgreSQL is required when CI is set" in out.stderr
        )
    else:
        assert out.returncode == 0 and "pytest-pg: SKIPPED" in out.stderr
