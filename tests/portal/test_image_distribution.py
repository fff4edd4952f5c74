"""Nodes fetch artifacts from the portal over HTTP, by digest, with their node key.

A real HTTP server (pytest-django's live server) serves the blob endpoint;
the node side is the real code (``LayerStore.pull``, ``ImageCache.fetch``,
``NodeService.cached``).  Layers are unpacked for real, so this needs root.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from compute import fetch
from compute.config import NodeConfig
from compute.imagecache import ImageCache
from compute.imagecache import ImageError as DiskError
from compute.layers import ImageError, LayerStore
from compute.tasks import NodeService
from portal.images import imports
from portal.images.models import Image
from portal.images.nodekeys import node_key
from tests.hostcaps import require_binary, require_root
from tests.portal import imagefiles as f

pytestmark = pytest.mark.django_db(transaction=True)


def imported(name: str, fmt: str, path: Path) -> Image:
    image = Image.objects.create(name=name, version="1", os="linux")
    held = imports.claim(image)
    temp, digest, _ = imports.copy_in(path, held)
    assert imports.import_here(held, fmt, temp, digest) == "active"
    return Image.objects.get(pk=image.pk)


@pytest.fixture
def portal(live_server: Any, settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    require_root()
    require_binary("qemu-img")
    settings.SKYPORT_IMAGE_STORE = tmp_path / "store"
    settings.SKYPORT_PORTAL_URL = live_server.url
    monkeypatch.setenv("SKYPORT_NODE_NAME", "n1")
    monkeypatch.setenv("SKYPORT_NODE_KEY", node_key("n1"))
    fetch.downloads.by_digest.clear()
    return str(live_server.url)


def test_a_node_fetches_each_layer_once(portal: str, tmp_path: Path) -> None:
    a = imported("app-a", "oci", f.oci_archive(tmp_path / "a.tar", [f.BASE, f.APP_A]))
    b = imported("app-b", "docker", f.docker_archive(tmp_path / "b.tar", [f.BASE, f.APP_B]))
    ref_a, ref_b = a.artifact_for("container").ref(), b.artifact_for("container").ref()  # type: ignore[union-attr]
    assert ref_a.location == f"{portal}/api/v1/blobs/{ref_a.digest}"
    layers = LayerStore(tmp_path / "node")

    first = layers.pull(ref_a.location, ref_a.digest)
    assert (first.layers[1] / "app/a.txt").read_bytes() == b"application A\n"
    assert first.config.cmd == ("/bin/sh",)
    second = layers.pull(ref_b.location, ref_b.digest)
    assert second.layers[0] == first.layers[0]  # the shared base, unpacked once
    again = layers.pull(ref_a.location, ref_a.digest)  # a second launch
    assert again == first

    got = fetch.downloads.by_digest
    assert got[f.digest(f.BASE)] == 1
    assert got[f.digest(f.APP_A)] == 1 and got[f.digest(f.APP_B)] == 1
    assert got[ref_a.digest] == 1 and got[ref_b.digest] == 1  # manifests
    assert sorted(layers.layers()) == sorted(f.digest(x) for x in (f.BASE, f.APP_A, f.APP_B))


def test_a_node_fetches_a_disk_once_and_reports_its_cache(portal: str, tmp_path: Path) -> None:
    disk = imported("tiny", "qcow2", f.qcow2(tmp_path / "d.qcow2", "32M"))
    ref = disk.artifact_for("vm").ref()  # type: ignore[union-attr]
    cache = ImageCache(tmp_path / "node" / "images")
    path = cache.fetch(ref)
    assert cache.fetch(ref) == path
    assert f.digest(path.read_bytes()) == ref.digest
    assert fetch.downloads.by_digest[ref.digest] == 1

    cfg = NodeConfig("n1", tmp_path / "node", "test:///default", "qemu", "crun", "memory://")
    assert NodeService(cfg, lambda *a: None).cached() == [ref.digest]
    # the heartbeat carries it to the portal, where operators see it
    from compute.drivers.fake import FakeDriver
    from compute.spec import Kind
    from portal.cloud.models import ComputeNode
    from portal.cloud.tasks import apply_node_report

    drivers = {Kind.VM: FakeDriver(Kind.VM), Kind.CONTAINER: FakeDriver(Kind.CONTAINER)}
    NodeService(cfg, lambda task, payload: apply_node_report(payload), drivers).report()
    assert ComputeNode.objects.get(name="n1").cached == [ref.digest]


def test_a_node_without_the_right_key_gets_nothing(
    portal: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = imported("app-a", "oci", f.oci_archive(tmp_path / "a.tar", [f.BASE]))
    ref = a.artifact_for("container").ref()  # type: ignore[union-attr]
    monkeypatch.setenv("SKYPORT_NODE_KEY", node_key("other-node"))
    with pytest.raises(ImageError, match="HTTP 401"):
        LayerStore(tmp_path / "node").pull(ref.location, ref.digest)
    monkeypatch.delenv("SKYPORT_NODE_KEY")
    disk = imported("tiny", "qcow2", f.qcow2(tmp_path / "d.qcow2", "32M"))
    with pytest.raises(DiskError, match="HTTP 401"):
        ImageCache(tmp_path / "node" / "images").fetch(disk.artifact_for("vm").ref())  # type: ignore[union-attr]
    assert not (tmp_path / "node" / "layers").exists() or LayerStore(tmp_path / "node").layers() == []


def test_a_vm_published_as_a_private_image(
    portal: str, world: Any, nodes: Any, sent: list[Any], tmp_path: Path
) -> None:
    """Publish: the node exports the disk and PUTs it over HTTP with a one-image token; it imports."""
    c = world.client("a_member")
    r = c.post(
        "/api/v1/instances/",
        {"name": "web-2", "image": "tiny:1", "flavor": world.flavor_public.pk, "kind": "vm"},
        format="json",
    )
    assert r.status_code == 202, r.content
    nodes.run()
    vm = r.json()["id"]
    assert c.get(f"/api/v1/instances/{vm}/").json()["vm_state"] == "active"

    r = c.post(f"/api/v1/instances/{vm}/publish/", {"name": "web-snap", "version": "1"}, format="json")
    assert r.status_code == 202, r.content
    image_id = r.json()["id"]
    assert r.json()["status"] == "queued" and r.json()["owner"] == "acme"
    assert sent[-1][2][0]["action"] == "publish" and sent[-1][2][0]["params"]["upload_url"].startswith(portal)
    nodes.run()

    image = c.get(f"/api/v1/images/{image_id}/").json()
    assert image["status"] == "active", image
    assert image["formats"] == ["qcow2"] and image["public"] is False
    assert Image.objects.get(pk=image_id).source_instance_id is not None
    assert c.get(f"/api/v1/instances/{vm}/").json()["task_state"] is None
    assert world.client("b_admin").get(f"/api/v1/images/{image_id}/").status_code == 404
    # the same name and version again is a clear 409; a container cannot be published
    again = c.post(f"/api/v1/instances/{vm}/publish/", {"name": "web-snap", "version": "1"}, format="json")
    assert again.status_code == 409 and "already exists" in again.json()["errors"]["version"][0]
    from portal.cloud.models import Instance

    Instance.objects.filter(pk=vm).update(kind="container")
    ctr = c.post(f"/api/v1/instances/{vm}/publish/", {"name": "ctr", "version": "1"}, format="json")
    assert ctr.status_code == 409 and "Containers do not support 'publish'" in ctr.json()["message"]
    assert not Image.objects.filter(name="ctr").exists()


def test_node_upload_needs_the_token_of_that_image(portal: str, world: Any, tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    from portal.images.services import upload_token

    a = Image.objects.create(name="a", version="1", owner=world.a)
    b = Image.objects.create(name="b", version="1", owner=world.a)
    disk = f.qcow2(tmp_path / "d.qcow2").read_bytes()
    for token, want in (("nonsense", 401), (upload_token(b), 403)):
        req = urllib.request.Request(
            f"{portal}/api/v1/blobs/uploads/{a.pk}",
            data=disk,
            method="PUT",
            headers={"Authorization": f"Upload {token}", "Content-Type": "application/octet-stream"},
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == want
    assert Image.objects.get(pk=a.pk).status == "queued"
