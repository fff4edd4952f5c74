"""Control-queue tasks of the images app.

The import task lives in :mod:`portal.images.imports`, beside the code that
queues it; it is named here so the worker's task list is in one place.
"""

from __future__ import annotations

from celery import shared_task

from portal.images import maintenance
from portal.images.imports import import_image

__all__ = ["clean_tmp", "import_image", "sweep"]


@shared_task(name="portal.images.sweep")
def sweep() -> dict[str, int]:
    """Fail imports stuck past their deadline, remove upload leftovers and unreferenced blobs."""
    return maintenance.sweep()


@shared_task(name="portal.images.clean_tmp")
def clean_tmp() -> int:
    """Remove upload leftovers older than a day (kept for messages an older beat schedule queued)."""
    return maintenance.clean_tmp()
