"""Node tasks: idempotent on redelivery, every outcome reported as an Observation."""

from __future__ import annotations

import hashlib
import json
import pathlib
import time
import uuid
from typing import Any

import pytest

from compute.config import ConfigError, NodeConfig
from compute.drivers.base import DriverError
from compute.drivers.fake import REAL_CAPABILITIES, FakeDriver
from compute.spec import (
    INSTANCE_ACTIONS,
    MESSAGES,
    NODE_TASKS,
    SPEC_VERSION,
    Action,
    Capability,
    ConsoleMode,
    ConsoleOpen,
    ConsoleRequest,
    ConsoleTail,
    CreateInstance,
    DeleteInstance,
    Direction,
    DriverStatus,
    ExecRequest,
    Forward,
    ImageFormat,
    ImageRef,
    InstanceAction,
    InstanceForwards,
    InstanceSecurity,
    InstanceSpec,
    InventoryItem,
    Kind,
    LogsRequest,
    NetworkAttachment,
    NetworkSegment,
    NodeReport,
    Observation,
    PowerState,
    Protocol,
    ReleaseNetwork,
    SecurityBatch,
    SecurityRule,
    SendDisk,
    SnapshotInfo,
    SpecError,
    Task,
    VolumeObservation,
    VolumeOp,
    VolumeProgress,
    VolumeRequest,
    from_json,
    stored_spec,
    to_json,
)
from compute.tasks import _ACTIONS, NodeService
from tests.hostcaps import require_binary


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


def _create(spec: dict[str, Any], action_id: str) -> dict[str, Any]:
    return {"spec": spec, "action_id": action_id}


def _act(iid: str, action: str, action_id: str, **params: Any) -> dict[str, Any]:
    return {"instance_id": iid, "kind": "vm", "action": action, "action_id": action_id, "params": params}


def test_create_redelivered_spawns_once_and_reports_twice(tmp_path: pathlib.Path) -> None:
    svc, sent, vm = _service(tmp_path)
    spec = _spec()
    svc.handle(Task.CREATE, _create(spec, "act-1"))
    svc.handle(Task.CREATE, _create(spec, "act-1"))
    assert len(vm.workloads) == 1
    assert [n for n, _ in sent] == [Task.OBSERVE, Task.OBSERVE]
    obs = from_json(Observation, sent[0][1])
    assert obs.ok and obs.power_state.value == "running" and obs.node == "n1" and obs.action_id == "act-1"
    assert obs.action is Action.CREATE


def test_invalid_spec_is_reported_not_raised(tmp_path: pathlib.Path) -> None:
    svc, _sent, _ = _service(tmp_path)
    bad = _spec() | {"vcpus": 0}
    obs = svc.handle(Task.CREATE, _create(bad, "act-2"))
    assert not obs.ok and "invalid compute.instance.create" in obs.message and obs.action_id == "act-2"
    assert obs.instance_id == bad["instance_id"]


