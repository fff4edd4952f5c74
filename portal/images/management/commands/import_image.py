"""Import an image file that is already on the portal host (operators).

    manage.py import_image --name debian --version 12 --format qcow2 /srv/debian-12.qcow2 --public
    manage.py import_image --name app --version 3 --format docker app.tar --tenant acme --wait

The file is copied into the store and checked by the ``portal.images.import``
task on the control queue, exactly like an upload; the original is left alone.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import IntegrityError, transaction

from portal.errors import Conflict
from portal.images import imports, services
from portal.images.choices import ImageStatus
from portal.images.models import Image
from portal.tenancy.models import Tenant


class Command(BaseCommand):
    help = "Import a VM disk (qcow2/raw) or container archive (oci/docker) from a path on this host."

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        # --version is the image's version here: it replaces Django's "print the version" option.
        return super().create_parser(prog_name, subcommand, conflict_handler="resolve", **kwargs)

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("path")
        parser.add_argument("--name", required=True)
        parser.add_argument("--version", dest="image_version", required=True)
        parser.add_argument("--format", required=True, choices=sorted(services.UPLOAD_FORMATS))
        who = parser.add_mutually_exclusive_group(required=True)
        who.add_argument("--public", action="store_true", help="visible to every tenant")
        who.add_argument("--tenant", help="slug of the owning tenant (a private image)")
        parser.add_argument("--description", default="")
        parser.add_argument("--os", default="linux")
        parser.add_argument("--sha256", default="", help="expected sha256 of the file")
        parser.add_argument("--wait", action="store_true", help="wait until the import task has finished")
        parser.add_argument("--timeout", type=float, default=3600.0)

    def handle(self, *args: Any, **opts: Any) -> None:
        path = Path(opts["path"]).resolve()
        if not path.is_file():
            raise CommandError(f"{path}: no such file")
        owner = None
        if opts["tenant"]:
            owner = Tenant.objects.filter(slug=opts["tenant"]).first()
            if owner is None:
                raise CommandError(f"no tenant '{opts['tenant']}'")
        try:
            with transaction.atomic():
                image, created = Image.objects.get_or_create(
                    name=opts["name"],
                    version=opts["image_version"],
                    owner=owner,
                    defaults={"description": opts["description"], "os": opts["os"]},
                )
        except IntegrityError as exc:
            raise CommandError(f"cannot create the image: {exc}") from exc
        try:
            services.check_can_receive(image, opts["format"])
            held = imports.claim(image)
            temp, digest, size = imports.copy_in(path, held, opts["sha256"])
            imports.queue_import(held, opts["format"], temp, digest, f"copied {size} bytes ({digest})")
        except (services.UploadError, Conflict) as exc:
            message = str(exc)
            if created:
                # A run that was refused leaves nothing behind, not even the image it created.
                Image.objects.filter(pk=image.pk, artifacts__isnull=True).delete()
            raise CommandError(message) from exc
        self.stdout.write(f"image {image} (id {image.pk}): importing {digest}")
        if not opts["wait"]:
            return
        deadline = time.monotonic() + opts["timeout"]
        while time.monotonic() < deadline:
            image.refresh_from_db()
            if image.status != ImageStatus.IMPORTING:
                break
            time.sleep(0.5)
        self.stdout.write(f"image {image}: {image.status} - {image.status_reason}")
        if image.status != ImageStatus.ACTIVE:
            raise CommandError(f"import failed: {image.status_reason}")
