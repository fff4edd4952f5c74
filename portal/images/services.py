"""Images: the blob store, what may be uploaded, node upload tokens, deletion.

Receiving and importing a file is :mod:`portal.images.imports`; the periodic
clean-up (stuck imports, leftovers, unreferenced blobs) is
:mod:`portal.images.maintenance`.  An image is ``queued`` until a file
arrives, ``importing`` while one is checked, ``active`` or ``failed`` (with
the reason) after.
"""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.core import signing
from django.db import transaction
from django.db.models import Count

from portal.audit.log import record
from portal.audit.models import Outcome
from portal.errors import Conflict
from portal.images.choices import ArtifactFormat, ImageStatus
from portal.images.models import Blob, Image
from portal.images.store import BlobStore

#: what a client may upload, and the artifact format it becomes
UPLOAD_FORMATS = {"qcow2": "qcow2", "raw": "raw", "oci": "oci", "docker": "oci"}


class UploadError(Exception):
    """An upload that could not be received; ``status`` is the HTTP status to answer with.

    ``reason`` is the short form kept as the image's status reason.  A
    ``rejected`` upload arrived whole but its content is wrong (a checksum
    mismatch): the image fails.  Any other is a refusal: the image goes back
    to its earlier status, so the file can be sent again.
    """

    def __init__(self, message: str, status: int = 400, reason: str = "", rejected: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason or message
        self.rejected = rejected


def human_size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def store() -> BlobStore:
    s = BlobStore(Path(settings.SKYPORT_IMAGE_STORE))
    s.ensure()
    return s


def _slot(fmt: str) -> str:
    """Artifacts an image holds at most one of: a VM disk and a container image."""
    return "container" if UPLOAD_FORMATS[fmt] == ArtifactFormat.OCI else "vm"


def check_can_receive(image: Image, fmt: str) -> None:
    if fmt not in UPLOAD_FORMATS:
        raise UploadError(f"Unknown format '{fmt}'; use one of {', '.join(UPLOAD_FORMATS)}.")
    if image.artifact_for(_slot(fmt)) is not None:
        raise Conflict(
            f"Image {image} already has a {_slot(fmt)} artifact; images are immutable, upload a new version."
        )


UPLOAD_SALT = "skyport.images.node-upload"


def upload_token(image: Image) -> str:
    """A token that lets one node PUT the file of this one image (a published VM disk), for a day."""
    return signing.dumps({"image": image.pk}, salt=UPLOAD_SALT)


def image_for_upload_token(token: str, max_age: int = 86400) -> int | None:
    try:
        data = signing.loads(token, salt=UPLOAD_SALT, max_age=max_age)
    except signing.BadSignature:
        return None
    image = data.get("image") if isinstance(data, dict) else None
    return image if isinstance(image, int) else None


def import_event(image: Image, message: str, outcome: str = Outcome.FAILURE) -> None:
    """Record how an import of ``image`` ended (or why it was given up)."""
    record("image.import", image, tenant_id=image.owner_id, outcome=outcome, message=message)


def delete_image(image: Image) -> None:
    """Delete an image no instance uses, and every blob no other image needs."""
    s = store()
    with s.locked(), transaction.atomic():
        image = Image.objects.select_for_update().get(pk=image.pk)
        in_use = image.instances.live().count()
        if in_use:
            raise Conflict(f"Image {image} is used by {in_use} instance(s); delete them first.")
        if image.status == ImageStatus.IMPORTING:
            raise Conflict(f"Image {image} is importing; wait until the import ends.")
        digests = list(Blob.objects.filter(artifacts__image=image).values_list("digest", flat=True))
        image.delete()
        unused = list(
            Blob.objects.filter(digest__in=digests)
            .annotate(n=Count("artifacts"))
            .filter(n=0)
            .values_list("digest", flat=True)
        )
        Blob.objects.filter(digest__in=unused).delete()
        transaction.on_commit(lambda: s.remove_all(unused))
