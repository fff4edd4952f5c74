"""The portal's database backup on PostgreSQL: ``dbbackup`` (pg_dump -Fc) while a thread writes,
then ``dbrestore`` (pg_restore, one transaction) puts exactly that moment back.

Runs in the PostgreSQL pass (tests/pg/run runs tests/portal on a throwaway
cluster); on SQLite it is skipped with the reason (test_dbbackup.py covers
SQLite).
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connection, transaction

from portal.tenancy.models import Tenant

pytestmark = [
    pytest.mark.skipif(
        connection.vendor != "postgresql",
        reason="PostgreSQL backup (pg_dump/pg_restore) needs the PostgreSQL pass: tests/pg/run",
    ),
    pytest.mark.django_db(transaction=True),
]


class Writer(threading.Thread):
    """Creates pairs of tenants, one transaction per pair, through its own connection."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.done, self.pairs = threading.Event(), 0

    def run(self) -> None:
        from django.db import connection as own

        try:
            while not self.done.is_set():
                n = self.pairs
                with transaction.atomic():
                    Tenant.objects.create(slug=f"w{n:06d}-a", name="x" * 150)
                    Tenant.objects.create(slug=f"w{n:06d}-b", name="x" * 150)
                self.pairs = n + 1
        finally:
            own.close()


def _slugs() -> set[str]:
    return set(Tenant.objects.filter(slug__startswith="w").values_list("slug", flat=True))


def test_pg_backup_while_writing_and_restore(tmp_path: Path) -> None:
    dump = tmp_path / "portal.dump"
    Tenant.objects.create(slug="kept", name="Kept")
    writer = Writer()
    writer.start()
    try:
        while writer.pairs < 200:
            time.sleep(0.01)
        before = writer.pairs
        call_command("dbbackup", str(dump), verbosity=0)
        during = writer.pairs - before
    finally:
        writer.done.set()
        writer.join(30)
    assert during > 0, "the writer should have committed while pg_dump ran"
    assert dump.stat().st_mode & 0o777 == 0o600
    listing = subprocess.run(["pg_restore", "--list", str(dump)], capture_output=True, text=True, check=True)
    assert "TABLE DATA public tenancy_tenant" in listing.stdout
    final = _slugs()
    # lose data after the backup, then restore: the backup's moment is back, whole pairs only
    Tenant.objects.filter(slug__startswith="w").delete()
    Tenant.objects.filter(slug="kept").update(name="changed")
    Tenant.objects.create(slug="after-backup", name="After")
    call_command("dbrestore", str(dump), verbosity=0)
    connection.close()
    restored = _slugs()
    assert all(s[:-1] + ("b" if s.endswith("a") else "a") in restored for s in restored)
    assert 2 * before <= len(restored) <= len(final) and restored <= final
    assert Tenant.objects.get(slug="kept").name == "Kept"
    assert not Tenant.objects.filter(slug="after-backup").exists()
    call_command("check", verbosity=0)
    call_command("migrate", check=True, verbosity=0)  # exits non-zero when a migration is unapplied
    # a file that is no dump is refused before anything is dropped
    junk = tmp_path / "junk.dump"
    junk.write_bytes(b"no dump")
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="pg_restore failed"):
        call_command("dbrestore", str(junk), verbosity=0)
    assert Tenant.objects.filter(slug="kept").exists()
