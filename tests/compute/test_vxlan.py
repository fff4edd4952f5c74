"""compute.network.vxlan inside network namespaces this test creates (root).

Two namespaces joined by a veth pair play two nodes on an underlay
(198.19.0.0/24 inside the namespaces only: nothing is added to the host's
own namespace).  Every name carries a per-run suffix; the namespaces (and
with them every device in them) are deleted at the end.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from compute import nsenv
from compute.network import bridge, vxlan
from compute.network.bridge import NetworkError
from tests.hostcaps import require_binary, require_root

pytestmark = [pytest.mark.host]

T = TypeVar("T")


def in_netns(ns: str, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` in a thread that has joined network namespace ``ns``."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                nsenv.setns(fd, nsenv.CLONE_NEWNET)
            finally:
                os.close(fd)
            result.append(fn(*args))
        except BaseException as exc:
            error.append(exc)

    t = threading.Thread(target=run, name=f"in-{ns}")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def ip(*args: str) -> str:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, f"ip {' '.join(args)}: {r.stderr}"
    return r.stdout


def run_in(ns: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=20)


def fdb_flood(ns: str, dev: str) -> set[str]:
    out = run_in(ns, "bridge", "fdb", "show", "dev", dev).stdout
    return {line.split(" dst ")[1].split()[0] for line in out.splitlines() if line.startswith(ALL0)}


ALL0 = "00:00:00:00:00:00"


@pytest.fixture
def two_nodes() -> Iterator[tuple[str, str]]:
    """Namespaces n1, n2 with underlay ul0 = 198.19.0.1/24 and .2/24 over one veth pair."""
    require_root()
    require_binary("ip")
    require_binary("bridge")
    tag = secrets.token_hex(3)
    n1, n2 = f"skvt-{tag}-1", f"skvt-{tag}-2"
    made: list[str] = []
    try:
        for ns in (n1, n2):
            ip("netns", "add", ns)
            made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", n1, "link", "add", "ul0", "type", "veth", "peer", "name", "ul0", "netns", n2)
        for i, ns in enumerate((n1, n2), start=1):
            ip("-n", ns, "addr", "add", f"198.19.0.{i}/24", "dev", "ul0")
            ip("-n", ns, "link", "set", "ul0", "up")
        yield n1, n2
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
    assert not any(ns in ip("netns", "list") for ns in (n1, n2))


def _tenant(ns: str, br: str, vni: int, local: str, host: str, mtu: int = 1450) -> int:
    def make() -> int:
        bridge.ensure_bridge(br, mtu, address=host)
        return vxlan.ensure_vxlan(vni, local, br, mtu)

    return in_netns(ns, make)


def test_device_has_vni_local_port_learning_mtu_and_bridge(two_nodes: tuple[str, str]) -> None:
    n1, _ = two_nodes
    idx = _tenant(n1, "sknt1", 4242, "198.19.0.1", "198.19.9.1/24")
    details = ip("-n", n1, "-d", "link", "show", "skx-4242")
    assert "vxlan id 4242" in details
    assert "local 198.19.0.1" in details
    assert "dstport 4789" in details
    assert "nolearning" not in details
    assert "mtu 1450" in details
    assert "master sknt1" in details
    assert "state UNKNOWN" in details or ",UP" in details
    # idempotent: the same device again
    assert _tenant(n1, "sknt1", 4242, "198.19.0.1", "198.19.9.1/24") == idx


def test_device_with_other_settings_is_replaced(two_nodes: tuple[str, str]) -> None:
    n1, _ = two_nodes
    in_netns(n1, bridge.ensure_bridge, "sknt1", 1450)
    ip("-n", n1, "link", "add", "skx-77", "type", "vxlan", "id", "78", "dstport", "4789", "nolearning")
    _tenant(n1, "sknt1", 77, "198.19.0.1", "198.19.9.1/24")
    details = ip("-n", n1, "-d", "link", "show", "skx-77")
    assert "vxlan id 77" in details and "local 198.19.0.1" in details and "nolearning" not in details


def test_clear_errors(two_nodes: tuple[str, str]) -> None:
    n1, _ = two_nodes
    in_netns(n1, bridge.ensure_bridge, "sknt1", 1450)
    with pytest.raises(NetworkError, match=r"tunnel address 198\.19\.0\.99 is not configured"):
        in_netns(n1, vxlan.ensure_vxlan, 5, "198.19.0.99", "sknt1", 1450)
    with pytest.raises(NetworkError, match=r"MTU 1500 is too large .* at most 1450"):
        in_netns(n1, vxlan.ensure_vxlan, 5, "198.19.0.1", "sknt1", 1500)
    with pytest.raises(NetworkError, match="bridge sknt-none does not exist"):
        in_netns(n1, vxlan.ensure_vxlan, 5, "198.19.0.1", "sknt-none", 1450)
    with pytest.raises(NetworkError, match="VNI must be"):
        vxlan.device_name(0)
    with pytest.raises(NetworkError, match="VNI must be"):
        vxlan.device_name(2**24)
    with pytest.raises(NetworkError, match="must be an IPv4 address"):
        in_netns(n1, vxlan.ensure_vxlan, 5, "fe80::1", "sknt1", 1450)
    with pytest.raises(NetworkError, match="does not exist; ensure it"):
        in_netns(n1, lambda: vxlan.set_peers(6, ["198.19.0.2"], prune=True))
    assert "skx-5" not in ip("-n", n1, "link", "show")


def test_set_peers_is_exact_and_idempotent_and_delete_is_too(two_nodes: tuple[str, str]) -> None:
    n1, _ = two_nodes
    _tenant(n1, "sknt1", 300, "198.19.0.1", "198.19.9.1/24")

    def peers(addresses: list[str], prune: bool) -> None:
        in_netns(n1, lambda: vxlan.set_peers(300, addresses, prune=prune))

    peers(["198.19.0.2", "198.19.0.3"], False)
    peers(["198.19.0.3", "198.19.0.2"], False)
    assert fdb_flood(n1, "skx-300") == {"198.19.0.2", "198.19.0.3"}
    assert in_netns(n1, vxlan.peers, 300) == ["198.19.0.2", "198.19.0.3"]
    peers(["198.19.0.4"], False)  # add-only: what the node does for each create and ensure
    assert fdb_flood(n1, "skx-300") == {"198.19.0.2", "198.19.0.3", "198.19.0.4"}
    peers(["198.19.0.4"], True)
    assert fdb_flood(n1, "skx-300") == {"198.19.0.4"}
    peers([], True)
    assert fdb_flood(n1, "skx-300") == set()
    in_netns(n1, vxlan.delete_vxlan, 300)
    in_netns(n1, vxlan.delete_vxlan, 300)
    assert "skx-300" not in ip("-n", n1, "link", "show")
    assert in_netns(n1, vxlan.peers, 300) == []


def _instance(node: str, br: str, ns: str, address: str, other_subnet: str) -> None:
    """A namespace on a veth into ``br`` of ``node``, like a container; ``other_subnet``
    is routed out of eth0 on-link, as a tenant trying to reach another network would."""
    ip("netns", "add", ns)
    ip("-n", node, "link", "add", f"v{ns[-2:]}", "type", "veth", "peer", "name", "eth0", "netns", ns)
    ip("-n", node, "link", "set", f"v{ns[-2:]}", "master", br, "mtu", "1450", "up")
    ip("-n", ns, "addr", "add", address, "dev", "eth0")
    ip("-n", ns, "link", "set", "eth0", "mtu", "1450", "up")
    ip("-n", ns, "route", "add", other_subnet, "dev", "eth0")


def test_same_vni_joins_bridges_across_nodes_other_vni_does_not(two_nodes: tuple[str, str]) -> None:
    require_binary("ping")
    n1, n2 = two_nodes
    # tenant A (VNI 10, 198.19.9.0/24) and tenant B (VNI 20, 198.19.10.0/24) on both nodes;
    # an A "instance" behind n1 and a B "instance" behind n2
    _tenant(n1, "skntA", 10, "198.19.0.1", "198.19.9.11/24")
    _tenant(n2, "skntA", 10, "198.19.0.2", "198.19.9.12/24")
    _tenant(n1, "skntB", 20, "198.19.0.1", "198.19.10.21/24")
    _tenant(n2, "skntB", 20, "198.19.0.2", "198.19.10.22/24")
    ia, ib = f"{n1}ia", f"{n2}ib"
    try:
        _instance(n1, "skntA", ia, "198.19.9.40/24", "198.19.10.0/24")
        _instance(n2, "skntB", ib, "198.19.10.30/24", "198.19.9.0/24")
        # without peers nothing is flooded: no reachability across nodes yet
        assert run_in(ia, "ping", "-c1", "-W1", "198.19.9.12").returncode != 0
        for ns, peer in ((n1, "198.19.0.2"), (n2, "198.19.0.1")):
            for vni in (10, 20):
                in_netns(ns, lambda vni=vni, peer=peer: vxlan.set_peers(vni, [peer], prune=False))
        for src, dst in ((ia, "198.19.9.12"), (ib, "198.19.10.21"), (n1, "198.19.9.12")):
            r = run_in(src, "ping", "-c2", "-W2", dst)
            assert r.returncode == 0, f"{src} -> {dst}: {r.stdout}{r.stderr}"
        # a full-size tenant frame (1450) crosses without fragmentation
        r = run_in(ia, "ping", "-c1", "-W2", "-M", "do", "-s", str(1450 - 28), "198.19.9.12")
        assert r.returncode == 0, r.stdout + r.stderr
        # the two segments stay apart, even with routes pointing the other way
        assert run_in(ia, "ping", "-c1", "-W1", "198.19.10.30").returncode != 0
        assert run_in(ib, "ping", "-c1", "-W1", "198.19.9.40").returncode != 0
        # MAC learning: n1 learnt a MAC behind n2's tunnel endpoint
        learnt = run_in(n1, "bridge", "fdb", "show", "dev", "skx-10").stdout
        assert any(" dst 198.19.0.2" in line and not line.startswith(ALL0) for line in learnt.splitlines()), (
            learnt
        )
    finally:
        for ns in (ia, ib):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def test_node_prepares_bridge_address_vxlan_and_adds_peers(two_nodes: tuple[str, str]) -> None:
    from compute.spec import NetworkSegment
    from compute.tasks import _prepare_bridge

    n1, _ = two_nodes
    # a bridge from single-node days, with the shared .1 on it
    in_netns(n1, lambda: bridge.ensure_bridge("sknt1", 1500, address="198.19.9.1/24"))
    seg = NetworkSegment("acme/default", "sknt1", 1450, "198.19.9.10/24", 9, "198.19.0.1", ("198.19.0.2",))
    in_netns(n1, _prepare_bridge, seg)
    addrs = ip("-n", n1, "-4", "addr", "show", "dev", "sknt1")
    assert "198.19.9.10/24" in addrs and "198.19.9.1/" not in addrs
    assert "mtu 1450" in ip("-n", n1, "link", "show", "sknt1")
    assert "master sknt1" in ip("-n", n1, "link", "show", "skx-9")
    later = NetworkSegment("acme/default", "sknt1", 1450, "198.19.9.10/24", 9, "198.19.0.1", ("198.19.0.3",))
    in_netns(n1, _prepare_bridge, later)
    in_netns(n1, _prepare_bridge, later)
    assert fdb_flood(n1, "skx-9") == {"198.19.0.2", "198.19.0.3"}
    # a segment without a tunnel address only gets the bridge
    in_netns(n1, _prepare_bridge, NetworkSegment("bob/default", "sknt2", 1450, "198.19.8.10/24"))
    assert "skx-" not in ip("-n", n1, "link", "show", "master", "sknt2")


def test_router_prunes_flood_entries_only_for_a_newer_peer_list(
    two_nodes: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node that left is dropped from the flood list; an older list never cuts off a newer peer."""
    from compute.config import NodeConfig
    from compute.network import hostlock, router
    from compute.spec import ImageFormat, ImageRef, InstanceSpec, Kind, NetworkAttachment, NetworkSegment

    n1, _ = two_nodes
    monkeypatch.setattr(hostlock, "LOCK_FILE", tmp_path / "net.lock")
    config = NodeConfig(
        name="vt",
        state_dir=tmp_path / "node",
        libvirt_uri="test:///default",
        accelerator="qemu",
        container_runtime="crun",
        broker_url="memory://",
        network_lock=tmp_path / "net.lock",
        nft_table=f"skvt{secrets.token_hex(3)}",
    )
    node = router.Router(config)

    def segment(serial: int, *peers: str) -> NetworkSegment:
        return NetworkSegment(
            "acme/default", "skvtp", 1450, "198.19.7.10/24", 77, "198.19.0.1", peers, peers_serial=serial
        )

    def ensure(serial: int, *peers: str) -> set[str]:
        in_netns(n1, node.ensure, segment(serial, *peers))
        return fdb_flood(n1, "skx-77")

    made: list[int] = []
    real = router.prepare_devices
    monkeypatch.setattr(
        router, "prepare_devices", lambda seg, **kw: (made.append(seg.peers_serial), real(seg, **kw))
    )

    def prepare(serial: int, *peers: str) -> set[str]:
        """What a create does: the devices only when they are not as the segment wants them."""
        image = ImageRef("busybox", "1", ImageFormat.OCI, "sha256:" + "0" * 64, "/nonexistent")
        nic = NetworkAttachment(segment(serial, *peers), "198.19.7.20/24", "02:5c:00:00:07:14")
        spec = InstanceSpec(str(uuid.uuid4()), "web", "web", "acme", Kind.CONTAINER, 1, 64, 0, image, (nic,))
        in_netns(n1, node.prepare, spec)
        return fdb_flood(n1, "skx-77")

    def held() -> tuple[str, ...]:
        return next(s.tunnel_peers for s in in_netns(n1, node.segments))

    try:
        assert ensure(1, "198.19.0.2", "198.19.0.3") == {"198.19.0.2", "198.19.0.3"}
        # .3 released the network: the portal's next list (serial 3) no longer names it
        assert ensure(3, "198.19.0.2") == {"198.19.0.2"}
        # a list from before (serial 2, handled late by the other worker process) only adds
        assert ensure(2, "198.19.0.4") == {"198.19.0.2", "198.19.0.4"}
        assert ensure(3, "198.19.0.2") == {"198.19.0.2", "198.19.0.4"}, "an equal serial does not prune"
        assert [s.peers_serial for s in in_netns(n1, node.segments)] == [3]
        assert ensure(4, "198.19.0.2") == {"198.19.0.2"}
        # serial 0 (an older portal) stays lazy
        assert ensure(0, "198.19.0.5") == {"198.19.0.2", "198.19.0.5"}
        # the stored segment names the flood list the tunnel holds, not the late list alone
        assert held() == ("198.19.0.2", "198.19.0.5")
        # a create whose list is the held one finds nothing to do, though the serial rose
        made.clear()
        assert prepare(5, "198.19.0.2", "198.19.0.5") == {"198.19.0.2", "198.19.0.5"}
        assert made == [], "same devices, same flood list: not prepared again"
        # a newer, shorter list prunes; an older, other list adds and the held list grows
        assert prepare(6, "198.19.0.2") == {"198.19.0.2"}
        assert prepare(5, "198.19.0.6") == {"198.19.0.2", "198.19.0.6"}
        assert held() == ("198.19.0.2", "198.19.0.6")
        assert made == [6, 5]
        assert [s.peers_serial for s in in_netns(n1, node.segments)] == [6]
    finally:
        in_netns(n1, node.teardown)
    assert "skx-77" not in ip("-n", n1, "link", "show")
