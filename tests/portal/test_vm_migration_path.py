"""The disk of a cold migration through the real portal: the source PUTs it, the target GETs it.

The portal endpoints are the real ones on pytest-django's live server (the
upload of a published disk with a one-image token, the blob endpoint with a
node key); the node side is the real ``compute.migration`` over the fake VM
driver (its export is a real qcow2 made by qemu-img, so the portal's import
checks it for real).  The orchestration that drives these steps on a drain
is tested in test_vm_drain.py (fake nodes) and tests/e2e/test_vm_drain_real.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from compute import fetch, migration
from compute.drivers.base import InvalidState
from compute.imagecache import ImageCache
from compute.spec import Kind
from portal.cloud import services
from portal.cloud.models import Instance
from portal.images.models import Image
from portal.images.nodekeys import node_key
from portal.images.services import upload_token
from tests.hostcaps import require_binary

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def portal(live_server: Any, settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    require_binary("qemu-img")
    settings.SKYPORT_IMAGE_STORE = tmp_path / "store"
    settings.SKYPORT_PORTAL_URL = live_server.url
    monkeypatch.setenv("SKYPORT_NODE_NAME", "node-b")
    monkeypatch.setenv("SKYPORT_NODE_KEY", node_key("node-b"))
    return str(live_server.url)


def test_a_stopped_vms_disk_reaches_the_target_through_the_portal(
    portal: str, world: Any, nodes: Any, tmp_path: Path
) -> None:
    c = world.client("a_member")
    r = c.post(
        "/api/v1/instances/",
        {"name": "mover", "image": "tiny:1", "flavor": world.flavor_public.pk, "kind": "vm"},
        format="json",
    )
    assert r.status_code == 202, r.content
    nodes.run()
    inst = Instance.objects.get(pk=r.json()["id"])
    assert inst.vm_state == "active" and inst.node is not None
    driver = nodes.service(inst.node.queue).driver(Kind.VM)
    image = Image.objects.create(owner=world.a, name="migrate-mover", version="1", source_instance=inst)
    url = f"{portal}/api/v1/blobs/uploads/{image.pk}"

    with pytest.raises(InvalidState, match="stop it before sending its disk"):
        migration.send_disk(driver, str(inst.pk), url, upload_token(image), tmp_path)
    stop = c.post(f"/api/v1/instances/{inst.pk}/actions/", {"action": "stop"}, format="json")
    assert stop.status_code == 202, stop.content
    nodes.run()

    sent = migration.send_disk(driver, str(inst.pk), url, upload_token(image), tmp_path)
    image.refresh_from_db()
    assert image.status == "active", image.status_reason
    artifact = image.artifact_for("vm")
    assert artifact is not None
    ref = artifact.ref()
    assert ref.digest == sent.digest and ref.location == f"{portal}/api/v1/blobs/{sent.digest}"
    assert list((tmp_path / "exports").iterdir()) == []

    spec = services.build_spec(Instance.objects.get(pk=inst.pk))
    target = migration.target_spec(spec, ref.location, sent.digest)
    assert (target.instance_id, target.networks) == (spec.instance_id, spec.networks)  # same id, MAC, address
    fetch.downloads.by_digest.clear()
    cached = ImageCache(tmp_path / "node-b" / "images").fetch(target.image)
    assert cached.stat().st_size == sent.size
    assert fetch.downloads.by_digest == {sent.digest: 1}  # over HTTP, with node-b's key, digest-checked
