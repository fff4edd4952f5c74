"""Resize a stopped VM's flavor: quota and node capacity as a create, the node's report settles it."""

from __future__ import annotations

from typing import Any

import pytest

from compute.drivers.base import DriverError
from compute.spec import Kind
from portal.cloud.models import ComputeNode, Flavor, Instance
from portal.tenancy.models import Quota
from tests.portal.conftest import FakeNodes, World
from tests.portal.test_flow import _launch


def _stopped_vm(world: World, nodes: FakeNodes) -> tuple[Any, str]:
    inst = _launch(world, "a_member", "acme", "grow", image="tiny:1", kind="vm")
    nodes.run()
    c = world.client("a_member")
    r = c.post(f"/api/v1/instances/{inst['id']}/resize/", {"flavor": world.flavor_a.pk}, format="json")
    assert r.status_code == 409 and "while it is active" in r.json()["message"]
    assert (
        c.post(f"/api/v1/instances/{inst['id']}/actions/", {"action": "stop"}, format="json").status_code
        == 202
    )
    nodes.run()
    return inst, f"/api/v1/instances/{inst['id']}/resize/"


def test_resize_a_stopped_vm(world: World, nodes: FakeNodes, sent: list[Any]) -> None:
    inst, url = _stopped_vm(world, nodes)
    c = world.client("a_member")
    r = c.post(url, {"flavor": world.flavor_a.pk}, format="json")
    assert r.status_code == 202, r.json()
    got = r.json()
    assert (got["task_state"], got["vcpus"], got["ram_mb"], got["disk_gb"]) == ("resizing", 2, 512, 4)
    assert sent[-1][2][0]["params"] == {"vcpus": 2, "ram_mb": 512, "disk_gb": 4}
    nodes.run()
    got = c.get(f"/api/v1/instances/{inst['id']}/").json()
    assert (got["vm_state"], got["task_state"], got["flavor"]) == ("stopped", None, world.flavor_a.pk)
    driver = nodes.service("node.shared-1").driver(Kind.VM)
    assert driver.sizes[inst["id"]] == (2, 512, 4)  # type: ignore[attr-defined]
    assert Instance.objects.get(pk=inst["id"]).resize_from is None
    # smaller disk, same sizes, someone else's private flavor, bad input
    r = c.post(url, {"flavor": world.flavor_public.pk}, format="json")
    assert r.status_code == 409 and "disks only grow" in r.json()["message"]
    assert c.post(url, {"flavor": world.flavor_a.pk}, format="json").status_code == 409
    theirs = Flavor.objects.create(
        name="bob.x", vcpus=1, ram_mb=64, disk_gb=9, is_public=False, tenant=world.b
    )
    assert c.post(url, {"flavor": theirs.pk}, format="json").status_code == 400
    assert c.post(url, {"flavor": "big"}, format="json").status_code == 400
    assert world.client("b_admin").post(url, {"flavor": theirs.pk}, format="json").status_code == 404
    assert world.client("a_viewer").post(url, {"flavor": world.flavor_a.pk}, format="json").status_code == 403


def test_resize_checks_quota_and_capacity(world: World, nodes: FakeNodes) -> None:
    inst, url = _stopped_vm(world, nodes)
    c = world.client("a_member")
    Quota.objects.filter(tenant=world.a).update(ram_mb=256 + 128)  # web-1 and grow use 128 each
    r = c.post(url, {"flavor": world.flavor_a.pk}, format="json")
    assert r.status_code == 409 and r.json()["code"] == "quota_exceeded"
    assert "Quota exceeded for ram_mb" in r.json()["message"]
    Quota.objects.filter(tenant=world.a).update(ram_mb=40960)
    ComputeNode.objects.filter(name="shared-1").update(vcpus=2, cpu_allocation_ratio=1.0)
    r = c.post(url, {"flavor": world.flavor_a.pk}, format="json")
    assert r.status_code == 409 and "no room for this resize: not enough vCPUs" in r.json()["message"]
    got = Instance.objects.get(pk=inst["id"])
    assert (got.vcpus, got.task_state, got.resize_from) == (1, None, None)


def test_a_failed_resize_puts_the_old_sizes_back(
    world: World, nodes: FakeNodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    inst, url = _stopped_vm(world, nodes)
    driver = nodes.service("node.shared-1").driver(Kind.VM)

    def broken(*args: Any) -> Any:
        raise DriverError("qemu-img resize failed: no space left on device")

    monkeypatch.setattr(driver, "resize", broken)
    assert world.client("a_member").post(url, {"flavor": world.flavor_a.pk}, format="json").status_code == 202
    nodes.run()
    got = Instance.objects.get(pk=inst["id"])
    assert (got.vcpus, got.ram_mb, got.disk_gb, got.flavor_id) == (1, 128, 1, world.flavor_public.pk)
    assert (got.vm_state, got.task_state, got.resize_from) == ("stopped", None, None)
    assert "resize failed: qemu-img resize failed" in got.status_reason
