"""Receiving an image file and importing it: validate, store by digest, record the artifact.

An upload is streamed into the store's ``tmp/`` by the web process and
handed to the ``portal.images.import`` task on the control queue, which
validates it (:mod:`portal.images.validation`), moves its blobs into the
content-addressed store and records the artifact.  The image is
``importing`` meanwhile, ``active`` or ``failed`` (with the reason) after.
Whatever happens, the upload's temporary files are gone afterwards.

One import at a time holds an image: :func:`claim` sets it ``importing``
with a fresh ``import_id`` by a conditional UPDATE, and every later step
(the import task's start, its result, a refusal, the sweep) changes the
image only while that id still holds it.  A task delivered twice by the
broker therefore finds its import already taken and does nothing.  An
import that stops moving (a web worker killed mid-upload, a lost task) is
failed by :func:`portal.images.maintenance.sweep_imports` once
``SKYPORT_IMAGE_IMPORT_DEADLINE_SECONDS`` pass without progress.

The import task is defined here, beside the code that queues it
(``portal.images.tasks`` lists it for the worker), so nothing here imports
the tasks module back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from celery import shared_task
from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from portal.audit.models import Outcome
from portal.errors import Conflict
from portal.images import limits, validation
from portal.images.choices import ArtifactFormat, ImageStatus, ImportPhase
from portal.images.models import Artifact, Blob, Image
from portal.images.services import (
    UPLOAD_FORMATS,
    UploadError,
    check_can_receive,
    human_size,
    import_event,
    store,
)
from portal.images.store import BlobStore

log = logging.getLogger(__name__)

CHUNK = 1 << 20
#: while a file arrives, its image records progress this often (the sweep sees it alive)
PROGRESS_SECONDS = 60.0
_monotonic = time.monotonic  # the clock of progress notes (tests replace it)


class ClaimLost(UploadError):
    """The import no longer holds its image (the sweep released it): nothing to release."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 409)


# ------------------------------------------------------------------------------ the claim


@dataclasses.dataclass(frozen=True)
class Claim:
    """One import's hold on an image: its token, and the status the image had before."""

    image_id: int
    token: str
    before: str

    def held(self) -> QuerySet[Image]:
        """The image, as a queryset, while this import still holds it."""
        return Image.objects.filter(pk=self.image_id, status=ImageStatus.IMPORTING, import_id=self.token)

    def note(self, reason: str, phase: str | None = None) -> bool:
        """Record progress (and a new phase); False when the import no longer holds the image."""
        fields: dict[str, Any] = {"status_reason": reason[:255], "import_updated_at": timezone.now()}
        if phase is not None:
            fields["import_phase"] = phase
        return bool(self.held().update(**fields))

    def finish(self, status: str, reason: str, **extra: Any) -> bool:
        """End the import with ``status`` and ``reason``; False when it no longer held the image."""
        return end(self.held(), status, reason, **extra)

    def store(self) -> BlobStore:
        """The store, naming temporary files after this import (the sweep finds them by it)."""
        return store().tagged(self.token)


def end(images: QuerySet[Image], status: str, reason: str, **extra: Any) -> bool:
    """Release the image(s) still matched by ``images`` from their import; False when none was."""
    return bool(
        images.update(
            status=status,
            status_reason=reason[:255],
            import_id="",
            import_phase=ImportPhase.NONE,
            import_updated_at=None,
            **extra,
        )
    )


def status_after_failure(image: Image) -> str:
    """A failed import fails the image, unless it already runs from another artifact."""
    return ImageStatus.ACTIVE if image.artifacts.exists() else ImageStatus.FAILED


