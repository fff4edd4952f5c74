"""Control-queue tasks of the images app."""

from __future__ import annotations

from celery import shared_task

from portal.images import services


@shared_task(name="portal.images.import")
def import_image(
    image_id: int, fmt: str, upload: str, source_digest: str, before: str, token: str = ""
) -> str:
    """Validate an uploaded file and make it an artifact of the image (or fail it with the reason).

    Idempotent: a second delivery of the same import (same ``token``) does nothing.
    """
    return services.import_artifact(image_id, fmt, upload, source_digest, before, token)


@shared_task(name="portal.images.sweep")
def sweep() -> dict[str, int]:
    """Fail imports stuck past their deadline, remove upload leftovers and unreferenced blobs."""
    return services.sweep()


@shared_task(name="portal.images.clean_tmp")
def clean_tmp() -> int:
    """Remove upload leftovers older than a day (kept for messages an older beat schedule queued)."""
    return services.clean_tmp()
