"""``manage.py recompute_usage [--tenant SLUG] [--instance UUID]``: rebuild usage rows from raw data."""

from __future__ import annotations

import uuid
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from portal.cloud.models import Instance
from portal.metering import resources, sampling
from portal.metering.models import ResourceEvent


class Command(BaseCommand):
    help = (
        "Rebuild usage hour and day rows from the raw samples and resource events "
        "(all, one tenant's, or one instance's with its published ports); an instance's rows "
        "before the samples' prune mark are final and kept."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--tenant", help="slug of one tenant")
        parser.add_argument("--instance", help="id of one instance")

    def handle(self, *args: Any, **options: Any) -> None:
        instances = Instance.objects.all()
        events = ResourceEvent.objects.all()
        if options["tenant"]:
            instances = instances.filter(tenant__slug=options["tenant"])
            events = events.filter(tenant__slug=options["tenant"])
            if not instances.exists() and not events.exists():
                raise CommandError(f"no instances or volumes of tenant {options['tenant']!r}")
        if options["instance"]:
            try:
                instance_id = uuid.UUID(options["instance"])
            except ValueError:
                raise CommandError(f"not an instance id: {options['instance']!r}") from None
            instances = instances.filter(pk=instance_id)
            events = events.filter(instance_id=instance_id)
            if not instances.exists():
                raise CommandError(f"no instance {options['instance']}")
        hours = sampling.recompute(instances.order_by("pk").iterator())
        subjects = sorted(set(events.values_list("subject", flat=True)))
        resource_hours = resources.recompute(subjects)
        self.stdout.write(
            f"recomputed {instances.count()} instance(s): {hours} hour row(s); "
            f"{len(subjects)} volume(s) and published port(s): {resource_hours} hour row(s)"
        )
