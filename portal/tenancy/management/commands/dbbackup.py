"""``manage.py dbbackup FILE``: a consistent backup of the portal's database while it runs.

SQLite: the online backup API; PostgreSQL: ``pg_dump -Fc`` (``portal/dbbackup.py``,
docs/deploy.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from portal.dbbackup import BackupError, backup


class Command(BaseCommand):
    help = "Back up the portal's database to FILE (SQLite online backup or pg_dump -Fc) while it runs."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", type=Path, help="Where to write the backup (replaced if it exists)")
        parser.add_argument("--database", default="default", help="Which DATABASES entry (default: default)")

    def handle(self, *args: Any, **options: Any) -> None:
        db = settings.DATABASES.get(options["database"])
        if db is None:
            raise CommandError(f"no database {options['database']!r} in DATABASES")
        try:
            self.stdout.write(backup(db, options["file"]))
        except BackupError as exc:
            raise CommandError(str(exc)) from exc
