"""Image imports that go wrong on the way: a broker that is down, a task delivered twice,
an import nobody finishes, a blob that vanishes before the commit, and garbage collection.

The uploads go through the real API, the real import task (eager) and real
``qemu-img``; each test has its own store, listed to check what is left.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone
from kombu.exceptions import OperationalError

from portal.audit.models import Event
from portal.images import imports, maintenance, services, tasks, validation
from portal.images.models import Artifact, Blob, Image
from portal.images.store import BlobStore
from tests.portal import imagefiles as f
from tests.portal.conftest import World
from tests.portal.test_images import files_in, new_image, upload

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def capture(django_capture_on_commit_callbacks: Any) -> Any:
    return django_capture_on_commit_callbacks


@pytest.fixture
def deliveries(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Import tasks sent to the broker, recorded and delivered once (as the eager broker would)."""
    sent: list[tuple[Any, ...]] = []

    def delay(*args: Any) -> None:
        sent.append(args)
        tasks.import_image.apply(args=args)

    monkeypatch.setattr(tasks.import_image, "delay", delay)
    return sent


def import_events(image_id: int) -> list[str]:
    return list(
        Event.objects.filter(action="image.import", object_id=str(image_id))
        .order_by("pk")
        .values_list("message", flat=True)
    )


# ------------------------------------------------------------------- a task delivered twice


def test_an_import_delivered_twice_runs_once_and_keeps_its_reason(
    world: World, store: Path, tmp_path: Path, capture: Any, deliveries: list[tuple[Any, ...]]
) -> None:
    c = world.client("a_member")
    img = new_image(c)
    body = f.qcow2(tmp_path / "d.qcow2", "32M").read_bytes()
    assert upload(c, img["id"], body, "qcow2", capture).status_code == 202
    image = Image.objects.get(pk=img["id"])
    assert image.status == "active", image.status_reason
    reason = image.status_reason
    assert reason.startswith("qcow2, virtual size 32 MiB")
    # The broker delivers the same message again (its visibility timeout passed before the ack).
    assert tasks.import_image.apply(args=deliveries[0]).get() == "duplicate"
    image.refresh_from_db()
    assert (image.status, image.status_reason) == ("active", reason)
    assert Artifact.objects.filter(image=image).count() == 1
    assert len(import_events(image.pk)) == 1
    assert files_in(store) == {"tmp": [], "blobs/sha256": [f.digest(body)[7:]]}