def claim(image: Image) -> Claim:
    """Mark the image importing unless another import holds it (409).

    The UPDATE is conditional on the status just read, so the status the
    claim remembers (to go back to after a refusal) is exactly the one it
    replaced.
    """
    token = uuid.uuid4().hex
    for _ in range(3):
        before = Image.objects.filter(pk=image.pk).values_list("status", flat=True).first()
        if before is None:
            raise Conflict(f"Image {image} was deleted.")
        if before not in (ImageStatus.QUEUED, ImageStatus.FAILED, ImageStatus.ACTIVE):
            break
        taken = Image.objects.filter(pk=image.pk, status=before).update(
            status=ImageStatus.IMPORTING,
            status_reason="receiving upload",
            import_id=token,
            import_phase=ImportPhase.RECEIVING,
            import_updated_at=timezone.now(),
        )
        if taken:
            return Claim(image.pk, token, before)
    raise Conflict(f"Image {image} is {ImageStatus.IMPORTING}; wait until its current import ends.")


def refuse(held: Claim, exc: UploadError) -> None:
    """A refused upload: the image goes back to its earlier status, with the refusal as its reason."""
    if exc.rejected:
        _fail(held, exc.reason)
    else:
        held.finish(held.before, f"last upload refused: {exc.reason}")


# ------------------------------------------------------------------------------ receiving


