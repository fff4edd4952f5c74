"""``manage.py recompute_usage [--tenant SLUG] [--instance UUID]``: rebuild usage rows from raw samples."""

from __future__ import annotations

import uuid
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from portal.cloud.models import Instance
from portal.metering import sampling


class Command(BaseCommand):
    help = "Rebuild usage hour and day rows from the raw samples (all instances, one tenant or one instance)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--tenant", help="slug of one tenant")
        parser.add_argument("--instance", help="id of one instance")

    def handle(self, *args: Any, **options: Any) -> None:
        instances = Instance.objects.all()
        if options["tenant"]:
            instances = instances.filter(tenant__slug=options["tenant"])
            if not instances.exists():
                raise CommandError(f"no instances of tenant {options['tenant']!r}")
        if options["instance"]:
            try:
                instance_id = uuid.UUID(options["instance"])
            except ValueError:
                raise CommandError(f"not an instance id: {options['instance']!r}") from None
            instances = instances.filter(pk=instance_id)
            if not instances.exists():
                raise CommandError(f"no instance {options['instance']}")
        hours = sampling.recompute(instances.order_by("pk").iterator())
        self.stdout.write(f"recomputed {instances.count()} instance(s): {hours} hour row(s)")
