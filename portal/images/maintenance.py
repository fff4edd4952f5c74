"""Periodic image maintenance (celery beat): stuck imports, upload leftovers, unreferenced blobs.

Each step is safe to run at any time and in parallel with imports: it only
moves an import that made no progress past its deadline, removes temporary
files older than a day, and collects blobs no artifact references, under the
store's lock and after a grace period longer than any import.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import time
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Q
from django.utils import timezone

from portal.images.choices import ImageStatus, ImportPhase
from portal.images.imports import Claim, end, status_after_failure
from portal.images.models import Blob, Image
from portal.images.services import import_event, store
from portal.storage.moves import held_digests as storage_held

log = logging.getLogger(__name__)


def clean_tmp(older_than: float = 24 * 3600.0) -> int:
    """Remove temporary files abandoned by a crashed process; returns how many."""
    removed = 0
    for p in store().temp_files():
        try:
            if time.time() - p.stat().st_mtime > older_than:
                _remove_temp(p)
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def _remove_temp(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


_STUCK_WHILE = {
    ImportPhase.RECEIVING: "while the file arrived (the web process receiving it probably stopped)",
    ImportPhase.QUEUED: "waiting in the import queue (the task was lost or no control worker runs)",
    ImportPhase.VALIDATING: "while it was validated (the control worker probably stopped)",
}


def sweep_imports(now: dt.datetime | None = None) -> int:
    """Fail imports that made no progress for SKYPORT_IMAGE_IMPORT_DEADLINE_SECONDS; returns how many.

    Each is released only if it is still the same import at the same point
    (a conditional UPDATE on its id and last progress), and the temporary
    files named after it are removed.  An image that runs from another
    artifact stays active; the reason says what happened.
    """
    now = now or timezone.now()
    deadline = float(settings.SKYPORT_IMAGE_IMPORT_DEADLINE_SECONDS)
    cutoff = now - dt.timedelta(seconds=deadline)
    stuck = Image.objects.filter(status=ImageStatus.IMPORTING).filter(
        Q(import_updated_at__lt=cutoff) | Q(import_updated_at__isnull=True)
    )
    failed = 0
    for image in stuck:
        since = image.import_updated_at
        where = _STUCK_WHILE.get(ImportPhase(image.import_phase))
        quiet = f"{(now - since).total_seconds() / 60:.0f} min" if since else "an unknown time"
        stopped = f"no progress for {quiet} (limit {deadline / 60:.0f} min)" + (f" {where}" if where else "")
        reason = f"import abandoned: {stopped}; send the file again"
        same_import = Claim(image.pk, image.import_id, ImageStatus.IMPORTING).held()
        if not end(same_import.filter(import_updated_at=since), status_after_failure(image), reason):
            continue  # it moved meanwhile
        failed += 1
        if image.import_id:
            for p in store().temp_files(image.import_id):
                _remove_temp(p)
        import_event(image, reason)
        log.warning("image %s: %s", image, reason)
    return failed


def collect_garbage(grace: float | None = None) -> int:
    """Remove stored blobs that no artifact references and that are older than ``grace`` seconds.

    Two kinds: files in ``blobs/`` without a ``Blob`` row (a crash between a
    deletion's commit and its file removal), and ``Blob`` rows no artifact
    uses (an image deleted in the Django admin), with their files; blobs the
    storage app holds (a volume move under way) stay.  Runs
    under the store lock, like every import's commit, and skips anything
    newer than the grace period: an import touches each blob it reuses, and
    no import may run longer than its deadline, so a blob an import is about
    to reference is never collected.  Returns how many blobs went.
    """
    grace = float(settings.SKYPORT_IMAGE_BLOB_GRACE_SECONDS if grace is None else grace)
    s = store()
    now = time.time()
    cutoff = timezone.now() - dt.timedelta(seconds=grace)
    with s.locked(), transaction.atomic():
        unused_rows = list(
            Blob.objects.annotate(n=Count("artifacts"))
            .filter(n=0, created_at__lt=cutoff)
            .exclude(digest__in=storage_held())
            .values_list("digest", flat=True)
        )
        # a row whose file is missing goes too; one whose file an import just touched stays
        unused_rows = [d for d in unused_rows if (s.age(d, now) or grace + 1) > grace]
        recorded = set(Blob.objects.values_list("digest", flat=True))
        stray = [d for d in s.digests() - recorded if (s.age(d, now) or 0) > grace]
        Blob.objects.filter(digest__in=unused_rows).delete()
        gone = [*unused_rows, *stray]
        transaction.on_commit(lambda: s.remove_all(gone))
    for digest in gone:
        log.info("garbage-collected blob %s (no image references it)", digest)
    return len(gone)


def sweep() -> dict[str, int]:
    """The images part of the periodic maintenance (beat): stuck imports, leftovers, unreferenced blobs."""
    return {
        "stuck_imports": sweep_imports(),
        "temp_files": clean_tmp(),
        "blobs": collect_garbage(),
    }
