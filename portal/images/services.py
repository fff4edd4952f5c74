"""Image life cycle: receive an upload, import it (validate, store by digest), delete.

An upload is streamed into the store's ``tmp/`` by the web process and
handed to the ``portal.images.import`` task on the control queue, which
validates it (:mod:`portal.images.validation`), moves its blobs into the
content-addressed store and records the artifact.  The image is
``importing`` meanwhile, ``active`` or ``failed`` (with the reason) after.
Whatever happens, the upload's temporary files are gone afterwards.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import IO, Any

from django.conf import settings
from django.core import signing
from django.db import transaction
from django.db.models import Count

from portal.api.exceptions import Conflict
from portal.audit.models import Event, Outcome
from portal.images import validation
from portal.images.choices import ArtifactFormat, ImageStatus
from portal.images.models import Artifact, Blob, Image
from portal.images.store import BlobStore

log = logging.getLogger(__name__)

CHUNK = 1 << 20
#: what a client may upload, and the artifact format it becomes
UPLOAD_FORMATS = {"qcow2": "qcow2", "raw": "raw", "oci": "oci", "docker": "oci"}


class UploadError(Exception):
    """An upload that could not be received; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


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


def claim(image: Image) -> str:
    """Mark the image importing unless another upload holds it; returns the status it had."""
    before = image.status
    taken = Image.objects.filter(
        pk=image.pk, status__in=(ImageStatus.QUEUED, ImageStatus.FAILED, ImageStatus.ACTIVE)
    ).update(status=ImageStatus.IMPORTING, status_reason="receiving upload")
    if not taken:
        raise Conflict(f"Image {image} is {image.status}; wait until its current import ends.")
    return before


def release(image: Image, status: str, reason: str) -> None:
    Image.objects.filter(pk=image.pk).update(status=status, status_reason=reason[:255])


def receive(stream: IO[bytes], length: int | None, expected_sha256: str = "") -> tuple[Path, str, int]:
    """Stream a request body into the store's tmp/; returns (path, sha256 digest, size).

    Never holds more than one chunk in memory.  A body shorter than its
    Content-Length (the client went away), a full disk or a checksum that
    does not match removes the partial file and raises :class:`UploadError`.
    """
    limit = settings.SKYPORT_UPLOAD_MAX_BYTES
    if length is None:
        raise UploadError(
            "Send the file with a Content-Length header (chunked uploads are not accepted).", 411
        )
    if length > limit:
        raise UploadError(f"The file is {length} bytes; the upload limit is {limit} bytes.", 413)
    if length == 0:
        raise UploadError("The request body is empty; send the image file as the body.")
    path = store().temp_path("upload")
    h = hashlib.sha256()
    got = 0
    try:
        with path.open("wb") as out:
            while got < length:
                chunk = stream.read(min(CHUNK, length - got))
                if not chunk:
                    break
                h.update(chunk)
                out.write(chunk)
                got += len(chunk)
    except OSError as exc:
        path.unlink(missing_ok=True)
        if exc.errno == 28:  # ENOSPC
            raise UploadError("The image store is full; nothing was kept. Ask an operator.", 507) from exc
        raise UploadError(f"The upload broke off after {got} of {length} bytes; nothing was kept.") from exc
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if got < length:
        path.unlink(missing_ok=True)
        raise UploadError(f"The upload ended after {got} of {length} bytes; nothing was kept, send it again.")
    digest = "sha256:" + h.hexdigest()
    expected = expected_sha256.removeprefix("sha256:")
    if expected and digest != f"sha256:{expected}":
        path.unlink(missing_ok=True)
        raise UploadError(f"Checksum mismatch: the file is {digest}, expected sha256:{expected}.")
    return path, digest, got


def accept_upload(image: Image, fmt: str, stream: IO[bytes], length: int | None, expected: str = "") -> None:
    """Receive a file for ``image`` and queue its import (on commit).

    Raises :class:`UploadError` or :class:`Conflict`; a refused or broken
    upload leaves the image as it was (a checksum mismatch fails it).
    """
    check_can_receive(image, fmt)
    before = claim(image)
    reason = image.status_reason
    try:
        path, digest, size = receive(stream, length, expected)
    except UploadError as exc:
        if "Checksum mismatch" in str(exc):
            release(image, ImageStatus.ACTIVE if image.artifacts.exists() else ImageStatus.FAILED, str(exc))
        else:
            release(image, before, reason)  # nothing changed; the client may send it again
        raise
    release(image, ImageStatus.IMPORTING, f"received {size} bytes ({digest}), queued for import")
    from portal.images.tasks import import_image

    image_id, upload = image.pk, str(path)
    transaction.on_commit(lambda: import_image.delay(image_id, fmt, upload, digest, before))


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


