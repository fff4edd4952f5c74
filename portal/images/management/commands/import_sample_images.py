"""Register the sample images built by ``make images`` (idempotent).

- ``tiny``: the tiny VM disk (qcow2);
- ``busybox`` and ``busybox-web``: OCI image archives sharing a base layer;
- ``sample``: the tiny VM disk *and* the busybox archive, so ``kind=auto`` can choose.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from portal.errors import Conflict
from portal.images import imports, services
from portal.images.choices import ArtifactFormat, ImageStatus
from portal.images.models import Image


def _newest(directory: Path, pattern: str) -> Path | None:
    found = sorted(directory.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _digest(path: Path) -> str:
    line = Path(f"{path}.sha256").read_text().split()[0]
    if not re.fullmatch(r"[0-9a-f]{64}", line):
        raise CommandError(f"{path}.sha256 does not hold a sha256")
    return f"sha256:{line}"


class Command(BaseCommand):
    help = "Register the locally built sample images (from SKYPORT_IMAGE_DIR, default var/images)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--dir", default=os.environ.get("SKYPORT_IMAGE_DIR", "var/images"))

    def handle(self, *args: Any, **options: Any) -> None:
        directory = Path(options["dir"]).resolve()
        disk = _newest(directory, "skyport-tiny-*.qcow2")
        busybox = _newest(directory, "busybox-[0-9]*.oci.tar")
        web = _newest(directory, "busybox-web-*.oci.tar")
        if not (disk and busybox and web):
            raise CommandError(f"sample images missing in {directory}; run 'make images' first")
        disk_version = disk.name.removeprefix("skyport-tiny-").removesuffix(".qcow2")
        bb_version = busybox.name.removeprefix("busybox-").removesuffix(".oci.tar")
        plan = [
            (
                "tiny",
                disk_version,
                "Tiny Linux guest (busybox initramfs, NoCloud seed)",
                [(ArtifactFormat.QCOW2, disk)],
            ),
            ("busybox", bb_version, "BusyBox container", [(ArtifactFormat.OCI, busybox)]),
            ("busybox-web", bb_version, "BusyBox httpd serving a page", [(ArtifactFormat.OCI, web)]),
            (
                "sample",
                f"{bb_version}-{disk_version}",
                "Runs as a tiny VM or a BusyBox container",
                [(ArtifactFormat.QCOW2, disk), (ArtifactFormat.OCI, busybox)],
            ),
        ]
        for name, version, description, artifacts in plan:
            image, _ = Image.objects.get_or_create(
                name=name,
                version=version,
                owner=None,
                defaults={"description": description, "os": "linux", "status": ImageStatus.QUEUED},
            )
            for fmt, path in artifacts:
                self._ensure(image, fmt, path)
            image.refresh_from_db()
            if image.status != ImageStatus.ACTIVE:
                raise CommandError(f"image {image}: {image.status_reason}")
            self.stdout.write(f"image {image} ({', '.join(sorted(image.formats()))})")

    def _ensure(self, image: Image, fmt: str, path: Path) -> None:
        """Import ``path`` through the store unless the image already has it, complete."""
        store = services.store()
        artifact = image.artifacts.filter(format=fmt).first()
        if artifact is not None:
            if artifact.source_digest == _digest(path) and all(
                store.has(b.digest) for b in artifact.blobs.all()
            ):
                return
            artifact.delete()  # recorded before the store existed, or its files are gone: import again
        try:
            held = imports.claim(image)
            temp, digest, _ = imports.copy_in(path, held, _digest(path))
        except Conflict as exc:
            raise CommandError(str(exc)) from exc
        except services.UploadError as exc:
            raise CommandError(f"{path}: {exc}") from exc
        imports.import_here(held, "oci" if fmt == ArtifactFormat.OCI else fmt, temp, digest)