def receive(
    stream: IO[bytes],
    length: int | None,
    expected_sha256: str = "",
    *,
    into: BlobStore | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[Path, str, int]:
    """Stream a request body into the store's tmp/; returns (path, sha256 digest, size).

    Never holds more than one chunk in memory.  A body shorter than its
    Content-Length (the client went away), a full disk or a checksum that
    does not match removes the partial file and raises :class:`UploadError`.
    ``progress`` is called with the bytes received so far after each chunk.
    """
    limit = settings.SKYPORT_UPLOAD_MAX_BYTES
    if length is None:
        raise UploadError(
            "Send the file with a Content-Length header (chunked uploads are not accepted).",
            411,
            reason="it had no Content-Length header (chunked uploads are not accepted)",
        )
    if length > limit:
        raise UploadError(
            f"The file is {human_size(length)} ({length} bytes), over the upload limit of "
            f"{human_size(limit)} ({limit} bytes).",
            413,
            reason=f"{human_size(length)} is over the {human_size(limit)} limit",
        )
    if length == 0:
        raise UploadError(
            "The request body is empty; send the image file as the body.", reason="the body was empty"
        )
    path = (into or store()).temp_path("upload")
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
                if progress is not None:
                    progress(got)
    except OSError as exc:
        path.unlink(missing_ok=True)
        if exc.errno == 28:  # ENOSPC
            raise UploadError(
                "The image store is full; nothing was kept. Ask an operator.", 507, reason="the store is full"
            ) from exc
        raise UploadError(
            f"The upload broke off after {got} of {length} bytes; nothing was kept.",
            reason=f"it broke off after {got} of {length} bytes",
        ) from exc
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if got < length:
        path.unlink(missing_ok=True)
        raise UploadError(
            f"The upload ended after {got} of {length} bytes; nothing was kept, send it again.",
            reason=f"it ended after {got} of {length} bytes",
        )
    digest = "sha256:" + h.hexdigest()
    expected = expected_sha256.removeprefix("sha256:")
    if expected and digest != f"sha256:{expected}":
        path.unlink(missing_ok=True)
        raise UploadError(
            f"Checksum mismatch: the file is {digest}, expected sha256:{expected}.", rejected=True
        )
    return path, digest, got


class _Progress:
    """Notes a receiving upload's progress on its image at most every PROGRESS_SECONDS."""

    def __init__(self, held: Claim, length: int | None) -> None:
        self.held = held
        self.length = length
        self.last = _monotonic()

    def __call__(self, got: int) -> None:
        now = _monotonic()
        if now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        of = f" of {human_size(self.length)}" if self.length else ""
        if not self.held.note(f"receiving upload: {human_size(got)}{of}"):
            raise ClaimLost(
                "The image was released while this upload was arriving (it was too slow); "
                "nothing was kept, send it again."
            )


def receive_for(
    held: Claim, stream: IO[bytes], length: int | None, expected: str = ""
) -> tuple[Path, str, int]:
    """:func:`receive` for a claimed image: a refusal releases the image with the reason, and re-raises."""
    try:
        return receive(stream, length, expected, into=held.store(), progress=_Progress(held, length))
    except ClaimLost:
        raise
    except UploadError as exc:
        refuse(held, exc)
        raise
    except BaseException as exc:
        held.finish(held.before, f"last upload refused: it broke off ({type(exc).__name__})")
        raise


def copy_in(source: Path, held: Claim | None = None, expected: str = "") -> tuple[Path, str, int]:
    """An operator's server-side file, copied into tmp/ (the original stays untouched)."""
    with source.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if held is None:
            return receive(fh, size, expected)
        return receive_for(held, fh, size, expected)


def accept_upload(image: Image, fmt: str, stream: IO[bytes], length: int | None, expected: str = "") -> None:
    """Receive a file for ``image`` and queue its import (on commit).

    Raises :class:`UploadError` or :class:`Conflict`.  A refused or broken
    upload puts the image back to its earlier status with the refusal as its
    reason; a checksum mismatch fails it.
    """
    check_can_receive(image, fmt)
    held = claim(image)
    path, digest, size = receive_for(held, stream, length, expected)
    queue_import(held, fmt, path, digest, f"received {size} bytes ({digest})")


def queue_import(held: Claim, fmt: str, path: Path, digest: str, what: str) -> None:
    """Hand a received file to the import task, once the current transaction commits.

    When the task cannot be sent (the broker is down), the file is removed
    and the image goes back to its earlier status with the reason; if that
    happens at once (no transaction is open) :class:`UploadError` (503) says so.
    """
    if not held.note(f"{what}, queued for import", ImportPhase.QUEUED):
        path.unlink(missing_ok=True)
        raise ClaimLost("The image was released while the file arrived; send it again.")
    failed: list[str] = []

    def send() -> None:
        try:
            import_image.delay(held.image_id, fmt, str(path), digest, held.before, held.token)
        except Exception as exc:
            log.exception("cannot queue the import of image %s", held.image_id)
            path.unlink(missing_ok=True)
            why = f"the import could not be queued ({type(exc).__name__}: {exc}); send the file again"
            held.finish(held.before, f"last upload not imported: {why}")
            failed.append(why)

    transaction.on_commit(send)
    if failed:
        raise UploadError(f"The file arrived but {failed[0]}.", 503)


def import_here(held: Claim, fmt: str, path: Path, digest: str) -> str:
    """Import a file at once, in this process (sample images, tests); returns the final status."""
    if not held.note(f"copied {digest}, importing", ImportPhase.QUEUED):
        path.unlink(missing_ok=True)
        return "superseded"
    return import_artifact(held.image_id, fmt, str(path), digest, held.before, held.token)


class Superseded(Exception):
    """The import no longer holds its image (the sweep gave up on it); its result is dropped."""


def import_artifact(
    image_id: int, fmt: str, upload: str, source_digest: str, before: str, token: str = ""
) -> str:
    """Validate ``upload`` and make it an artifact of the image; returns the final status.

    The import first takes its image from ``queued`` to ``validating`` with a
    conditional UPDATE on its token.  A second delivery of the same task
    (the broker redelivers after its visibility timeout while the first still
    runs, or after the first finished) finds it taken and returns
    ``"duplicate"`` without touching the image or the file.
    """
    path = Path(upload)
    held = Claim(image_id, token, before)
    image = Image.objects.filter(pk=image_id).first()
    if image is None:
        path.unlink(missing_ok=True)
        return "gone"
    started = bool(token) and bool(
        held.held()
        .filter(import_phase=ImportPhase.QUEUED)
        .update(
            import_phase=ImportPhase.VALIDATING,
            status_reason=f"validating {fmt}",
            import_updated_at=timezone.now(),
        )
    )
    if not started:
        log.info(
            "image %s: import %s is not waiting to start (a repeated delivery); nothing to do", image, token
        )
        return "duplicate"
    checked: validation.Checked | None = None
    try:
        s = held.store()
        if UPLOAD_FORMATS[fmt] == ArtifactFormat.OCI:
            checked = validation.check_archive(path, s, limits.unpack_limits(image))
        else:
            max_virtual, why = limits.virtual_limit(image)
            checked = validation.check_disk(
                path, source_digest, fmt, max_virtual, settings.SKYPORT_QEMU_IMG_TIMEOUT_SECONDS, why
            )
        _commit(held, image, checked, source_digest)
    except validation.Rejected as exc:
        return _fail(held, f"{fmt} rejected: {exc}")
    except Superseded:
        log.warning("image %s: import %s finished after it was given up; result dropped", image, token)
        return "superseded"
    except Exception as exc:
        log.exception("import of image %s failed", image_id)
        return _fail(held, f"{fmt} import failed: {type(exc).__name__}: {exc}")
    finally:
        if checked is not None:
            checked.discard()  # staged files that were not placed (already stored, or on failure)
        path.unlink(missing_ok=True)
    return ImageStatus.ACTIVE


def _commit(held: Claim, image: Image, checked: validation.Checked, source_digest: str) -> None:
    """Record the artifact and move its new blobs into the store, all or nothing.

    Under the store lock, so no garbage collection runs in between: first
    every blob the import reuses must still be in the store, then the new
    ones are moved in.  If anything fails after that, the files this import
    moved are removed again with the rolled-back rows, so no blob is left
    that no row references.
    """
    s = store()
    moved: list[str] = []
    with s.locked():
        try:
            with transaction.atomic():
                if not held.held().select_for_update().exists():
                    raise Superseded
                missing = [b.digest for b in checked.blobs if b.path is None and not s.has(b.digest)]
                if missing:
                    raise validation.Rejected(
                        f"blob {missing[0]} left the store while the upload was checked; send it again"
                    )
                blobs = []
                for staged in checked.blobs:
                    blob, _ = Blob.objects.get_or_create(
                        digest=staged.digest, defaults={"size": staged.size, "media_type": staged.media_type}
                    )
                    if staged.path is not None:
                        if s.place(staged.path, staged.digest):
                            moved.append(staged.digest)
                        staged.path = None
                    blobs.append(blob)
                artifact = Artifact.objects.create(
                    image=image,
                    format=checked.format,
                    digest=checked.digest,
                    size=sum(b.size for b in {b.digest: b for b in blobs}.values()),
                    virtual_size=checked.virtual_size,
                    source_digest=source_digest,
                    config=checked.config,
                )
                artifact.blobs.set(blobs)
                min_disk = -(-checked.virtual_size // 2**30)
                extra: dict[str, Any] = {}
                if min_disk > image.min_disk_gb:
                    extra["min_disk_gb"] = min_disk
                if not held.finish(ImageStatus.ACTIVE, checked.detail, **extra):
                    raise Superseded
                import_event(image, f"{checked.format} {checked.digest}: {checked.detail}", Outcome.SUCCESS)
        except BaseException:
            s.remove_all(moved)
            raise


def _fail(held: Claim, reason: str) -> str:
    """End an import that failed; an image that already runs from another artifact stays active."""
    image = Image.objects.filter(pk=held.image_id).first()
    if image is None:
        return "gone"
    status = status_after_failure(image)
    if not held.finish(status, reason):
        log.warning("image %s: import %s no longer holds it; not recording: %s", image, held.token, reason)
        return "superseded"
    import_event(image, reason)
    log.info("image %s: %s (was %s)", image, reason, held.before)
    return status


@shared_task(name="portal.images.import")
def import_image(
    image_id: int, fmt: str, upload: str, source_digest: str, before: str, token: str = ""
) -> str:
    """Validate an uploaded file and make it an artifact of the image (or fail it with the reason).

    Idempotent: a second delivery of the same import (same ``token``) does nothing.
    A drain's VM migration waiting for this upload goes on (``portal.cloud.vm_migration``).
    """
    status = import_artifact(image_id, fmt, upload, source_digest, before, token)
    from portal.cloud import vm_migration  # cloud builds on images, not the other way round

    vm_migration.image_settled(image_id)
    return status