def copy_in(source: Path) -> tuple[Path, str, int]:
    """An operator's server-side file, copied into tmp/ (the original stays untouched)."""
    with source.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        return receive(fh, size)


def import_artifact(image_id: int, fmt: str, upload: str, source_digest: str, before: str) -> str:
    """Validate ``upload`` and make it an artifact of the image; returns the final status."""
    path = Path(upload)
    image = Image.objects.filter(pk=image_id).first()
    if image is None:
        path.unlink(missing_ok=True)
        return "gone"
    s = store()
    checked: validation.Checked | None = None
    try:
        release(image, ImageStatus.IMPORTING, f"validating {fmt}")
        if UPLOAD_FORMATS[fmt] == ArtifactFormat.OCI:
            checked = validation.check_archive(path, s)
        else:
            checked = validation.check_disk(
                path, source_digest, fmt, settings.SKYPORT_IMAGE_MAX_VIRTUAL_BYTES
            )
        _commit(image, checked, source_digest)
    except validation.Rejected as exc:
        return _fail(image, before, f"{fmt} rejected: {exc}")
    except Exception as exc:
        log.exception("import of image %s failed", image_id)
        return _fail(image, before, f"{fmt} import failed: {type(exc).__name__}: {exc}")
    finally:
        if checked is not None:
            checked.discard()  # staged files that were not placed (already stored, or on failure)
        path.unlink(missing_ok=True)
    return ImageStatus.ACTIVE


def _commit(image: Image, checked: validation.Checked, source_digest: str) -> None:
    s = store()
    with s.locked(), transaction.atomic():
        blobs = []
        for staged in checked.blobs:
            blob, _ = Blob.objects.get_or_create(
                digest=staged.digest, defaults={"size": staged.size, "media_type": staged.media_type}
            )
            if staged.path is not None:
                s.place(staged.path, staged.digest)
                staged.path = None
            elif not s.has(staged.digest):
                raise validation.Rejected(f"blob {staged.digest} is recorded but missing from the store")
            blobs.append(blob)
        artifact = Artifact.objects.create(
            image=image,
            format=checked.format,
            digest=checked.digest,
            size=sum(b.size for b in {b.digest: b for b in blobs}.values()),
            virtual_size=checked.virtual_size,
            source_digest=source_digest,
        )
        artifact.blobs.set(blobs)
        min_disk = -(-checked.virtual_size // 2**30)
        updates: dict[str, Any] = {"status": ImageStatus.ACTIVE, "status_reason": checked.detail[:255]}
        if min_disk > image.min_disk_gb:
            updates["min_disk_gb"] = min_disk
        Image.objects.filter(pk=image.pk).update(**updates)
        Event.objects.create(
            tenant_id=image.owner_id,
            action="image.import",
            object_type="image",
            object_id=str(image.pk),
            object_repr=str(image),
            outcome=Outcome.SUCCESS,
            message=f"{checked.format} {checked.digest}: {checked.detail}",
        )


def _fail(image: Image, before: str, reason: str) -> str:
    # An image that already runs from another artifact stays active; the reason says what failed.
    status = ImageStatus.ACTIVE if image.artifacts.exists() else ImageStatus.FAILED
    release(image, status, reason)
    Event.objects.create(
        tenant_id=image.owner_id,
        action="image.import",
        object_type="image",
        object_id=str(image.pk),
        object_repr=str(image),
        outcome=Outcome.FAILURE,
        message=reason,
    )
    log.info("image %s: %s (was %s)", image, reason, before)
    return status


def delete_image(image: Image) -> None:
    """Delete an image no instance uses, and every blob no other image needs."""
    s = store()
    with s.locked(), transaction.atomic():
        image = Image.objects.select_for_update().get(pk=image.pk)
        in_use = image.instances.exclude(vm_state="deleted").count()
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


def clean_tmp(older_than: float = 24 * 3600.0) -> int:
    """Remove temporary files abandoned by a crashed process; returns how many."""
    import time

    removed = 0
    for p in store().temp_files():
        try:
            if time.time() - p.stat().st_mtime > older_than:
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed
