"""Node tasks: idempotent on redelivery, every outcome reported as an Observation."""

from __future__ import annotations

import pathlib
import uuid
from typing import Any

import pytest

from compute.config import ConfigError, NodeConfig
from compute.drivers.base import DriverError
from compute.drivers.fake import FakeDriver
from compute.spec import (
    ImageFormat,
    ImageRef,
    InstanceSpec,
    Kind,
    NetworkAttachment,
    NetworkSegment,
    NodeReport,
    Observation,
    SpecError,
    to_json,
)
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
    assert report.tunnel_address == ""


def _nic(**kw: Any) -> NetworkAttachment:
    return NetworkAttachment(
        "acme/default", "skn-0123abcd", "198.19.224.10/24", "52:54:00:aa:bb:cc", mtu=1450, **kw
    )


def test_create_prepares_each_network_segment_with_its_tunnel(tmp_path: pathlib.Path) -> None:
    seen: list[NetworkSegment] = []
    cfg = NodeConfig("n1", tmp_path, "test:///default", "qemu", "crun", "memory://", "192.0.2.1")
    svc = NodeService(cfg, lambda n, p: None, {Kind.VM: FakeDriver(Kind.VM)}, prepare_bridge=seen.append)
    nic = _nic(host_address="198.19.224.11/24", vni=7, tunnel_local="192.0.2.1", tunnel_peers=("192.0.2.2",))
    spec = _spec() | {"networks": [to_json(nic)]}
    assert svc.create(spec, "a").ok
    assert seen == [
        NetworkSegment(
            "acme/default", "skn-0123abcd", 1450, "198.19.224.11/24", 7, "192.0.2.1", ("192.0.2.2",)
        )
    ]
    assert svc.report().tunnel_address == "192.0.2.1"


def test_ensure_network_validates_and_reports_failure_without_raising(tmp_path: pathlib.Path) -> None:
    seen: list[NetworkSegment] = []
    cfg = NodeConfig("n1", tmp_path, "test:///default", "qemu", "crun", "memory://")
    svc = NodeService(cfg, lambda n, p: None, {}, prepare_bridge=seen.append)
    seg = _nic(vni=7, tunnel_local="192.0.2.1", tunnel_peers=("192.0.2.2", "192.0.2.3")).segment
    assert svc.ensure_network(to_json(seg))
    assert seen == [seg]
    assert not svc.ensure_network(to_json(seg) | {"vni": 0})
    assert not svc.ensure_network(to_json(seg) | {"tunnel_peers": ["192.0.2.1"]})
    assert not svc.ensure_network(to_json(seg) | {"colour": "red"})
    assert len(seen) == 1

    def broken(seg: NetworkSegment) -> None:
        raise DriverError("no such bridge")

    assert not NodeService(cfg, lambda n, p: None, {}, prepare_bridge=broken).ensure_network(to_json(seg))


def test_tunnel_fields_are_validated_and_optional() -> None:
    assert _nic().segment.vni is None
    for bad, match in (
        ({"vni": 2**24}, "vni must be"),
        ({"vni": True}, "vni must be"),
        ({"tunnel_local": "192.0.2.1"}, "tunnel_local needs a vni"),
        ({"vni": 5, "tunnel_local": "nonsense"}, "must be an IPv4 address"),
        ({"vni": 5, "tunnel_peers": ("192.0.2.2",)}, "need a tunnel_local"),
        ({"vni": 5, "tunnel_local": "192.0.2.1", "tunnel_peers": ("192.0.2.1",)}, "own tunnel address"),
        ({"vni": 5, "tunnel_local": "192.0.2.1", "tunnel_peers": ("192.0.2.2",) * 2}, "distinct"),
    ):
        with pytest.raises(SpecError, match=match):
            _nic(**bad)
    # an old heartbeat without the field still parses; a bad address does not
    old = {"node": "n1", "queue": "node.n1", "vcpus": 1, "ram_mb": 64, "disk_gb": 1, "drivers": []}
    assert NodeReport.from_json(old).tunnel_address == ""
    with pytest.raises(SpecError, match="tunnel_address must be an IPv4"):
        NodeReport.from_json(old | {"tunnel_address": "node-1"})


def test_tunnel_address_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKYPORT_NODE_NAME", "n1")
    monkeypatch.delenv("SKYPORT_TUNNEL_ADDRESS", raising=False)
    assert NodeConfig.from_env().tunnel_address == ""
    monkeypatch.setenv("SKYPORT_TUNNEL_ADDRESS", " 198.19.0.11 ")
    assert NodeConfig.from_env().tunnel_address == "198.19.0.11"
    monkeypatch.setenv("SKYPORT_TUNNEL_ADDRESS", "eth0")
    with pytest.raises(ConfigError, match="SKYPORT_TUNNEL_ADDRESS='eth0'"):
        NodeConfig.from_env()


def test_every_node_setting_is_read_by_node_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKYPORT_NODE_NAME", "n1")
    monkeypatch.setenv("SKYPORT_HEARTBEAT_SECONDS", "2.5")
    monkeypatch.setenv("SKYPORT_BROKER_VISIBILITY_SECONDS", "40")
    monkeypatch.setenv("SKYPORT_NODE_KEY", " k3y ")
    monkeypatch.setenv("SKYPORT_NETWORK_LOCK", "/tmp/x.lock")
    cfg = NodeConfig.from_env()
    assert (cfg.heartbeat_seconds, cfg.visibility_timeout_seconds, cfg.node_key) == (2.5, 40.0, "k3y")
    assert str(cfg.network_lock) == "/tmp/x.lock"
    monkeypatch.setenv("SKYPORT_HEARTBEAT_SECONDS", "soon")
    with pytest.raises(ConfigError, match="SKYPORT_HEARTBEAT_SECONDS='soon'"):
        NodeConfig.from_env()
