"""manage.py import_image: its --version is the image's version (not Django's), it imports real files,
and a refused run ends with a one-line error and leaves no image behind."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from kombu.exceptions import OperationalError

from portal.images import imports, tasks
from portal.images.models import Image
from portal.tenancy.models import Tenant
from tests.portal import imagefiles as f


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("import_image", *args, stdout=out)
    return out.getvalue()


def leftovers(store: Path) -> list[str]:
    return sorted(p.name for p in (store / "tmp").iterdir()) if (store / "tmp").is_dir() else []


def test_version_option_is_the_image_version(db: Any, tmp_path: Any) -> None:
    missing = tmp_path / "nope.tar"
    with pytest.raises(CommandError, match=r"nope\.tar: no such file"):
        call_command(
            "import_image", str(missing), "--name", "x", "--version", "1", "--format", "oci", "--public"
        )


def test_a_qcow2_is_imported_and_becomes_active(db: Any, store: Path, tmp_path: Path) -> None:
    disk = f.qcow2(tmp_path / "tiny.qcow2", "24M")
    out = run(str(disk), "--name", "tiny", "--version", "1", "--format", "qcow2", "--public", "--wait")
    image = Image.objects.get(name="tiny", version="1", owner=None)
    assert image.status == "active", image.status_reason
    assert f"image tiny:1 (id {image.pk}): importing {f.digest(disk.read_bytes())}" in out
    assert "image tiny:1: active - qcow2, virtual size 24 MiB" in out
    art = image.artifacts.get()
    assert art.format == "qcow2" and art.digest == f.digest(disk.read_bytes())
    assert disk.is_file()  # the operator's file is left alone
    assert leftovers(store) == []


def test_an_oci_archive_is_imported_for_a_tenant(db: Any, store: Path, tmp_path: Path) -> None:
    acme = Tenant.objects.create(slug="acme", name="Acme")
    archive = f.oci_archive(tmp_path / "app.tar", [f.BASE, f.APP_A])
    run(
        str(archive),
        "--name",
        "app",
        "--version",
        "2",
        "--format",
        "oci",
        "--tenant",
        "acme",
        "--sha256",
        f.digest(archive.read_bytes()),
        "--wait",
    )
    image = Image.objects.get(name="app", version="2")
    assert image.owner == acme
    assert image.status == "active", image.status_reason
    assert image.formats() == {"oci"}
    assert leftovers(store) == []


def test_an_image_being_imported_is_a_clean_error_not_a_traceback(
    db: Any, store: Path, tmp_path: Path
) -> None:
    image = Image.objects.create(name="busy", version="1")
    held = imports.claim(image)
    disk = f.qcow2(tmp_path / "d.qcow2")
    with pytest.raises(
        CommandError, match=r"^Image busy:1 is importing; wait until its current import ends\.$"
    ):
        run(str(disk), "--name", "busy", "--version", "1", "--format", "qcow2", "--public")
    image.refresh_from_db()
    assert image.status == "importing" and image.import_id == held.token  # the running import is untouched
    assert leftovers(store) == []


@pytest.mark.parametrize(
    ("limit", "extra", "message"),
    [
        (1024, [], r"over the upload limit of 1\.0 KiB \(1024 bytes\)"),
        (
            None,
            ["--sha256", "0" * 64],
            r"^Checksum mismatch: the file is sha256:[0-9a-f]{64}, expected sha256:0{64}\.$",
        ),
    ],
    ids=["too-large", "checksum"],
)
def test_a_refused_run_leaves_no_new_image_behind(
    db: Any, store: Path, tmp_path: Path, settings: Any, limit: int | None, extra: list[str], message: str
) -> None:
    if limit is not None:
        settings.SKYPORT_UPLOAD_MAX_BYTES = limit
    disk = f.qcow2(tmp_path / "d.qcow2")
    with pytest.raises(CommandError, match=message):
        run(str(disk), "--name", "new", "--version", "1", "--format", "qcow2", "--public", *extra)
    assert not Image.objects.filter(name="new").exists()
    assert leftovers(store) == []


def test_an_empty_file_is_refused(db: Any, store: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.qcow2"
    empty.write_bytes(b"")
    with pytest.raises(CommandError, match="The request body is empty"):
        run(str(empty), "--name", "empty", "--version", "1", "--format", "qcow2", "--public")
    assert not Image.objects.filter(name="empty").exists()


def test_a_refused_run_keeps_an_existing_image_and_says_why(
    db: Any, store: Path, tmp_path: Path, settings: Any
) -> None:
    Image.objects.create(name="old", version="1", description="made by hand")
    settings.SKYPORT_UPLOAD_MAX_BYTES = 1024
    with pytest.raises(CommandError, match="over the upload limit"):
        run(
            str(f.qcow2(tmp_path / "d.qcow2")),
            "--name",
            "old",
            "--version",
            "1",
            "--format",
            "qcow2",
            "--public",
        )
    image = Image.objects.get(name="old")
    assert image.status == "queued" and image.status_reason.startswith("last upload refused: ")


def test_an_immutable_image_is_a_clean_error(db: Any, store: Path, tmp_path: Path) -> None:
    disk = f.qcow2(tmp_path / "d.qcow2")
    run(str(disk), "--name", "imm", "--version", "1", "--format", "qcow2", "--public", "--wait")
    with pytest.raises(CommandError, match="already has a vm artifact; images are immutable"):
        run(str(disk), "--name", "imm", "--version", "1", "--format", "raw", "--public")
    assert Image.objects.get(name="imm").status == "active"


def test_a_broker_that_is_down_is_a_clean_error(
    db: Any, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(*args: Any) -> None:
        raise OperationalError("Connection refused")

    monkeypatch.setattr(tasks.import_image, "delay", down)
    with pytest.raises(
        CommandError, match=r"the import could not be queued \(OperationalError: Connection refused\)"
    ):
        run(
            str(f.qcow2(tmp_path / "d.qcow2")),
            "--name",
            "nobroker",
            "--version",
            "1",
            "--format",
            "qcow2",
            "--public",
        )
    assert not Image.objects.filter(name="nobroker").exists()
    assert leftovers(store) == []


def _sample_dir(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    files = [
        f.qcow2(d / "skyport-tiny-7.qcow2"),
        f.oci_archive(d / "busybox-1.oci.tar", [f.BASE]),
        f.oci_archive(d / "busybox-web-1.oci.tar", [f.BASE, f.APP_A]),
    ]
    for p in files:
        Path(f"{p}.sha256").write_text(f"{f.digest(p.read_bytes())[7:]}  {p.name}\n")
    return d


def test_sample_images_are_imported_once(db: Any, store: Path, tmp_path: Path) -> None:
    d = _sample_dir(tmp_path)
    out = io.StringIO()
    call_command("import_sample_images", "--dir", str(d), stdout=out)
    assert "image sample:1-7 (oci, qcow2)" in out.getvalue()
    images = {str(i): i for i in Image.objects.all()}
    assert sorted(images) == ["busybox-web:1", "busybox:1", "sample:1-7", "tiny:7"]
    assert all(i.status == "active" for i in images.values()), [i.status_reason for i in images.values()]
    call_command("import_sample_images", "--dir", str(d), stdout=io.StringIO())  # idempotent
    assert Image.objects.count() == 4 and leftovers(store) == []


def test_sample_images_with_a_stuck_image_are_a_clean_error(db: Any, store: Path, tmp_path: Path) -> None:
    d = _sample_dir(tmp_path)
    imports.claim(Image.objects.create(name="tiny", version="7"))
    with pytest.raises(
        CommandError, match=r"^Image tiny:7 is importing; wait until its current import ends\.$"
    ):
        call_command("import_sample_images", "--dir", str(d), stdout=io.StringIO())