def test_send_disk_uploads_a_stopped_vm_and_reports_its_digest(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The migration's source half as a node task: refused while running, then the digest comes back."""
    from compute import fetch

    require_binary("qemu-img")
    got: list[tuple[str, str, bytes]] = []
    monkeypatch.setattr(
        fetch, "upload", lambda url, token, path, timeout=0: got.append((url, token, path.read_bytes()))
    )
    svc, sent, vm = _service(tmp_path)
    spec = _spec()
    iid = spec["instance_id"]
    svc.handle(Task.CREATE, _create(spec, "a"))
    msg = {"instance_id": iid, "action_id": "m1", "upload_url": "http://portal/u/7", "upload_token": "tok"}
    refused = svc.handle(Task.SEND_DISK, msg)
    assert (refused.ok, refused.action, refused.power_state.value) == (False, Action.SEND_DISK, "running")
    assert "stop it before sending its disk" in refused.message and got == []
    # a guest that ignores the power button: a clean stop refuses instead of forcing it off
    vm.ignores_shutdown.add(iid)
    clean = svc.handle(Task.ACTION, _act(iid, "stop", "s0", timeout=1, clean=True))
    assert (clean.ok, clean.power_state.value) == (False, "running") and "left running" in clean.message
    vm.ignores_shutdown.clear()
    assert (
        svc.handle(Task.ACTION, _act(iid, "stop", "s1", timeout=1, clean=True)).power_state.value
        == "shutdown"
    )
    obs = svc.handle(Task.SEND_DISK, msg | {"action_id": "m2"})
    assert obs.ok and obs.power_state.value == "shutdown", obs.message
    details = dict(obs.details)
    assert [(u, t) for u, t, _ in got] == [("http://portal/u/7", "tok")]
    assert details["digest"] == "sha256:" + hashlib.sha256(got[0][2]).hexdigest()
    assert int(details["size"]) == len(got[0][2]) and float(details["upload_seconds"]) >= 0
    assert list((tmp_path / "exports").iterdir()) == []
    bad = svc.handle(Task.SEND_DISK, msg | {"action_id": "m3", "upload_url": "file:///etc/passwd"})
    assert (bad.ok, bad.action_id) == (False, "m3") and "http(s) URL" in bad.message
    assert from_json(Observation, sent[-1][1]) == bad


def test_actions_and_delete_are_idempotent(tmp_path: pathlib.Path) -> None:
    svc, sent, vm = _service(tmp_path)
    spec = _spec()
    iid = spec["instance_id"]
    svc.handle(Task.CREATE, _create(spec, "a"))
    assert svc.handle(Task.ACTION, _act(iid, "stop", "b", timeout=1)).power_state.value == "shutdown"
    assert svc.handle(Task.ACTION, _act(iid, "stop", "b", timeout=1)).ok
    assert svc.handle(Task.ACTION, _act(iid, "reboot", "c")).ok is False  # stopped: refused with a reason
    assert svc.handle(Task.ACTION, _act(iid, "start", "d")).power_state.value == "running"
    assert svc.handle(Task.ACTION, _act(iid, "snapshot", "e", name="s1")).ok
    missing = svc.handle(Task.ACTION, _act(iid, "snapshot", "e2"))
    assert not missing.ok and "snapshot needs params.name" in missing.message
    assert svc.handle(Task.ACTION, _act(iid, "delete_snapshot", "e3", name="s1")).ok
    before = len(sent)
    assert svc.handle(Task.ACTION, _act(iid, "format-disk", "f")) is None  # no such action: dropped, logged
    assert svc.handle(Task.ACTION, _act(iid, "delete", "f")).message.startswith("invalid")
    assert len(sent) == before + 1
    delete = {"instance_id": iid, "kind": "vm", "action_id": "g"}
    assert svc.handle(Task.DELETE, delete).ok
    assert svc.handle(Task.DELETE, delete).ok
    assert vm.workloads == {}
    assert not svc.handle(Task.ACTION, _act(iid, "start", "h")).ok


def test_the_node_runs_every_instance_action_of_the_contract() -> None:
    """Adding an Action without teaching the node how to run it fails here."""
    assert set(_ACTIONS) == INSTANCE_ACTIONS
    assert Action.CREATE not in INSTANCE_ACTIONS and Action.DELETE not in INSTANCE_ACTIONS


def test_an_unknown_task_is_dropped(tmp_path: pathlib.Path) -> None:
    svc, sent, _ = _service(tmp_path)
    assert svc.handle("compute.instance.format", {"instance_id": "x"}) is None
    assert sent == []


def test_report_has_capacity_health_capabilities_and_inventory(tmp_path: pathlib.Path) -> None:
    svc, sent, _ = _service(tmp_path)
    svc.handle(Task.CREATE, _create(_spec(), "a"))
    report = svc.report()
    assert report.vcpus >= 1 and report.ram_mb > 0
    assert {d.kind for d in report.drivers if d.ok} == {Kind.VM, Kind.CONTAINER}
    caps = {d.kind: d.capabilities for d in report.drivers}
    assert caps[Kind.VM] >= {Capability.SNAPSHOTS, Capability.PUBLISH}
    assert Capability.SNAPSHOTS not in caps[Kind.CONTAINER]
    assert len(report.inventory) == 1
    assert sent[-1][0] == Task.NODE_REPORT
    assert from_json(NodeReport, sent[-1][1]) == report
    assert report.tunnel_address == ""
    # the host's own use: load, CPU busy since the previous beat (none before the first), memory, disk
    assert report.host is not None and report.host.cpu_percent == 0.0
    assert 0 < report.host.mem_available_mb <= report.ram_mb
    assert 0 < report.host.disk_free_gb <= report.disk_gb + 1 and report.host.load1 >= 0
    busy_until = time.monotonic() + 0.3
    while time.monotonic() < busy_until:  # some CPU time between the two beats
        pass
    second = svc.report().host
    assert second is not None and 0 < second.cpu_percent <= 100


def test_fake_drivers_report_what_the_real_drivers_do() -> None:
    from compute.drivers.container import ContainerDriver
    from compute.drivers.vm import LibvirtDriver

    assert {
        Kind.VM: LibvirtDriver.capabilities,
        Kind.CONTAINER: ContainerDriver.capabilities,
    } == REAL_CAPABILITIES


def _nic(**kw: Any) -> NetworkAttachment:
    return NetworkAttachment(
        NetworkSegment("acme/default", "skn-0123abcd", 1450, **kw), "198.19.224.10/24", "52:54:00:aa:bb:cc"
    )


def test_create_prepares_each_network_segment_with_its_tunnel(tmp_path: pathlib.Path) -> None:
    seen: list[NetworkSegment] = []
    cfg = NodeConfig("n1", tmp_path, "test:///default", "qemu", "crun", "memory://", "192.0.2.1")
    svc = NodeService(cfg, lambda n, p: None, {Kind.VM: FakeDriver(Kind.VM)}, prepare_bridge=seen.append)
    nic = _nic(host_address="198.19.224.11/24", vni=7, tunnel_local="192.0.2.1", tunnel_peers=("192.0.2.2",))
    spec = _spec() | {"networks": [to_json(nic)]}
    assert svc.handle(Task.CREATE, _create(spec, "a")).ok
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
    assert svc.handle(Task.ENSURE_NETWORK, to_json(seg))
    assert seen == [seg]
    assert not svc.handle(Task.ENSURE_NETWORK, to_json(seg) | {"vni": 0})
    assert not svc.handle(Task.ENSURE_NETWORK, to_json(seg) | {"tunnel_peers": ["192.0.2.1"]})
    assert not svc.handle(Task.ENSURE_NETWORK, to_json(seg) | {"colour": "red"})
    assert len(seen) == 1

    def broken(seg: NetworkSegment) -> None:
        raise DriverError("no such bridge")

    assert not NodeService(cfg, lambda n, p: None, {}, prepare_bridge=broken).ensure_network(seg)


def test_release_network_is_validated_and_a_fake_node_without_a_router_keeps_it(
    tmp_path: pathlib.Path,
) -> None:
    cfg = NodeConfig("n1", tmp_path, "test:///default", "qemu", "crun", "memory://")
    svc = NodeService(cfg, lambda n, p: None, {}, prepare_bridge=lambda seg: None)
    good = to_json(ReleaseNetwork("acme/back", "skn-0123abcd", 3))
    assert svc.handle(Task.RELEASE_NETWORK, good) is False  # no router: nothing of its own to release
    for bad in (good | {"bridge": "a bridge name too long"}, good | {"vni": 0}, good | {"colour": "red"}):
        assert svc.handle(Task.RELEASE_NETWORK, bad) is None  # refused by the contract, logged


def test_every_message_round_trips_through_json() -> None:
    """One from_json for all: nested dataclasses, enums, tuples and frozensets come back equal."""
    spec = from_json(InstanceSpec, _spec() | {"networks": [to_json(_nic(vni=3))], "env": [["A", "b"]]})
    iid = spec.instance_id
    messages: list[Any] = [
        CreateInstance(spec, "a1"),
        InstanceAction(iid, Kind.VM, Action.STOP, "a2", {"timeout": 5, "force": True}),
        DeleteInstance(iid, Kind.CONTAINER, "a3"),
        ConsoleRequest(iid, Kind.VM, 100),
        ConsoleOpen(iid, Kind.CONTAINER, "hub-0001", ConsoleMode.EXEC, ("/bin/sh",)),
        ExecRequest(iid, Kind.CONTAINER, ("id",), "skyport:exec:1", 5.0, 100),
        LogsRequest(iid, Kind.CONTAINER, "skyport:logs:1", 10, "2026-12-06T01:20:00.5+01:00", "stderr", 2),
        _nic(vni=3, tunnel_local="192.0.2.1", tunnel_peers=("192.0.2.2",)).segment,
        ReleaseNetwork("acme/back", "skn-0123abcd", 3),
        Observation(iid, "n1", Action.REVERT, "a4", False, PowerState.PAUSED, "no", 1.5, (("k", "v"),)),
        ConsoleTail(iid, "n1", "boot\n", 2.0),
        InstanceForwards(iid, (Forward(Protocol.UDP, "198.18.129.1", 20000, "198.19.160.10", 53),)),
        InstanceSecurity(iid, (SecurityRule(Direction.INGRESS, "tcp", 80, 81, ("198.19.160.0/24",)),)),
        SecurityBatch(
            (InstanceSecurity(iid, (SecurityRule(Direction.EGRESS, "any", None, None, ("0.0.0.0/0",)),)),)
        ),
        NodeReport(
            "n1", "node.n1", 2, 64, 1, (DriverStatus(Kind.VM, True, "ok", frozenset(Capability)),),
            (InventoryItem(iid, Kind.VM, PowerState.RUNNING, 5, 6, (SnapshotInfo("s1", 1.5),)),),
            volumes=(iid,), attachments=((iid, iid),),
        ),
        Observation(
            iid, "n1", Action.SNAPSHOT, "a5", True, PowerState.RUNNING, snapshots=(SnapshotInfo("s", 2.0, 9),)
        ),
        VolumeRequest(iid, VolumeOp.ATTACH, "a6", instance_id=iid, kind=Kind.VM),
        VolumeObservation(iid, "n1", VolumeOp.ATTACH, "a6", True, target="vdc"),
        VolumeRequest(iid, VolumeOp.RECEIVE, "a7", blob_url="http://p/b", digest="sha256:" + "0" * 64),
        VolumeProgress(iid, "n1", "a7", VolumeOp.SEND, 5, 10),
        SendDisk(iid, "a7", "http://127.0.0.1:8000/api/v1/blobs/uploads/7", "tok"),
        VolumeRequest(iid, VolumeOp.REVERT, "a7", snapshot="s1"),
        VolumeObservation(iid, "n1", VolumeOp.SNAPSHOT, "a8", True, snapshots=(SnapshotInfo("s1", 3.0, 9),)),
    ]  # fmt: skip
    assert {type(m) for m in messages} == set(MESSAGES.values())
    for message in messages:
        wire = json.loads(json.dumps(to_json(message)))
        assert from_json(type(message), wire) == message
        assert MESSAGES[message.TASK] is type(message)


def test_from_json_refuses_what_the_contract_does_not_say() -> None:
    iid = _spec()["instance_id"]
    good = {"instance_id": iid, "kind": "vm", "action_id": "a"}
    for bad, match in (
        (good | {"colour": "red"}, "unknown fields"),
        (good | {"kind": "lxc"}, "not a valid Kind"),
        (good | {"action_id": 7}, "expected str"),
        (good | {"instance_id": "../etc"}, "lower-case UUID"),
        ([1, 2], "expected an object"),
    ):
        with pytest.raises(SpecError, match=match):
            from_json(DeleteInstance, bad)


def test_a_spec_stored_by_an_older_node_still_loads() -> None:
    """Version 1 specs (flat NIC fields) that containers kept on disk load as version 2."""
    nic = {
        "network": "acme/default",
        "bridge": "skn-1",
        "address": "198.19.0.10/24",
        "mac": "52:54:00:00:00:01",
    }
    old = _spec() | {"version": 1, "networks": [nic | {"mtu": 1450, "vni": 9}]}
    spec = stored_spec(old)
    assert spec.version == SPEC_VERSION and spec.networks[0].segment.vni == 9
    assert spec.networks[0].bridge == "skn-1" and spec.networks[0].address == "198.19.0.10/24"
    assert stored_spec(to_json(spec)) == spec


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
    assert from_json(NodeReport, old).tunnel_address == ""
    with pytest.raises(SpecError, match="tunnel_address must be an IPv4"):
        from_json(NodeReport, old | {"tunnel_address": "node-1"})


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


def test_the_worker_registers_every_node_task() -> None:
    from compute import worker

    assert set(NODE_TASKS) <= set(worker.app.tasks)
    for interactive in (Task.CONSOLE, Task.CONSOLE_OPEN, Task.EXEC, Task.LOGS):
        assert worker.app.tasks[interactive].acks_late is False
    assert worker.app.tasks[Task.CREATE].acks_late is True
    assert set(NODE_TASKS) == {
        Task.CREATE,
        Task.ACTION,
        Task.DELETE,
        Task.CONSOLE,
        Task.ENSURE_NETWORK,
        Task.RELEASE_NETWORK,
        Task.VOLUME,
        Task.CONSOLE_OPEN,
        Task.EXEC,
        Task.LOGS,
        Task.FORWARDS,
        Task.SECURITY,
        Task.SECURITY_BATCH,
        Task.SEND_DISK,
    }


def test_forwards_refuse_ports_out_of_range_and_duplicates() -> None:
    iid = _spec()["instance_id"]
    with pytest.raises(SpecError, match=r"external_port must be within 1\.\.65535"):
        Forward(Protocol.TCP, "198.18.129.1", 0, "198.19.160.10", 80)
    with pytest.raises(SpecError, match=r"port must be within 1\.\.65535"):
        Forward(Protocol.TCP, "198.18.129.1", 20000, "198.19.160.10", 65536)
    fwd = Forward(Protocol.TCP, "198.18.129.1", 20000, "198.19.160.10", 80)
    with pytest.raises(SpecError, match="published twice"):
        InstanceForwards(iid, (fwd, fwd))


def test_security_rules_refuse_what_cannot_be_enforced() -> None:
    with pytest.raises(SpecError, match="protocol must be one of"):
        SecurityRule(Direction.INGRESS, "sctp")
    with pytest.raises(SpecError, match="ports need tcp or udp"):
        SecurityRule(Direction.INGRESS, "icmp", 1, 2)
    with pytest.raises(SpecError, match="port_min and port_max go together"):
        SecurityRule(Direction.INGRESS, "tcp", 1, None)
    with pytest.raises(SpecError, match="1 <= min <= max <= 65535"):
        SecurityRule(Direction.INGRESS, "tcp", 90, 80)
    with pytest.raises(SpecError, match="remote must be IPv4 CIDRs"):
        SecurityRule(Direction.INGRESS, remote=("10.0.0.1/33",))
