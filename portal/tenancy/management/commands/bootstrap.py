"""Create the operator account, a demo tenant with a user, and default flavors.

Idempotent: existing objects are kept; passwords are generated once and
stored in var/ (mode 0600) so ``make run`` can print them every time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from portal.cloud.models import Flavor
from portal.localfiles import read_or_create_secret
from portal.tenancy.choices import Role
from portal.tenancy.models import Membership, Tenant

DEFAULT_FLAVORS = [
    ("m1.tiny", 1, 128, 1),
    ("m1.small", 1, 256, 2),
    ("m1.medium", 2, 512, 4),
    ("m1.large", 2, 1024, 10),
]


def _password(name: str) -> str:
    return read_or_create_secret(Path(settings.VAR_DIR) / f"{name}.password", 12)


class Command(BaseCommand):
    help = "Create the operator account, the demo tenant and user, and default flavors (idempotent)."

    def handle(self, *args: Any, **options: Any) -> None:
        user_model = get_user_model()
        with transaction.atomic():
            operator, created = user_model.objects.get_or_create(
                username="operator", defaults={"is_staff": True, "is_superuser": True}
            )
            if created:
                operator.set_password(_password("operator"))
                operator.save()
            demo_user, created = user_model.objects.get_or_create(username="demo")
            if created:
                demo_user.set_password(_password("demo"))
                demo_user.save()
            tenant, _ = Tenant.objects.get_or_create(slug="demo", defaults={"name": "Demo tenant"})
            Membership.objects.get_or_create(user=demo_user, tenant=tenant, defaults={"role": Role.ADMIN})
            for name, vcpus, ram, disk in DEFAULT_FLAVORS:
                Flavor.objects.get_or_create(
                    name=name, tenant=None, defaults={"vcpus": vcpus, "ram_mb": ram, "disk_gb": disk}
                )
        self.stdout.write(
            "Skyport is up on http://127.0.0.1:8000\n"
            f"  operator:    operator / {_password('operator')}  -> http://127.0.0.1:8000/ops/ "
            "(admin: /admin/)\n"
            f"  tenant user: demo / {_password('demo')}  (admin of tenant 'demo') -> "
            "http://127.0.0.1:8000/login/ (API docs: /api/docs/)\n"
            f"  passwords are stored in {settings.VAR_DIR}/*.password"
        )
