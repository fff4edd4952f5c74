"""Images: upload, validation, content-addressed storage, visibility and deletion.

Every upload goes through the real API (streamed PUT), the real import task
(eager here) and real ``qemu-img``; the store is a fresh directory per test,
so "nothing left behind" is checked by listing it.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from rest_framework.test import APIClient

from portal.images.models import Blob, Image
from tests.portal import imagefiles as f
from tests.portal.conftest import World


def files_in(store: Path) -> dict[str, list[str]]:
    out = {}
    for sub in ("tmp", "blobs/sha256"):
        d = store / sub
        out[sub] = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
    return out


def new_image(client: APIClient, name: str = "app", version: str = "1", **extra: Any) -> dict[str, Any]:
    r = client.post(
        "/api/v1/images/", {"name": name, "version": version, "tenant": "acme", **extra}, format="json"
    )
    assert r.status_code == 201, r.content
    return dict(r.json())


def upload(client: APIClient, image_id: int, body: bytes, fmt: str, capture: Any, **query: str) -> Any:
    qs = "&".join(f"{k}={v}" for k, v in {"type": fmt, **query}.items())
    with capture(execute=True):
        return client.put(
            f"/api/v1/images/{image_id}/file/?{qs}", data=body, content_type="application/octet-stream"
        )


@pytest.fixture
def capture(django_capture_on_commit_callbacks: Any) -> Any:
    return django_capture_on_commit_callbacks


# ------------------------------------------------------------------------------- VM disks


def test_qcow2_upload_becomes_active_and_is_stored_by_digest(
    world: World, store: Path, tmp_path: Path, capture: Any
) -> None:
    c = world.client("a_member")
    img = new_image(c)
    assert img["status"] == "queued" and img["owner"] == "acme" and img["public"] is False
    body = f.qcow2(tmp_path / "d.qcow2", "64M").read_bytes()
    r = upload(c, img["id"], body, "qcow2", capture, sha256=f.digest(body)[7:])
    assert r.status_code == 202, r.content
    assert r.json()["status"] in ("importing", "active")  # the import task runs eagerly in tests
    image = c.get(f"/api/v1/images/{img['id']}/").json()
    assert image["status"] == "active", image
    assert image["formats"] == ["qcow2"]
    art = image["artifacts"][0]
    assert art["digest"] == art["source_digest"] == f.digest(body)
    assert art["virtual_size"] == 64 * 2**20
    assert image["min_disk_gb"] == 1
    assert files_in(store) == {"tmp": [], "blobs/sha256": [f.digest(body)[7:]]}
    # an image is immutable: a second disk is refused
    r = upload(c, img["id"], body, "qcow2", capture)
    assert r.status_code == 409 and "immutable" in r.json()["message"]


def test_qcow2_with_backing_file_on_the_host_is_rejected(
    world: World, store: Path, tmp_path: Path, capture: Any
) -> None:
    c = world.client("a_member")
    img = new_image(c)
    body = f.qcow2(tmp_path / "evil.qcow2", "16M", backing="/etc/shadow").read_bytes()
    r = upload(c, img["id"], body, "qcow2", capture)
    assert r.status_code == 202  # received; the import task rejects it
    image = Image.objects.get(pk=img["id"])
    assert image.status == "failed"
    assert "backing file (/etc/shadow)" in image.status_reason
    assert files_in(store) == {"tmp": [], "blobs/sha256": []}
    assert not Blob.objects.exists()


def test_declared_format_must_match_what_qemu_img_sees(
    world: World, store: Path, tmp_path: Path, capture: Any
) -> None:
    c = world.client("a_member")
    img = new_image(c)
    body = f.qcow2(tmp_path / "d.qcow2").read_bytes()
    upload(c, img["id"], body, "raw", capture)
    image = Image.objects.get(pk=img["id"])
    assert image.status == "failed" and "declared as raw but qemu-img sees qcow2" in image.status_reason
    assert files_in(store) == {"tmp": [], "blobs/sha256": []}


def test_truncated_qcow2_is_rejected(world: World, store: Path, tmp_path: Path, capture: Any) -> None:
    c = world.client("a_member")
    disk = f.qcow2(tmp_path / "d.qcow2", "64M")
    import subprocess

    # give the disk data clusters, then cut the file short
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 4M", str(disk)], check=True, capture_output=True
    )
    body = disk.read_bytes()[: 2 * 2**20]
    img = new_image(c)
    upload(c, img["id"], body, "qcow2", capture)
    image = Image.objects.get(pk=img["id"])
    assert image.status == "failed", image.status_reason
    assert "qcow2 rejected" in image.status_reason
    assert files_in(store) == {"tmp": [], "blobs/sha256": []}


@pytest.mark.parametrize("prefix", ["", "sha256:"], ids=["hex", "prefixed"])
def test_checksum_mismatch_fails_the_image_and_keeps_nothing(
    world: World, store: Path, tmp_path: Path, capture: Any, prefix: str
) -> None:
    c = world.client("a_member")
    img = new_image(c)
    body = f.qcow2(tmp_path / "d.qcow2").read_bytes()
    r = upload(c, img["id"], body, "qcow2", capture, sha256=prefix + "0" * 64)
    assert r.status_code == 400
    assert r.json()["message"] == (
        f"Checksum mismatch: the file is {f.digest(body)}, expected sha256:{'0' * 64}."
    )
    image = Image.objects.get(pk=img["id"])
    assert image.status == "failed" and "Checksum mismatch" in image.status_reason
    assert files_in(store) == {"tmp": [], "blobs/sha256": []}


class _ShortBody(io.RawIOBase):
    """A client that sends fewer bytes than its Content-Length, then goes away."""

    def __init__(self, data: bytes) -> None:
        self.buf = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self.buf.read(n)


def test_upload_cut_short_keeps_nothing_and_can_be_retried(
    world: World, store: Path, tmp_path: Path, capture: Any
) -> None:
    c = world.client("a_member")
    img = new_image(c)
    body = f.qcow2(tmp_path / "d.qcow2").read_bytes()
    r = c.generic(
        "PUT",
        f"/api/v1/images/{img['id']}/file/?type=qcow2",
        b"",
        content_type="application/octet-stream",
        CONTENT_LENGTH=str(len(body)),
        **{"wsgi.input": _ShortBody(body[:1000])},
    )
    assert r.status_code == 400
    assert f"ended after 1000 of {len(body)} bytes" in r.json()["message"]
    image = Image.objects.get(pk=img["id"])
    assert image.status == "queued"
    assert image.status_reason == f"last upload refused: it ended after 1000 of {len(body)} bytes"
    assert files_in(store) == {"tmp": [], "blobs/sha256": []}
    r = upload(c, img["id"], body, "qcow2", capture)
    assert r.status_code == 202 and Image.objects.get(pk=img["id"]).status == "active"


def test_oversized_upload_is_refused_before_reading(
    world: World, store: Path, settings: Any, tmp_path: Path, capture: Any
) -> None:
    settings.SKYPORT_UPLOAD_MAX_BYTES = 1 << 20
    c = world.client("a_member")
    img = new_image(c)
    r = upload(c, img["id"], b"x" * (2 << 20), "raw", capture)
    assert r.status_code == 413
    assert r.json()["message"] == (
        "The file is 2.0 MiB (2097152 bytes), over the upload limit of 1.0 MiB (1048576 bytes)."
    )
    image = Image.objects.get(pk=img["id"])
    assert image.status == "queued"  # retryable, and the tenant sees why the last try failed
    assert image.status_reason == "last upload refused: 2.0 MiB is over the 1.0 MiB limit"
    assert files_in(store)["tmp"] == []


def test_upload_without_content_length_is_refused_with_411(
    world: World, store: Path, tmp_path: Path, capture: Any
) -> None:
    c = world.client("a_member")
    img = new_image(c)
    body = f.qcow2(tmp_path / "d.qcow2").read_bytes()
    r = c.generic(
        "PUT",
        f"/api/v1/images/{img['id']}/file/?type=qcow2",
        body,
        content_type="application/octet-stream",
        CONTENT_LENGTH="",  # what a chunked request looks like to the view
    )
    assert r.status_code == 411, r.content
    assert (
        r.json()["message"]
        == "Send the file with a Content-Length header (chunked uploads are not accepted)."
    )
    image = Image.objects.get(pk=img["id"])
    assert image.status == "queued"
    assert image.status_reason == (
        "last upload refused: it had no Content-Length header (chunked uploads are not accepted)"
    )
    assert files_in(store) == {"tmp": [], "blobs/sha256": []}
    assert upload(c, img["id"], body, "qcow2", capture).status_code == 202
    assert Image.objects.get(pk=img["id"]).status == "active"


def test_a_refused_upload_leaves_an_active_image_active(
    world: World, store: Path, settings: Any, tmp_path: Path, capture: Any
) -> None:
    c = world.client("a_member")
    img = new_image(c)
    upload(c, img["id"], f.qcow2(tmp_path / "d.qcow2").read_bytes(), "qcow2", capture)
    settings.SKYPORT_UPLOAD_MAX_BYTES = 1024
    archive = f.oci_archive(tmp_path / "a.tar", [f.BASE]).read_bytes()
    assert upload(c, img["id"], archive, "oci", capture).status_code == 413
    image = Image.objects.get(pk=img["id"])
    assert image.status == "active" and image.formats() == {"qcow2"}
    assert (
        image.status_reason == f"last upload refused: {len(archive) / 1024:.1f} KiB is over the 1.0 KiB limit"
    )


def test_qcow2_with_an_external_data_file_is_rejected(
    world: World, store: Path, tmp_path: Path, capture: Any
) -> None:
    import subprocess

    c = world.client("a_member")
    img = new_image(c)
    disk = tmp_path / "d.qcow2"
    data = tmp_path / "data.raw"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={data}", str(disk), "16M"], check=True
    )
    upload(c, img["id"], disk.read_bytes(), "qcow2", capture)
    image = Image.objects.get(pk=img["id"])
    assert image.status == "failed"
    assert image.status_reason == f"qcow2 rejected: the qcow2 uses an external data file ({data})"
    assert files_in(store) == {"tmp": [], "blobs/sha256": []}


def test_virtual_size_limit(world: World, store: Path, settings: Any, tmp_path: Path, capture: Any) -> None:
    settings.SKYPORT_IMAGE_MAX_VIRTUAL_BYTES = 2**30
    c = world.client("a_member")
    img = new_image(c)
    upload(c, img["id"], f.qcow2(tmp_path / "big.qcow2", "4G").read_bytes(), "qcow2", capture)
    image = Image.objects.get(pk=img["id"])
    assert image.status == "failed" and "exceeds the limit of 1 GiB" in image.status_reason


def test_upload_needs_a_known_format_and_the_member_role(world: World, store: Path, capture: Any) -> None:
    c = world.client("a_member")
    img = new_image(c)
    r = upload(c, img["id"], b"abc", "vmdk", capture)
    assert r.status_code == 400 and "type" in r.json()["errors"]
    r = upload(world.client("a_viewer"), img["id"], b"abc", "raw", capture)
    assert r.status_code == 403
    r = upload(world.client("b_admin"), img["id"], b"abc", "raw", capture)
    assert r.status_code == 404
    assert Image.objects.get(pk=img["id"]).status == "queued"


# --------------------------------------------------------------------------- OCI archives


def oci_upload(
    c: APIClient, tmp_path: Path, capture: Any, layers: list[bytes], *extra: f.Member, **kw: Any
) -> Image:
    img = new_image(c, **kw)
    body = f.oci_archive(tmp_path / f"{img['name']}.tar", layers, *extra).read_bytes()
    r = upload(c, img["id"], body, "oci", capture)
    assert r.status_code == 202, r.content
    return Image.objects.get(pk=img["id"])


def test_two_images_sharing_a_base_layer_store_it_once(
    world: World, store: Path, tmp_path: Path, capture: Any
) -> None:
    c = world.client("a_member")
    a = oci_upload(c, tmp_path, capture, [f.BASE, f.APP_A], name="app-a")
    b = oci_upload(c, tmp_path, capture, [f.BASE, f.APP_B], name="app-b")
    assert a.status == b.status == "active", (a.status_reason, b.status_reason)
    base = f.digest(f.BASE)
    assert Blob.objects.get(digest=base).artifacts.count() == 2
    stored = files_in(store)["blobs/sha256"]
    assert stored.count(base[7:]) == 1
    # 2 manifests + 2 configs + 3 distinct layers
    assert len(stored) == 7 and Blob.objects.count() == 7
    layers = c.get(f"/api/v1/images/{a.pk}/").json()["artifacts"][0]["layers"]
    assert sorted(layers) == sorted([base, f.digest(f.APP_A)])
    # deleting one keeps the shared layer for the other
    assert c.delete(f"/api/v1/images/{a.pk}/").status_code == 204
    stored = files_in(store)["blobs/sha256"]
    assert base[7:] in stored and f.digest(f.APP_A)[7:] not in stored and len(stored) == 4
    assert c.delete(f"/api/v1/images/{b.pk}/").status_code == 204
    assert files_in(store)["blobs/sha256"] == [] and not Blob.objects.exists()


def test_docker_save_archive_is_converted_to_oci(
    world: World, store: Path, tmp_path: Path, capture: Any
) -> None:
    c = world.client("a_member")
    img = new_image(c)
    body = f.docker_archive(tmp_path / "d.tar", [f.BASE, f.APP_A]).read_bytes()
    upload(c, img["id"], body, "docker", capture)
    image = Image.objects.get(pk=img["id"])
    assert image.status == "active", image.status_reason
    art = image.artifacts.get()
    assert art.format == "oci" and art.source_digest == f.digest(body)
    manifest = json.loads((store / "blobs/sha256" / art.digest[7:]).read_bytes())
    assert [x["digest"] for x in manifest["layers"]] == [f.digest(f.BASE), f.digest(f.APP_A)]
    assert f.digest((store / "blobs/sha256" / art.digest[7:]).read_bytes()) == art.digest


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (f.add_file("../../etc/cron.d/evil", b"* * * * * root sh\n"), "outside the destination"),
        (f.add_file("/etc/passwd", b"root::0:0::/:/bin/sh\n"), "absolute"),
        (f.add_special("dev/sda", tarfile.BLKTYPE), "'dev/sda' is a device node"),
        (f.add_special("dev/mem", tarfile.CHRTYPE), "'dev/mem' is a device node"),
        (f.add_special("run/fifo", tarfile.FIFOTYPE), "is a FIFO"),
        (f.add_special("lib/escape", tarfile.LNKTYPE, "../../../etc/shadow"), "outside"),
        (f.add_special("lib/up", tarfile.SYMTYPE, "../../../../etc"), "leaves the image"),
    ],
    ids=["dotdot", "absolute", "blockdev", "chardev", "fifo", "hardlink-out", "symlink-out"],
)
def test_unsafe_layer_members_are_rejected(
    world: World, store: Path, tmp_path: Path, capture: Any, member: f.Member, reason: str
) -> None:
    c = world.client("a_member")
    evil = f.tar_bytes(f.add_file("ok.txt", b"fine"), member)
    image = oci_upload(c, tmp_path, capture, [f.BASE, evil])
    assert image.status == "failed"
    assert reason in image.status_reason, image.status_reason
    assert files_in(store) == {"tmp": [], "blobs/sha256": []}
    assert not Blob.objects.exists()


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ([f.add_file(".wh...", b"")], "member '.wh...': whiteout '.wh...' would hide the directory above it"),
        (
            [f.add_special("etc", tarfile.DIRTYPE), f.add_file("etc/.wh...", b"")],
            "member 'etc/.wh...': whiteout '.wh...' would hide the directory above it",
        ),
        ([f.add_file(".wh..", b"")], "member '.wh..': whiteout '.wh..' would hide the directory it is in"),
        ([f.add_file(".wh.", b"")], "member '.wh.': whiteout '.wh.' names no entry"),
        (
            [f.add_special(".wh...", tarfile.SYMTYPE, "x")],
            "member '.wh...': whiteout '.wh...' would hide the directory above it",
        ),
        (
            [f.add_file("var/.wh..wh.plnk", b"")],
            "member 'var/.wh..wh.plnk': whiteout '.wh..wh.plnk' is AUFS metadata",
        ),
    ],
    ids=["parent", "nested-parent", "self", "empty", "symlink", "aufs-meta"],
)
def test_whiteouts_that_leave_their_directory_are_rejected(
    world: World, store: Path, tmp_path: Path, capture: Any, members: list[f.Member], reason: str
) -> None:
    """A whiteout of '..' would make a node delete its whole layer store; the portal refuses it first."""
    evil = f.tar_bytes(f.add_file("ok.txt", b"fine"), *members)
    image = oci_upload(world.client("a_member"), tmp_path, capture, [f.BASE, evil])
    assert image.status == "failed"
    assert f"oci rejected: layer {f.digest(evil)[7:19]}: {reason}" in image.status_reason, image.status_reason
    assert files_in(store) == {"tmp": [], "blobs/sha256": []}
    assert not Blob.objects.exists()


def test_ordinary_whiteouts_are_accepted(world: World, store: Path, tmp_path: Path, capture: Any) -> None:
    top = f.tar_bytes(f.add_file("etc/.wh.os-release", b""), f.add_file("bin/.wh..wh..opq", b""))
    image = oci_upload(world.client("a_member"), tmp_path, capture, [f.BASE, top])
    assert image.status == "active", image.status_reason


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (f.add_file("../outside", b"x"), "outside the destination"),
        (f.add_file("/abs", b"x"), "absolute"),
        (f.add_special("dev/null", tarfile.CHRTYPE), "is a device node"),
    ],
    ids=["dotdot", "absolute", "device"],
)
def test_unsafe_archive_members_are_rejected(
    world: World, store: Path, tmp_path: Path, capture: Any, member: f.Member, reason: str
) -> None:
    image = oci_upload(world.client("a_member"), tmp_path, capture, [f.BASE], member)
    assert image.status == "failed" and reason in image.status_reason, image.status_reason
    assert files_in(store) == {"tmp": [], "blobs/sha256": []}


def test_absolute_symlinks_inside_a_layer_are_allowed(
    world: World, store: Path, tmp_path: Path, capture: Any
) -> None:
    """Debian images link /usr/bin/awk -> /etc/alternatives/awk; the container resolves it inside."""
    layer = f.tar_bytes(f.add_special("usr/bin/awk", tarfile.SYMTYPE, "/etc/alternatives/awk"))
    image = oci_upload(world.client("a_member"), tmp_path, capture, [f.BASE, layer])
    assert image.status == "active", image.status_reason


def test_layer_that_does_not_match_its_digest_is_rejected(
    world: World, store: Path, tmp_path: Path, capture: Any
) -> None:
    c = world.client("a_member")
    img = new_image(c)
    path = f.oci_archive(tmp_path / "x.tar", [f.BASE, f.APP_A])
    # swap APP_A's bytes for APP_B's under APP_A's name
    data = path.read_bytes().replace(b"application A", b"application B")
    upload(c, img["id"], data, "oci", capture)
    image = Image.objects.get(pk=img["id"])
    assert image.status == "failed" and "does not match its digest" in image.status_reason
    assert files_in(store) == {"tmp": [], "blobs/sha256": []}


def _manifest_bytes(config: bytes, layers: list[bytes]) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": f.descriptor(config, "application/vnd.oci.image.config.v1+json"),
            "layers": [f.descriptor(x, "application/vnd.oci.image.layer.v1.tar") for x in layers],
        }
    ).encode()


def _index(*entries: object) -> bytes:
    return json.dumps({"schemaVersion": 2, "manifests": list(entries)}).encode()


_CONFIG = f.config_for([f.BASE])
_MANIFEST = _manifest_bytes(_CONFIG, [f.BASE])
_BAD_JSON = b'{"schemaVersion": 2, "manifests": [}'
_NOT_UTF8 = b"\xff\xfe not utf-8"


@pytest.mark.parametrize(
    ("index", "blobs", "reason"),
    [
        (_BAD_JSON, [], "index.json is not valid JSON: Expecting value: line 1 column 36"),
        (
            _index(f.descriptor(_BAD_JSON)),
            [_BAD_JSON],
            f"the manifest {f.digest(_BAD_JSON)} is not valid JSON: Expecting value",
        ),
        (
            _index(f.descriptor(_NOT_UTF8)),
            [_NOT_UTF8],
            f"the manifest {f.digest(_NOT_UTF8)} is not valid JSON",
        ),
        (
            _index(f.descriptor(_BAD_JSON, "application/vnd.oci.image.index.v1+json")),
            [_BAD_JSON],
            f"the nested index {f.digest(_BAD_JSON)} is not valid JSON: Expecting value",
        ),
        (
            _index(f.descriptor(_MANIFEST, platform="linux/amd64")),
            [_CONFIG, _MANIFEST, f.BASE],
            f"index.json entry {f.digest(_MANIFEST)} has a platform that is not an object",
        ),
        (
            _index(f.descriptor(_MANIFEST, platform=["linux"])),
            [_CONFIG, _MANIFEST, f.BASE],
            f"index.json entry {f.digest(_MANIFEST)} has a platform that is not an object",
        ),
    ],
    ids=["index", "manifest", "manifest-not-utf8", "nested-index", "platform-string", "platform-list"],
)
def test_malformed_json_is_rejected_with_a_precise_reason(
    world: World, store: Path, tmp_path: Path, capture: Any, index: bytes, blobs: list[bytes], reason: str
) -> None:
    c = world.client("a_member")
    img = new_image(c)
    body = f.layout_archive(tmp_path / "x.tar", index, blobs).read_bytes()
    assert upload(c, img["id"], body, "oci", capture).status_code == 202
    image = Image.objects.get(pk=img["id"])
    assert image.status == "failed"
    assert image.status_reason.startswith(f"oci rejected: {reason}"), image.status_reason
    assert "JSONDecodeError" not in image.status_reason and "import failed" not in image.status_reason
    assert files_in(store) == {"tmp": [], "blobs/sha256": []}


def test_oci_layers_must_match_the_config_diff_ids(
    world: World, store: Path, tmp_path: Path, capture: Any
) -> None:
    c = world.client("a_member")
    img = new_image(c)
    lying = f.config_for([f.BASE, f.APP_B])  # claims APP_B where the archive has APP_A
    body = f.oci_archive(tmp_path / "x.tar", [f.BASE, f.APP_A], config=lying).read_bytes()
    upload(c, img["id"], body, "oci", capture)
    image = Image.objects.get(pk=img["id"])
    assert image.status == "failed"
    assert (
        f"layer {f.digest(f.APP_A)[7:19]} unpacks to {f.digest(f.APP_A)}, "
        f"but the config's rootfs.diff_ids[1] is {f.digest(f.APP_B)}"
    ) in image.status_reason, image.status_reason
    assert files_in(store) == {"tmp": [], "blobs/sha256": []}


def test_gzip_layers_are_checked_against_their_uncompressed_diff_ids(
    world: World, store: Path, tmp_path: Path, capture: Any
) -> None:
    c = world.client("a_member")
    good = oci_upload(c, tmp_path, capture, [f.BASE, f.APP_A], name="gz")
    assert good.status == "active", good.status_reason
    img = new_image(c, name="gz-again")
    body = f.oci_archive(tmp_path / "gz1.tar", [f.BASE, f.APP_A], gzipped=True).read_bytes()
    upload(c, img["id"], body, "oci", capture)
    image = Image.objects.get(pk=img["id"])
    assert image.status == "active", image.status_reason
    # The same gzip base, now in the store, is checked again for an image that lies about it.
    img = new_image(c, name="gz-lie")
    lying = f.config_for([f.APP_A, f.APP_A])
    body = f.oci_archive(tmp_path / "gz2.tar", [f.BASE, f.APP_A], config=lying, gzipped=True).read_bytes()
    upload(c, img["id"], body, "oci", capture)
    image = Image.objects.get(pk=img["id"])
    assert image.status == "failed"
    assert f"unpacks to {f.digest(f.BASE)}, but the config's rootfs.diff_ids[0]" in image.status_reason


def test_not_an_archive_is_rejected(world: World, store: Path, capture: Any) -> None:
    c = world.client("a_member")
    img = new_image(c)
    upload(c, img["id"], b"this is not a tar file" * 100, "oci", capture)
    image = Image.objects.get(pk=img["id"])
    assert image.status == "failed" and "not a tar archive" in image.status_reason
    # in words, not tarfile's list of decompressors and exception reprs (issue 15, defect 7)
    assert "ReadError" not in image.status_reason and "method" not in image.status_reason
    assert "docker save" in image.status_reason


# ------------------------------------------------------------------ visibility and deletion


def test_private_images_are_invisible_and_unusable_to_other_tenants(
    world: World, store: Path, tmp_path: Path, capture: Any
) -> None:
    a = oci_upload(world.client("a_member"), tmp_path, capture, [f.BASE], name="acme-only")
    b = world.client("b_admin")
    assert b.get(f"/api/v1/images/{a.pk}/").status_code == 404
    assert "acme-only" not in [i["name"] for i in b.get("/api/v1/images/?page_size=100").json()["results"]]
    assert (
        b.put(
            f"/api/v1/images/{a.pk}/file/?type=raw", b"x", content_type="application/octet-stream"
        ).status_code
        == 404
    )
    assert b.delete(f"/api/v1/images/{a.pk}/").status_code == 404
    for ref in (a.pk, "acme-only:1", "acme-only"):
        r = b.post(
            "/api/v1/instances/",
            {"name": "x", "image": ref, "flavor": world.flavor_public.pk, "kind": "container"},
            format="json",
        )
        assert r.status_code == 400 and "image" in r.json()["errors"], r.content
    # public images are visible to everybody
    assert b.get("/api/v1/images/?name=busybox").json()["count"] == 1


def test_a_user_of_two_tenants_cannot_launch_one_tenants_private_image_in_the_other(
    world: World, store: Path, tmp_path: Path, capture: Any
) -> None:
    from portal.tenancy.models import Membership

    user = world.users["b_member"]
    Membership.objects.create(user=user, tenant=world.a, role="viewer")
    c = world.client("b_member")
    r = c.post(
        "/api/v1/instances/",
        {"name": "x", "tenant": "bobco", "image": "secret:1", "flavor": world.flavor_public.pk, "kind": "vm"},
        format="json",
    )
    assert r.status_code == 400 and "private to another tenant" in r.json()["errors"]["image"][0]


def test_only_operators_publish_public_images(world: World, store: Path) -> None:
    r = world.client("a_admin").post(
        "/api/v1/images/", {"name": "pub", "version": "1", "public": True}, format="json"
    )
    assert r.status_code == 400 and "Only operators" in r.json()["errors"]["public"][0]
    r = world.client("operator").post(
        "/api/v1/images/", {"name": "pub", "version": "1", "public": True}, format="json"
    )
    assert r.status_code == 201 and r.json()["public"] is True and r.json()["owner"] is None
    # tenant members cannot upload into or delete a public image
    pub = r.json()["id"]
    assert world.client("a_admin").delete(f"/api/v1/images/{pub}/").status_code == 403


def test_duplicate_version_is_a_clear_409(world: World, store: Path) -> None:
    """A clash with an existing image is a conflict (409), naming the field (issue 12, item 10)."""
    c = world.client("a_member")
    new_image(c, "dup", "1")
    r = c.post("/api/v1/images/", {"name": "dup", "version": "1", "tenant": "acme"}, format="json")
    assert r.status_code == 409 and "already exists in tenant acme" in r.json()["errors"]["version"][0]


@pytest.mark.parametrize("public", [False, True], ids=["private", "public"])
def test_two_creates_of_one_version_at_once_give_409(
    world: World, store: Path, monkeypatch: pytest.MonkeyPatch, public: bool
) -> None:
    """The second of two concurrent creates passes validation, then meets the unique constraint."""
    from portal.images.api import serializers

    validate = serializers.ImageSerializer.validate

    def racing(self: Any, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = validate(self, attrs)
        # the other request commits the same name and version now
        Image.objects.create(name=attrs["name"], version=attrs["version"], owner=attrs.get("tenant"))
        return attrs

    monkeypatch.setattr(serializers.ImageSerializer, "validate", racing)
    who, extra = ("operator", {"public": True}) if public else ("a_member", {"tenant": "acme"})
    r = world.client(who).post("/api/v1/images/", {"name": "race", "version": "1", **extra}, format="json")
    where = "the public catalogue" if public else "tenant acme"
    assert r.status_code == 409, r.content
    assert r.json()["message"] == f"race:1 already exists in {where}."
    assert Image.objects.filter(name="race").count() == 1


def test_deleting_an_image_in_use_is_refused(world: World, store: Path) -> None:
    image = world.instance_a.image
    assert image is not None
    Image.objects.filter(pk=image.pk).update(owner=world.a)
    r = world.client("a_admin").delete(f"/api/v1/images/{image.pk}/")
    assert r.status_code == 409 and "used by 1 instance" in r.json()["message"]
    assert Image.objects.filter(pk=image.pk).exists()
    # after the instance is deleted (kept as a record) the image can go
    type(world.instance_a).objects.filter(pk=world.instance_a.pk).update(vm_state="deleted")
    assert world.client("a_admin").delete(f"/api/v1/images/{image.pk}/").status_code == 204
    world.instance_a.refresh_from_db()
    assert world.instance_a.image is None
    assert world.client("a_admin").get(f"/api/v1/instances/{world.instance_a.pk}/").status_code == 200


# ------------------------------------------------------------------------- blob endpoint


def test_blob_endpoint_serves_nodes_with_their_key_only(
    world: World, store: Path, tmp_path: Path, capture: Any
) -> None:
    from portal.images.nodekeys import node_key

    image = oci_upload(world.client("a_member"), tmp_path, capture, [f.BASE])
    digest = image.artifacts.get().digest
    url = f"/api/v1/blobs/{digest}"
    anon = APIClient()
    assert anon.get(url).status_code == 401
    assert world.client("a_admin").get(url).status_code == 401  # tenants never read raw blobs
    assert anon.get(url, HTTP_AUTHORIZATION="Node n1:" + "0" * 64).status_code == 401
    r = anon.get(url, HTTP_AUTHORIZATION=f"Node n1:{node_key('n1')}")
    assert r.status_code == 200
    assert f.digest(b"".join(r.streaming_content)) == digest  # type: ignore[attr-defined]
    assert r["Docker-Content-Digest"] == digest
    missing = anon.get(f"/api/v1/blobs/sha256:{'1' * 64}", HTTP_AUTHORIZATION=f"Node n1:{node_key('n1')}")
    assert missing.status_code == 404
    assert (
        anon.get("/api/v1/blobs/../../etc", HTTP_AUTHORIZATION=f"Node n1:{node_key('n1')}").status_code == 404
    )


def test_standard_dev_nodes_in_a_layer_are_skipped_other_devices_refused(
    world: World, store: Path, tmp_path: Path, capture: Any
) -> None:
    ok = f.tar_bytes(f.add_file("etc/x", b"x"), f.add_special("dev/null", tarfile.CHRTYPE, major=1, minor=3))
    image = oci_upload(world.client("a_member"), tmp_path, capture, [f.BASE, ok])
    assert image.status == "active", image.status_reason
    assert "1 device nodes skipped" in image.status_reason and "dev/null" in image.status_reason
    # dev/null with other numbers is not debootstrap's: still refused.
    odd = f.tar_bytes(f.add_special("dev/null", tarfile.CHRTYPE, major=1, minor=1))
    image = oci_upload(world.client("a_member"), tmp_path, capture, [f.BASE, odd], version="2")
    assert image.status == "failed" and "is a device node" in image.status_reason
