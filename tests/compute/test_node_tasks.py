"""Node tasks: idempotent on redelivery, every outcome reported as an Observation."""

from __future__ import annotations

import pathlib
import uuid
from typing import Any

from compute.config import NodeConfig
from compute.drivers.fake import FakeDriver
from compute.spec import ImageFormat, ImageRef, InstanceSpec, Kind, Observation, to_json
from compute.tasks import NodeService


def _service(tmp_path: pathlib.Path) -> tuple[NodeService, list[tuple[str, dict[str, Any]]], FakeDriver]:
    sent: list[tuple[str, dict[str, Any]]] = []
    vm = FakeDriver(Kind.VM)
    cfg = NodeConfig("n1", tmp_path, "test:///default", "qemu", "crun", "memory://")
    return (
        NodeService(
            cfg, lambda n, p: sent.append((n, p)), {Kind.VM: vm, Kind.CONTAINER: FakeDriver(Kind.CONTAINER)}
        ),
        sent,
        vm,
    )


def _spec() -> dict[str, Any]:
    spec = InstanceSpec(
        instance_id=str(uuid.uuid4()),
        name="web",
        hostname="web",
        tenant="acme",
        kind=Kind.VM,
        vcpus=1,
        ram_mb=128,
        disk_gb=1,
        image=ImageRef("tiny", "1", ImageFormat.QCOW2, "sha256:" + "0" * 64, "/nonexistent"),
    )
    return to_json(spec)  # type: ignore[no-any-return]


def test_create_redelivered_spawns_once_and_reports_twice(tmp_path: pathlib.Path) -> None:
    svc, sent, vm = _service(tmp_path)
    spec = _spec()
    svc.create(spec, "act-1")
    svc.create(spec, "act-1")
    assert len(vm.workloads) == 1
    assert [n for n, _ in sent] == ["portal.observe", "portal.observe"]
    obs = Observation.from_json(sent[0][1])
    assert obs.ok and obs.power_state.value == "running" and obs.node == "n1" and obs.action_id == "act-1"


def test_invalid_spec_is_reported_not_raised(tmp_path: pathlib.Path) -> None:
    svc, _sent, _ = _service(tmp_path)
    bad = _spec() | {"vcpus": 0}
    obs = svc.create(bad, "act-2")
    assert not obs.ok and "invalid spec" in obs.message


def test_actions_and_delete_are_idempotent(tmp_path: pathlib.Path) -> None:
    svc, _sent, vm = _service(tmp_path)
    spec = _spec()
    iid = spec["instance_id"]
    svc.create(spec, "a")
    assert svc.action(iid, "vm", "stop", "b", {"timeout": 1}).power_state.value == "shutdown"
    assert svc.action(iid, "vm", "stop", "b", {"timeout": 1}).ok
    assert svc.action(iid, "vm", "reboot", "c").ok is False  # stopped: refused with a reason
    assert svc.action(iid, "vm", "start", "d").power_state.value == "running"
    assert svc.action(iid, "vm", "snapshot", "e", {"name": "s1"}).ok
    assert svc.action(iid, "vm", "format-disk", "f").message.startswith("unknown action")
    assert svc.delete(iid, "vm", "g").ok
    assert svc.delete(iid, "vm", "g").ok
    assert vm.workloads == {}
    assert not svc.action(iid, "vm", "start", "h").ok


def test_report_has_capacity_health_and_inventory(tmp_path: pathlib.Path) -> None:
    svc, sent, _ = _service(tmp_path)
    svc.create(_spec(), "a")
    report = svc.report()
    assert report.vcpus >= 1 and report.ram_mb > 0
    assert {k for k, ok, _ in report.drivers if ok} == {"vm", "container"}
    assert len(report.inventory) == 1
    assert sent[-1][0] == "portal.node_report"