def test_a_second_delivery_while_the_first_runs_leaves_it_alone(
    world: World,
    store: Path,
    tmp_path: Path,
    capture: Any,
    deliveries: list[tuple[Any, ...]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """qemu-img may outlast the visibility timeout: the redelivered task must not touch the file."""
    seen: list[str] = []
    check_disk = validation.check_disk

    def slow_check(path: Path, *args: Any) -> validation.Checked:
        # the broker hands the same message to another worker while this one validates
        seen.append(tasks.import_image.apply(args=deliveries[0]).get())
        assert path.is_file()  # the duplicate left the upload alone
        assert Image.objects.get(pk=deliveries[0][0]).status_reason == "validating qcow2"
        return check_disk(path, *args)

    monkeypatch.setattr(validation, "check_disk", slow_check)
    c = world.client("a_member")
    img = new_image(c)
    body = f.qcow2(tmp_path / "d.qcow2").read_bytes()
    upload(c, img["id"], body, "qcow2", capture)
    assert seen == ["duplicate"]
    image = Image.objects.get(pk=img["id"])
    assert image.status == "active", image.status_reason
    assert image.import_id == "" and image.import_phase == ""
    assert len(import_events(image.pk)) == 1


def test_a_failed_import_delivered_again_keeps_the_first_reason(
    world: World, store: Path, tmp_path: Path, capture: Any, deliveries: list[tuple[Any, ...]]
) -> None:
    c = world.client("a_member")
    img = new_image(c)
    body = f.qcow2(tmp_path / "evil.qcow2", "16M", backing="/etc/shadow").read_bytes()
    upload(c, img["id"], body, "qcow2", capture)
    reason = Image.objects.get(pk=img["id"]).status_reason
    assert "backing file (/etc/shadow)" in reason
    # Before the fix the second run found the upload gone and wrote "qemu-img info cannot read the file".
    assert tasks.import_image.apply(args=deliveries[0]).get() == "duplicate"
    image = Image.objects.get(pk=img["id"])
    assert (image.status, image.status_reason) == ("failed", reason)
    assert len(import_events(image.pk)) == 1


def test_qemu_img_runs_are_bounded_below_the_visibility_timeout(
    world: World, store: Path, tmp_path: Path, capture: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert 2 * settings.SKYPORT_QEMU_IMG_TIMEOUT_SECONDS < settings.SKYPORT_BROKER_VISIBILITY_SECONDS
    settings.SKYPORT_QEMU_IMG_TIMEOUT_SECONDS = 42.0
    body = f.qcow2(tmp_path / "d.qcow2").read_bytes()
    timeouts: list[float] = []

    def hanging(cmd: list[str], **kw: Any) -> Any:
        timeouts.append(kw["timeout"])
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])

    monkeypatch.setattr(validation.subprocess, "run", hanging)
    c = world.client("a_member")
    img = new_image(c)
    upload(c, img["id"], body, "qcow2", capture)
    image = Image.objects.get(pk=img["id"])
    assert timeouts == [42.0]
    assert image.status == "failed"
    assert image.status_reason == "qcow2 rejected: qemu-img info did not finish within 42 s"
    assert files_in(store) == {"tmp": [], "blobs/sha256": []}


def _settings_with(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    names = (
        "SKYPORT_BROKER_VISIBILITY_SECONDS",
        "SKYPORT_QEMU_IMG_TIMEOUT_SECONDS",
        "SKYPORT_IMAGE_IMPORT_DEADLINE_SECONDS",
        "SKYPORT_IMAGE_BLOB_GRACE_SECONDS",
    )
    code = (
        "import json, django; django.setup(); from django.conf import settings as s; "
        f"print(json.dumps({{k: getattr(s, k) for k in {names!r}}}))"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SKYPORT_", "DJANGO_", "CELERY_"))}
    clean.update(DJANGO_SETTINGS_MODULE="portal.settings", SKYPORT_VAR_DIR=str(tmp_path), **env)
    return subprocess.run(
        [sys.executable, "-c", code], env=clean, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_import_timeouts_follow_the_visibility_timeout(tmp_path: Path) -> None:
    default = _settings_with(tmp_path)
    assert default.returncode == 0, default.stderr
    assert json.loads(default.stdout) == {
        "SKYPORT_BROKER_VISIBILITY_SECONDS": 300.0,
        "SKYPORT_QEMU_IMG_TIMEOUT_SECONDS": 100.0,
        "SKYPORT_IMAGE_IMPORT_DEADLINE_SECONDS": 3600.0,
        "SKYPORT_IMAGE_BLOB_GRACE_SECONDS": 7200.0,
    }
    slow = _settings_with(tmp_path, SKYPORT_BROKER_VISIBILITY_SECONDS="1800")
    assert json.loads(slow.stdout) == {
        "SKYPORT_BROKER_VISIBILITY_SECONDS": 1800.0,
        "SKYPORT_QEMU_IMG_TIMEOUT_SECONDS": 600.0,
        "SKYPORT_IMAGE_IMPORT_DEADLINE_SECONDS": 6000.0,  # 2 x (1800 + 2 x 600)
        "SKYPORT_IMAGE_BLOB_GRACE_SECONDS": 12000.0,
    }
    unsafe = _settings_with(tmp_path, SKYPORT_QEMU_IMG_TIMEOUT_SECONDS="600")
    assert unsafe.returncode != 0
    assert "SKYPORT_QEMU_IMG_TIMEOUT_SECONDS (600) must be above 0 and less than half" in unsafe.stderr


# ------------------------------------------------------------------ a broker that is down


def test_an_import_that_cannot_be_queued_releases_the_image(
    world: World, store: Path, tmp_path: Path, capture: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(*args: Any) -> None:
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(tasks.import_image, "delay", down)
    c = world.client("a_member")
    img = new_image(c)
    r = upload(c, img["id"], f.qcow2(tmp_path / "d.qcow2").read_bytes(), "qcow2", capture)
    assert r.status_code == 503, r.content
    assert r.json()["message"].startswith(
        "The file arrived but the import could not be queued (OperationalError: Error 111"
    )
    image = Image.objects.get(pk=img["id"])
    assert image.status == "queued"  # as before: the upload can be sent again
    assert image.status_reason.startswith(
        "last upload not imported: the import could not be queued (OperationalError: Error 111"
    )
    assert image.import_id == ""
    assert files_in(store) == {"tmp": [], "blobs/sha256": []}


# -------------------------------------------------------------------- imports that got stuck


def _stuck(image: Image, phase: str, minutes: float, store: Path) -> imports.Claim:
    """An import that stopped ``minutes`` ago in ``phase``, with a temporary file of its own."""
    held = imports.claim(image)
    Image.objects.filter(pk=image.pk).update(
        import_phase=phase, import_updated_at=timezone.now() - dt.timedelta(minutes=minutes)
    )
    held.store().temp_path("upload").write_bytes(b"half a disk")
    return held


@pytest.mark.parametrize(
    ("phase", "where"),
    [
        ("receiving", "while the file arrived (the web process receiving it probably stopped)"),
        ("queued", "waiting in the import queue (the task was lost or no control worker runs)"),
        ("validating", "while it was validated (the control worker probably stopped)"),
    ],
)
def test_the_sweep_fails_imports_stuck_past_the_deadline(
    world: World, store: Path, settings: Any, phase: str, where: str
) -> None:
    settings.SKYPORT_IMAGE_IMPORT_DEADLINE_SECONDS = 3600.0
    stuck = Image.objects.create(name="stuck", version="1", owner=world.a)
    fresh = Image.objects.create(name="fresh", version="1", owner=world.a)
    _stuck(stuck, phase, 61, store)
    fresh_claim = _stuck(fresh, phase, 59, store)
    other = store / "tmp" / "upload-of-someone-else"
    other.write_bytes(b"x")

    assert maintenance.sweep_imports() == 1
    stuck.refresh_from_db()
    assert stuck.status == "failed"
    assert stuck.status_reason == (
        f"import abandoned: no progress for 61 min (limit 60 min) {where}; send the file again"
    )
    assert (stuck.import_id, stuck.import_phase, stuck.import_updated_at) == ("", "", None)
    assert import_events(stuck.pk) == [stuck.status_reason]
    # its temporary file is gone; the fresh import's and an unrelated one stay
    assert sorted(p.name for p in (store / "tmp").iterdir()) == sorted(
        [p.name for p in services.store().temp_files(fresh_claim.token)] + [other.name]
    )
    assert Image.objects.get(pk=fresh.pk).status == "importing"


def test_a_swept_import_that_finishes_late_changes_nothing(world: World, store: Path, tmp_path: Path) -> None:
    image = Image.objects.create(name="late", version="1", owner=world.a)
    held = imports.claim(image)
    temp, digest, _ = imports.copy_in(f.qcow2(tmp_path / "d.qcow2"), held)
    held.note("queued for import", "queued")
    Image.objects.filter(pk=image.pk).update(import_updated_at=timezone.now() - dt.timedelta(hours=2))
    assert maintenance.sweep_imports() == 1
    reason = Image.objects.get(pk=image.pk).status_reason
    assert not temp.exists()
    # The task finally arrives: the import is no longer waiting, so it does nothing.
    assert tasks.import_image.apply(
        args=(image.pk, "qcow2", str(temp), digest, "queued", held.token)
    ).get() == ("duplicate")
    image.refresh_from_db()
    assert (image.status, image.status_reason) == ("failed", reason)
    assert not image.artifacts.exists() and files_in(store)["blobs/sha256"] == []


def test_an_import_given_up_while_it_validates_drops_its_result(
    world: World, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = Image.objects.create(name="slow", version="1", owner=world.a)
    held = imports.claim(image)
    temp, digest, _ = imports.copy_in(f.qcow2(tmp_path / "d.qcow2"), held)
    check_disk = validation.check_disk

    def meanwhile_swept(*args: Any) -> validation.Checked:
        checked = check_disk(*args)
        Image.objects.filter(pk=image.pk).update(import_updated_at=timezone.now() - dt.timedelta(hours=2))
        assert maintenance.sweep_imports() == 1
        return checked

    monkeypatch.setattr(validation, "check_disk", meanwhile_swept)
    assert imports.import_here(held, "qcow2", temp, digest) == "superseded"
    image.refresh_from_db()
    assert image.status == "failed" and image.status_reason.startswith("import abandoned")
    assert not image.artifacts.exists() and not Blob.objects.exists()
    assert files_in(store) == {"tmp": [], "blobs/sha256": []}


def test_the_sweep_keeps_an_image_active_when_another_artifact_runs_it(world: World, store: Path) -> None:
    image = Image.objects.create(name="both", version="1", owner=world.a, status="active")
    Artifact.objects.create(image=image, format="qcow2", digest="sha256:" + "ab" * 32, size=1)
    _stuck(image, "receiving", 120, store)
    assert maintenance.sweep_imports() == 1
    image.refresh_from_db()
    assert image.status == "active" and image.status_reason.startswith(
        "import abandoned: no progress for 120"
    )


def test_the_sweep_fails_an_import_left_from_before_import_ids(world: World, store: Path) -> None:
    """An image importing since before the migration has no import id and no progress time."""
    image = Image.objects.create(name="legacy", version="1", owner=world.a, status="importing")
    assert maintenance.sweep_imports() == 1
    image.refresh_from_db()
    assert image.status == "failed"
    assert (
        image.status_reason
        == "import abandoned: no progress for an unknown time (limit 60 min); send the file again"
    )


def test_the_beat_task_runs_the_whole_images_sweep(world: World, store: Path) -> None:
    image = Image.objects.create(name="beat", version="1", owner=world.a)
    _stuck(image, "queued", 24 * 60, store)
    stray = services.store().blobs / ("ef" * 32)
    stray.write_bytes(b"nobody's")
    old = time.time() - 3 * 86400
    os.utime(stray, (old, old))
    assert tasks.sweep.apply().get() == {"stuck_imports": 1, "temp_files": 0, "blobs": 1}
    assert Image.objects.get(pk=image.pk).status == "failed"
    assert files_in(store) == {"tmp": [], "blobs/sha256": []}


def test_the_beat_schedule_runs_the_images_sweep(settings: Any) -> None:
    entry = settings.CELERY_BEAT_SCHEDULE["images"]
    assert entry["task"] == "portal.images.sweep" == tasks.sweep.name
    assert entry["schedule"] < settings.SKYPORT_IMAGE_IMPORT_DEADLINE_SECONDS


def test_a_slow_upload_marks_progress_so_the_sweep_leaves_it(
    world: World, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    image = Image.objects.create(name="slow-up", version="1", owner=world.a)
    held = imports.claim(image)
    Image.objects.filter(pk=image.pk).update(import_updated_at=timezone.now() - dt.timedelta(hours=3))
    clock = itertools.chain([0.0, 61.0, 62.0, 200.0], itertools.repeat(300.0))
    monkeypatch.setattr(imports, "_monotonic", lambda: next(clock))
    monkeypatch.setattr(imports, "CHUNK", 4)
    imports.receive_for(held, io.BytesIO(b"0123456789ab"), 12)
    image.refresh_from_db()
    assert image.status_reason == "receiving upload: 12 bytes of 12 bytes"
    assert image.import_updated_at is not None
    assert timezone.now() - image.import_updated_at < dt.timedelta(minutes=1)
    assert maintenance.sweep_imports() == 0


def test_an_upload_whose_image_was_released_meanwhile_stops_and_keeps_nothing(
    world: World, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    image = Image.objects.create(name="too-slow", version="1", owner=world.a)
    held = imports.claim(image)
    Image.objects.filter(pk=image.pk).update(import_updated_at=timezone.now() - dt.timedelta(hours=3))
    assert maintenance.sweep_imports() == 1
    reason = Image.objects.get(pk=image.pk).status_reason
    clock = itertools.chain([0.0], itertools.repeat(61.0))
    monkeypatch.setattr(imports, "_monotonic", lambda: next(clock))
    monkeypatch.setattr(imports, "CHUNK", 4)
    with pytest.raises(imports.ClaimLost, match="released while this upload was arriving") as lost:
        imports.receive_for(held, io.BytesIO(b"0123456789ab"), 12)
    assert lost.value.status == 409
    image.refresh_from_db()
    assert (image.status, image.status_reason) == ("failed", reason)  # the sweep's word stands
    assert files_in(store)["tmp"] == []


# ------------------------------------------------------------- the commit and the store


def _checked_with_a_vanished_blob(store: BlobStore, tag: str) -> tuple[validation.Checked, str, str]:
    fresh = b"a layer this import brings"
    staged = store.tagged(tag).temp_path("layer")
    staged.write_bytes(fresh)
    gone = "sha256:" + "cd" * 32
    Blob.objects.create(digest=gone, size=5, media_type=validation.MEDIA_LAYER)  # its file is not there
    checked = validation.Checked(
        "oci",
        f.digest(b"manifest"),
        [
            validation.StagedBlob(f.digest(fresh), len(fresh), validation.MEDIA_LAYER, staged),
            validation.StagedBlob(gone, 5, validation.MEDIA_LAYER, None),
        ],
        detail="OCI image",
    )
    return checked, f.digest(fresh), gone


def test_a_reused_blob_missing_at_commit_moves_nothing_into_the_store(
    world: World, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = Image.objects.create(name="orphan", version="1", owner=world.a)
    held = imports.claim(image)
    temp, digest, _ = imports.copy_in(f.oci_archive(tmp_path / "a.tar", [f.BASE]), held)
    checked, fresh, gone = _checked_with_a_vanished_blob(services.store(), held.token)
    monkeypatch.setattr(validation, "check_archive", lambda path, s, limits: checked)
    assert imports.import_here(held, "oci", temp, digest) == "failed"
    image.refresh_from_db()
    assert image.status_reason == (
        f"oci rejected: blob {gone} left the store while the upload was checked; send it again"
    )
    assert not Blob.objects.filter(digest=fresh).exists()
    assert files_in(store) == {"tmp": [], "blobs/sha256": []}


def test_a_commit_that_fails_after_moving_blobs_takes_them_back(
    world: World, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = Image.objects.create(name="rollback", version="1", owner=world.a)
    held = imports.claim(image)
    temp, digest, _ = imports.copy_in(f.oci_archive(tmp_path / "a.tar", [f.BASE, f.APP_A]), held)
    kept = f.digest(b"already stored by another image")
    (services.store().blobs / kept[7:]).write_bytes(b"already stored by another image")
    Blob.objects.create(digest=kept, size=1, media_type=validation.MEDIA_LAYER)
    check_archive = validation.check_archive

    def with_kept(path: Path, s: Any, limits: Any) -> validation.Checked:
        checked = check_archive(path, s, limits)
        checked.blobs.append(validation.StagedBlob(kept, 1, validation.MEDIA_LAYER, None))
        return checked

    def broken_create(**kw: Any) -> Any:
        # every new blob is in blobs/ by now
        assert len(files_in(store)["blobs/sha256"]) == 5
        raise RuntimeError("database went away")

    monkeypatch.setattr(validation, "check_archive", with_kept)
    monkeypatch.setattr(Artifact.objects, "create", broken_create)
    assert imports.import_here(held, "oci", temp, digest) == "failed"
    image.refresh_from_db()
    assert image.status_reason == "oci import failed: RuntimeError: database went away"
    # the four blobs this import moved are gone again; the one it reused stays
    assert files_in(store) == {"tmp": [], "blobs/sha256": [kept[7:]]}
    assert list(Blob.objects.values_list("digest", flat=True)) == [kept]


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_garbage_collection_removes_only_old_unreferenced_blobs(
    world: World, store: Path, tmp_path: Path, capture: Any, settings: Any
) -> None:
    settings.SKYPORT_IMAGE_BLOB_GRACE_SECONDS = 3600.0
    c = world.client("a_member")
    img = new_image(c)
    upload(c, img["id"], f.oci_archive(tmp_path / "a.tar", [f.BASE]).read_bytes(), "oci", capture)
    assert Image.objects.get(pk=img["id"]).status == "active"
    blobs = services.store().blobs
    referenced = sorted(p.name for p in blobs.iterdir())
    for p in blobs.iterdir():
        _age(p, 86400)  # old, but referenced
    old_stray, new_stray = blobs / ("01" * 32), blobs / ("02" * 32)
    old_stray.write_bytes(b"left by a crash")
    new_stray.write_bytes(b"placed a moment ago")
    _age(old_stray, 2 * 3600)
    # a row no artifact uses (its image was deleted in the admin), with its file
    unused = f.digest(b"unused layer")
    (blobs / unused[7:]).write_bytes(b"unused layer")
    _age(blobs / unused[7:], 2 * 3600)
    Blob.objects.create(digest=unused, size=12, media_type=validation.MEDIA_LAYER)
    Blob.objects.filter(digest=unused).update(created_at=timezone.now() - dt.timedelta(hours=2))

    assert maintenance.collect_garbage() == 2
    assert sorted(p.name for p in blobs.iterdir()) == sorted([*referenced, new_stray.name])
    assert not Blob.objects.filter(digest=unused).exists()
    assert Blob.objects.count() == len(referenced)
    # the young stray goes once it is past the grace period
    _age(new_stray, 2 * 3600)
    assert maintenance.collect_garbage() == 1
    assert sorted(p.name for p in blobs.iterdir()) == referenced


def test_garbage_collection_spares_a_stored_blob_an_import_is_reusing(
    world: World, store: Path, tmp_path: Path, capture: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A base layer left without a row is old; an import that reuses it touches it, so GC waits."""
    settings.SKYPORT_IMAGE_BLOB_GRACE_SECONDS = 3600.0
    blobs = services.store().blobs
    base = blobs / f.digest(f.BASE)[7:]
    base.write_bytes(f.BASE)
    _age(base, 86400)
    check_archive = validation.check_archive
    collected: list[int] = []

    def gc_during_validation(path: Path, s: Any, limits: Any) -> validation.Checked:
        checked = check_archive(path, s, limits)
        collected.append(maintenance.collect_garbage())
        return checked

    monkeypatch.setattr(validation, "check_archive", gc_during_validation)
    c = world.client("a_member")
    img = new_image(c)
    upload(c, img["id"], f.oci_archive(tmp_path / "a.tar", [f.BASE, f.APP_A]).read_bytes(), "oci", capture)
    assert collected == [0]
    image = Image.objects.get(pk=img["id"])
    assert image.status == "active", image.status_reason
    assert Blob.objects.filter(digest=f.digest(f.BASE)).exists() and base.is_file()
