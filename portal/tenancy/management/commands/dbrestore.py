"""``manage.py dbrestore FILE``: put a ``dbbackup`` file back as the portal's database.

Stop the web, worker and beat processes first (docs/deploy.md); afterwards
``manage.py migrate`` brings a backup of an older release up to date.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections

from portal.dbbackup import BackupError, restore


class Command(BaseCommand):
    help = "Replace the portal's database with a dbbackup FILE (stop the portal first)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", type=Path, help="A file written by manage.py dbbackup")
        parser.add_argument("--database", default="default", help="Which DATABASES entry (default: default)")

    def handle(self, *args: Any, **options: Any) -> None:
        alias = options["database"]
        db = settings.DATABASES.get(alias)
        if db is None:
            raise CommandError(f"no database {alias!r} in DATABASES")
        connections[alias].close()  # our own connection must not hold locks the restore needs
        try:
            self.stdout.write(restore(db, options["file"]))
        except BackupError as exc:
            raise CommandError(str(exc)) from exc
