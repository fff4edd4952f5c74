"""compute.network.router inside network namespaces this test creates (root): gateway, NAT, DNS, policy.

Topology (every name carries a per-run suffix; nothing touches the host's
own namespace, its sysctls or its uplink):

```
netns up:    upl0 198.18.128.1/30   python3 http.server :8080 (logs client addresses)
               │ veth
netns node:  upl0 198.18.128.2/30 (SKYPORT_UPLINK)   bridges A 198.19.160.0/24, B 198.19.161.0/24
               │ veth skc<id>0 (port security keyed by it)
netns inst:  eth0 198.19.160.10/24, default route via 198.19.160.1, resolv via 198.19.160.1
```

The Router runs in a thread that joined the node namespace, so its ``nft``,
``sysctl`` and ``dnsmasq`` act there.  The nftables table has a per-run name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from compute.config import NodeConfig
from compute.network import hostlock, nft, router
from compute.spec import (
    Direction,
    Forward,
    GroupMembers,
    ImageFormat,
    ImageRef,
    InstanceSpec,
    Kind,
    NetworkAttachment,
    NetworkSegment,
    Protocol,
    SecurityRule,
)
from tests.compute.test_vxlan import in_netns, ip
from tests.hostcaps import require_binary, require_root

pytestmark = [pytest.mark.host]

UP, NODE_UP = "198.18.128.1", "198.18.128.2"
EXTERNAL, CLIENT = "198.18.129.1", "198.18.129.2"
IID = "5c0ffee0-0000-4000-8000-000000000001"
MAC = "52:54:00:16:00:0a"


def sh(ns: str, *cmd: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=timeout)


class Lab:
    def __init__(self, tag: str, tmp: Path) -> None:
        self.up, self.node, self.inst = f"skrt-{tag}-u", f"skrt-{tag}-n", f"skrt-{tag}-i"
        self.outside = f"skrt-{tag}-o"
        self.table = f"skrt{tag}"
        self.config = NodeConfig(
            name="rt",
            state_dir=tmp / "node",
            libvirt_uri="test:///default",
            accelerator="qemu",
            container_runtime="crun",
            broker_url="memory://",
            network_lock=tmp / "net.lock",
            uplink="upl0",
            nft_table=self.table,
        )
        self.router = router.Router(self.config)
        self.server: subprocess.Popen[str] | None = None
        self.log = tmp / "http.log"

    def segment(
        self, net: int, *, egress: bool = True, hosts: tuple[tuple[str, str], ...] = ()
    ) -> NetworkSegment:
        return NetworkSegment(
            network=f"acme/n{net}",
            bridge=f"skrtb{net}",
            mtu=1450,
            host_address=f"198.19.{160 + net}.10/24",
            gateway=f"198.19.{160 + net}.1/24",
            egress=egress,
            hosts=hosts,
        )

    def spec(self) -> InstanceSpec:
        seg = self.segment(0)
        nic = NetworkAttachment(seg, "198.19.160.20/24", MAC, "198.19.160.1", ("198.19.160.1",))
        image = ImageRef("busybox", "1", ImageFormat.OCI, "sha256:" + "0" * 64, "/nonexistent")
        return InstanceSpec(IID, "web", "web", "acme", Kind.CONTAINER, 1, 64, 0, image, (nic,))

    def run(self, fn: object, *args: object) -> object:
        return in_netns(self.node, fn, *args)  # type: ignore[arg-type]


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    require_root()
    for binary in ("ip", "nft", "dnsmasq", "busybox", "curl"):
        require_binary(binary)
    monkeypatch.setattr(hostlock, "LOCK_FILE", tmp_path / "net.lock")
    tmp_path.chmod(0o755)
    lab = Lab(secrets.token_hex(3), tmp_path)
    made: list[str] = []
    try:
        for ns in (lab.up, lab.node, lab.inst, lab.outside):
            ip("netns", "add", ns)
            made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", lab.node, "link", "add", "upl0", "type", "veth", "peer", "name", "upl0", "netns", lab.up)
        ip("-n", lab.up, "addr", "add", f"{UP}/30", "dev", "upl0")
        ip("-n", lab.node, "addr", "add", f"{NODE_UP}/30", "dev", "upl0")
        for ns in (lab.up, lab.node):
            ip("-n", ns, "link", "set", "upl0", "up")
        # the LAN in front of the node: the node's external address 198.18.129.1, a client at .2
        ip(
            "-n",
            lab.node,
            "link",
            "add",
            "ext0",
            "type",
            "veth",
            "peer",
            "name",
            "lan0",
            "netns",
            lab.outside,
        )
        ip("-n", lab.node, "addr", "add", f"{EXTERNAL}/24", "dev", "ext0")
        ip("-n", lab.outside, "addr", "add", f"{CLIENT}/24", "dev", "lan0")
        ip("-n", lab.node, "link", "set", "ext0", "up")
        ip("-n", lab.outside, "link", "set", "lan0", "up")
        lab.server = subprocess.Popen(
            ["ip", "netns", "exec", lab.up, "python3", "-m", "http.server", "-b", UP, "8080"],
            stdout=subprocess.DEVNULL,
            stderr=lab.log.open("w"),
            text=True,
        )
        yield lab
    finally:
        for pid in list(lab.router.resolver_pids()) if lab.router.root.exists() else []:
            subprocess.run(["kill", str(pid)], capture_output=True)
        if lab.server is not None:
            lab.server.terminate()
            lab.server.wait(10)
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
    assert not any(ns in ip("netns", "list") for ns in made)


def wire_instance(lab: Lab, mac: str = MAC, address: str = "198.19.160.20/24") -> None:
    host = router.nic_ifname(Kind.CONTAINER, IID, 0)
    ip("-n", lab.node, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", lab.inst)
    ip("-n", lab.node, "link", "set", host, "master", "skrtb0", "mtu", "1450", "up")
    ip("-n", lab.inst, "link", "set", "eth0", "address", mac, "mtu", "1450", "up")
    ip("-n", lab.inst, "addr", "add", address, "dev", "eth0")
    ip("-n", lab.inst, "route", "add", "default", "via", "198.19.160.1")


@contextlib.contextmanager
def neighbour_ns(lab: Lab) -> Iterator[str]:
    """A second "instance" at 198.19.160.21 on bridge skrtb0, with no recorded NIC (no port security,
    no security group of its own): its netns name, deleted afterwards."""
    other = f"{lab.inst}2"
    ip("netns", "add", other)
    try:
        ip("-n", lab.node, "link", "add", "skcpeer0", "type", "veth", "peer", "name", "eth0", "netns", other)
        ip("-n", lab.node, "link", "set", "skcpeer0", "master", "skrtb0", "mtu", "1450", "up")
        ip("-n", other, "addr", "add", "198.19.160.21/24", "dev", "eth0")
        ip("-n", other, "link", "set", "eth0", "mtu", "1450", "up")
        ip("-n", other, "link", "set", "lo", "up")
        yield other
    finally:
        subprocess.run(["ip", "netns", "del", other], capture_output=True, timeout=10)


def fetch(lab: Lab) -> bool:
    return sh(lab.inst, "curl", "-sf", "-m", "2", "-o", "/dev/null", f"http://{UP}:8080/").returncode == 0


def ping(lab: Lab, address: str) -> bool:
    return sh(lab.inst, "ping", "-c", "1", "-W", "1", address).returncode == 0


def wait_server(lab: Lab) -> None:
    for _ in range(100):
        if sh(lab.up, "curl", "-sf", "-m", "1", "-o", "/dev/null", f"http://{UP}:8080/").returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError("the upstream HTTP server did not start")


def test_gateway_nat_dns_and_no_cross_network_reach(lab: Lab) -> None:
    wait_server(lab)
    seg = lab.segment(0, hosts=(("web", "198.19.160.20"), ("db", "198.19.160.21")))
    lab.run(lab.router.ensure, seg)
    lab.run(lab.router.ensure, seg)  # idempotent
    lab.run(lab.router.ensure, lab.segment(1))
    lab.run(lab.router.attach, lab.spec())
    wire_instance(lab)

    addrs = ip("-n", lab.node, "-4", "-o", "addr", "show", "dev", "skrtb0")
    assert "198.19.160.10/24" in addrs and "198.19.160.1/24" in addrs
    assert addrs.index("198.19.160.10/24") < addrs.index("198.19.160.1/24"), "host address stays primary"
    forwarding = sh(
        lab.node,
        "cat",
        "/proc/sys/net/ipv4/conf/skrtb0/forwarding",
        "/proc/sys/net/ipv4/conf/upl0/forwarding",
    )
    assert forwarding.stdout.split() == ["1", "1"]
    assert sh(lab.node, "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "0", (
        "never the global switch"
    )

    # egress through masquerade: the upstream sees the node's uplink address, never the tenant's
    assert ping(lab, "198.19.160.1")
    assert fetch(lab)
    assert f"{NODE_UP} - - " in lab.log.read_text()
    assert "198.19.160.20" not in lab.log.read_text()
    # the upstream has no route back to the tenant subnet: only NAT made that work
    assert "198.19.160" not in ip("-n", lab.up, "route")

    # DNS on the gateway: the network's instance names
    answer = sh(lab.inst, "busybox", "nslookup", "db", "198.19.160.1")
    assert answer.returncode == 0 and "198.19.160.21" in answer.stdout, answer.stdout + answer.stderr

    # the node's addresses on network B are not reachable from network A, even routed on-link
    ip("-n", lab.inst, "route", "add", "198.19.161.0/24", "dev", "eth0")
    assert not ping(lab, "198.19.161.10")
    assert not ping(lab, "198.19.161.1")
    # and nothing is routed into network B either
    ip("-n", lab.inst, "route", "del", "198.19.161.0/24", "dev", "eth0")
    assert not ping(lab, "198.19.161.10")

    # egress off for the network: no way out, the gateway and DNS still answer
    lab.run(lab.router.ensure, lab.segment(0, egress=False, hosts=seg.hosts))
    assert not fetch(lab)
    assert ping(lab, "198.19.160.1")
    lab.run(lab.router.ensure, seg)
    assert fetch(lab)

    # the rules live only in our own tables, and a change from outside is reported as drift
    listing = lab.run(nft.listing, "inet", lab.table)
    assert listing is not None and "masquerade" in json.dumps(listing)
    assert lab.run(lab.router.drift) == ""  # the first heartbeat after a load takes the fingerprint
    assert lab.run(lab.router.drift) == ""
    assert sh(lab.node, "nft", "add", "rule", "inet", lab.table, "input", "accept").returncode == 0
    assert "changed outside Skyport" in str(lab.run(lab.router.drift))
    lab.run(lab.router.converge)
    assert lab.run(lab.router.drift) == ""
    assert lab.run(lab.router.drift) == ""

    # teardown: resolvers, rules, devices gone
    pids = list(lab.router.resolver_pids())
    assert pids
    lab.run(lab.router.teardown)
    assert lab.run(nft.listing, "inet", lab.table) is None
    assert lab.run(nft.listing, "bridge", lab.table) is None
    assert "skrtb" not in ip("-n", lab.node, "link", "show")
    assert all(router._cmdline(pid) == [] for pid in pids), "resolvers stopped (gone or a zombie for init)"


def test_port_security_drops_spoofed_ip_and_mac(lab: Lab) -> None:
    lab.run(lab.router.ensure, lab.segment(0))
    lab.run(lab.router.attach, lab.spec())
    wire_instance(lab)
    assert ping(lab, "198.19.160.1")
    # another address on the same NIC: its packets are dropped
    ip("-n", lab.inst, "addr", "flush", "dev", "eth0")
    ip("-n", lab.inst, "addr", "add", "198.19.160.66/24", "dev", "eth0")
    ip("-n", lab.inst, "route", "add", "default", "via", "198.19.160.1")
    assert not ping(lab, "198.19.160.1")
    # the right address but another MAC
    ip("-n", lab.inst, "addr", "flush", "dev", "eth0")
    ip("-n", lab.inst, "link", "set", "eth0", "address", "52:54:00:16:00:99")
    ip("-n", lab.inst, "addr", "add", "198.19.160.20/24", "dev", "eth0")
    ip("-n", lab.inst, "route", "add", "default", "via", "198.19.160.1")
    assert not ping(lab, "198.19.160.1")
    # back to its own MAC: through again; detaching removes its entries
    ip("-n", lab.inst, "link", "set", "eth0", "address", MAC)
    sh(lab.inst, "ip", "neigh", "flush", "all")
    assert ping(lab, "198.19.160.1")
    lab.run(lab.router.detach, IID)
    listing = json.dumps(lab.run(nft.listing, "bridge", lab.table))
    assert MAC not in listing
    lab.run(lab.router.teardown)


def test_a_refused_transaction_changes_nothing(lab: Lab) -> None:
    lab.run(lab.router.ensure, lab.segment(0))
    before = lab.run(nft.fingerprint, "inet", lab.table)
    broken = nft.Table("inet", lab.table, rules=(nft.Rule("nochain", (nft.ACCEPT,)),))
    with pytest.raises(nft.NftError):
        lab.run(nft.apply, [broken])
    assert lab.run(nft.fingerprint, "inet", lab.table) == before
    lab.run(lab.router.teardown)


def test_published_ports_reach_the_instance_from_outside_and_go_away(lab: Lab) -> None:
    lab.run(lab.router.ensure, lab.segment(0))
    lab.run(lab.router.attach, lab.spec())
    wire_instance(lab)
    web = subprocess.Popen(
        ["ip", "netns", "exec", lab.inst, "python3", "-m", "http.server", "-b", "198.19.160.20", "8000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def get() -> bool:
            url = f"http://{EXTERNAL}:20080/"
            return sh(lab.outside, "curl", "-sf", "-m", "2", "-o", "/dev/null", url).returncode == 0

        for _ in range(50):
            if (
                sh(
                    lab.inst, "curl", "-sf", "-m", "1", "-o", "/dev/null", "http://198.19.160.20:8000/"
                ).returncode
                == 0
            ):
                break
            time.sleep(0.1)
        assert not get(), "nothing is published yet"
        forward = Forward(Protocol.TCP, EXTERNAL, 20080, "198.19.160.20", 8000)
        lab.run(lab.router.set_forwards, IID, [forward])
        assert get()
        assert sh(lab.node, "cat", "/proc/sys/net/ipv4/conf/ext0/forwarding").stdout.strip() == "1"
        # the outside is never routed into the tenant network directly, only through the published port
        ip("-n", lab.outside, "route", "add", "198.19.160.0/24", "via", EXTERNAL)
        assert (
            sh(
                lab.outside, "curl", "-sf", "-m", "2", "-o", "/dev/null", "http://198.19.160.20:8000/"
            ).returncode
            != 0
        )
        assert '"dnat": {' in json.dumps(lab.run(nft.listing, "inet", lab.table))
        lab.run(lab.router.set_forwards, IID, [])
        assert not get()
        assert '"dnat": {' not in json.dumps(lab.run(nft.listing, "inet", lab.table))
        lab.run(lab.router.set_forwards, IID, [forward])
        assert get()
        lab.run(lab.router.detach, IID)  # the instance is deleted
        assert not get()
        assert "198.19.160.20" not in json.dumps(lab.run(nft.listing, "inet", lab.table))
        with pytest.raises(router.RouterError, match=r"198\.18\.129\.99 is not configured on this node"):
            lab.run(
                lab.router.set_forwards, IID, [Forward(Protocol.TCP, "198.18.129.99", 1, "198.19.160.20", 1)]
            )
    finally:
        web.terminate()
        web.wait(10)
    lab.run(lab.router.teardown)


def test_security_groups_change_live_on_the_running_instance(lab: Lab) -> None:
    """Ingress: only listed ports and remotes; a rule added opens at once, removed closes at once."""
    lab.run(lab.router.ensure, lab.segment(0))
    egress_all = SecurityRule(Direction.EGRESS)
    only_ssh = (egress_all, SecurityRule(Direction.INGRESS, "tcp", 22, 22))
    spec = dataclasses.replace(lab.spec(), security=only_ssh)
    lab.run(lab.router.attach, spec)
    wire_instance(lab)
    # a second "instance" on the same bridge, not a member of the first one's group
    with neighbour_ns(lab) as other:
        web = subprocess.Popen(
            ["ip", "netns", "exec", lab.inst, "python3", "-m", "http.server", "-b", "198.19.160.20", "8000"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            lab.run(
                lab.router.set_forwards, IID, [Forward(Protocol.TCP, EXTERNAL, 20080, "198.19.160.20", 8000)]
            )

            def outside() -> bool:
                url = f"http://{EXTERNAL}:20080/"
                return sh(lab.outside, "curl", "-sf", "-m", "2", "-o", "/dev/null", url).returncode == 0

            def neighbour() -> bool:
                url = "http://198.19.160.20:8000/"
                return sh(other, "curl", "-sf", "-m", "2", "-o", "/dev/null", url).returncode == 0

            for _ in range(50):
                if (
                    sh(
                        lab.inst, "curl", "-sf", "-m", "1", "-o", "/dev/null", "http://198.19.160.20:8000/"
                    ).returncode
                    == 0
                ):
                    break
                time.sleep(0.1)
            assert not outside() and not neighbour(), "8000 is not listed"
            assert fetch(lab), "egress and its replies pass"

            open_8000 = SecurityRule(Direction.INGRESS, "tcp", 8000, 8000)
            started = time.monotonic()
            lab.run(lab.router.set_security, IID, (*only_ssh, open_8000))
            assert outside() and neighbour()
            assert time.monotonic() - started < 5

            # only from the group's members (a remote group resolves to their addresses)
            group_only = SecurityRule(Direction.INGRESS, "tcp", 8000, 8000, ("198.19.160.22/32",))
            lab.run(lab.router.set_security, IID, (egress_all, group_only))
            assert not neighbour() and not outside()
            lab.run(
                lab.router.set_security,
                IID,
                (egress_all, dataclasses.replace(group_only, remote=("198.19.160.21/32",))),
            )
            assert neighbour() and not outside()

            lab.run(lab.router.set_security, IID, only_ssh)
            assert not outside() and not neighbour()
            # no egress rule: the instance cannot even reach upstream
            lab.run(lab.router.set_security, IID, ())
            assert not fetch(lab)
        finally:
            web.terminate()
            web.wait(10)
    lab.run(lab.router.teardown)


def test_a_subnet_that_collides_with_a_host_route_is_refused_with_the_reason(lab: Lab) -> None:
    """A stale bridge of another portal with the same subnet shadowed the new one's route once."""
    ip("-n", lab.node, "link", "add", "skn-stale", "type", "bridge")
    ip("-n", lab.node, "addr", "add", "198.19.160.99/25", "dev", "skn-stale")
    ip("-n", lab.node, "link", "set", "skn-stale", "up")
    with pytest.raises(
        router.RouterError, match=r"collides with the route to 198\.19\.160\.0/25 via skn-stale"
    ):
        lab.run(lab.router.ensure, lab.segment(0))
    assert "skrtb0" not in ip("-n", lab.node, "link", "show"), "nothing half-made"
    ip("-n", lab.node, "link", "del", "skn-stale")
    lab.run(lab.router.ensure, lab.segment(0))
    lab.run(lab.router.ensure, lab.segment(0))  # its own route is no collision
    lab.run(lab.router.teardown)


def test_a_new_host_address_keeps_the_gateway(lab: Lab) -> None:
    """Deleting the old primary address takes its secondaries (the gateway) with it: it is added back."""
    lab.run(lab.router.ensure, lab.segment(0))
    moved = dataclasses.replace(lab.segment(0), host_address="198.19.160.30/24")
    lab.run(lab.router.ensure, moved)
    addrs = ip("-n", lab.node, "-4", "-o", "addr", "show", "dev", "skrtb0")
    assert "198.19.160.30/24" in addrs and "198.19.160.1/24" in addrs and "198.19.160.10/" not in addrs
    lab.run(lab.router.teardown)


def test_a_network_no_instance_uses_is_released_after_the_grace(lab: Lab) -> None:
    """Node clean-up (issue 19): a network's bridge, resolver and rules go once no instance here uses it."""
    lab.run(lab.router.ensure, lab.segment(0))
    lab.run(lab.router.ensure, lab.segment(1))
    lab.run(lab.router.attach, lab.spec())  # an instance (running or stopped) on network 0
    pids = list(lab.router.resolver_pids())
    assert len(pids) == 2
    assert lab.run(lab.router.release_idle, 300.0) == [], "both were ensured just now"
    later = time.time() + 301
    assert [s.network for s in lab.run(lab.router.idle, 300.0, later)] == ["acme/n1"]  # type: ignore[attr-defined]
    assert "198.19.161." in json.dumps(lab.run(nft.listing, "inet", lab.table))

    assert lab.run(lab.router.release_idle, 0.0) == ["acme/n1"]
    links = ip("-n", lab.node, "link", "show")
    assert "skrtb1" not in links and "skrtb0" in links
    assert "198.19.161." not in json.dumps(lab.run(nft.listing, "inet", lab.table))
    assert sum(router._cmdline(pid) != [] for pid in pids) == 1, "network 1's resolver stopped"

    # a port the node has no record of keeps the network: a workload is never cut off
    lab.run(lab.router.detach, IID)
    wire_instance(lab)
    assert lab.run(lab.router.release_idle, 0.0) == []
    ip("-n", lab.node, "link", "del", router.nic_ifname(Kind.CONTAINER, IID, 0))
    assert lab.run(lab.router.release_idle, 0.0) == ["acme/n0"]
    assert "skrtb" not in ip("-n", lab.node, "link", "show")
    assert all(router._cmdline(pid) == [] for pid in pids), "resolvers stopped (gone or a zombie for init)"
    assert lab.run(lab.router.segments) == []

    # the next create on it makes it again
    lab.run(lab.router.ensure, lab.segment(0))
    assert "skrtb0" in ip("-n", lab.node, "link", "show")
    lab.run(lab.router.teardown)


def test_an_older_security_version_run_late_is_ignored(lab: Lab) -> None:
    """Two changes' batches run out of order: the newer rules stay, in the files and in the kernel."""
    lab.run(lab.router.ensure, lab.segment(0))
    web = (SecurityRule(Direction.EGRESS), SecurityRule(Direction.INGRESS, "tcp", 8080, 8080))
    ssh = (SecurityRule(Direction.EGRESS), SecurityRule(Direction.INGRESS, "tcp", 2222, 2222))
    lab.run(lab.router.attach, dataclasses.replace(lab.spec(), security=ssh, security_version=3))
    ifname = router.nic_ifname(Kind.CONTAINER, IID, 0)

    def enforced() -> str:
        listing = json.dumps(lab.run(nft.listing, "bridge", lab.table))
        return "8080" if "8080" in listing else "2222" if "2222" in listing else "none"

    assert enforced() == "2222"
    assert lab.run(lab.router.set_security_many, {IID: web}, {IID: 5}) == []
    assert (lab.router.security()[ifname], enforced()) == (web, "8080")
    # version 4 was resolved before 5 committed; it runs late and is ignored
    assert lab.run(lab.router.set_security_many, {IID: ssh}, {IID: 4}) == [IID]
    assert (lab.router.security()[ifname], enforced()) == (web, "8080")
    # the same version again (a redelivery) and unversioned messages apply
    assert lab.run(lab.router.set_security_many, {IID: web}, {IID: 5}) == []
    assert lab.run(lab.router.set_security_many, {IID: ssh}) == []
    assert enforced() == "2222"
    # a create spec older than the applied rules does not roll them back either
    lab.run(lab.router.set_security_many, {IID: web}, {IID: 7})
    lab.run(lab.router.attach, dataclasses.replace(lab.spec(), security=ssh, security_version=6))
    assert enforced() == "8080"
    lab.run(lab.router.detach, IID)
    assert not list(lab.router.root.glob("**/security/*"))


def test_a_create_prepares_devices_once_and_leaves_dns_to_after_the_start(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prepare (a create): one rule load, devices only when missing or changed, resolvers afterwards."""
    made: list[str] = []
    real = router.prepare_devices
    monkeypatch.setattr(
        router, "prepare_devices", lambda seg, **kw: (made.append(seg.bridge), real(seg, **kw))
    )
    spec = lab.spec()
    named = dataclasses.replace(lab.segment(0), hosts=(("web", "198.19.160.20"),))
    spec = dataclasses.replace(spec, networks=(dataclasses.replace(spec.networks[0], segment=named),))
    assert [s.bridge for s in lab.run(lab.router.prepare, spec)] == ["skrtb0"]  # type: ignore[attr-defined]
    assert made == ["skrtb0"]
    assert "198.19.160.20" in json.dumps(lab.run(nft.listing, "bridge", lab.table)), "port security loaded"
    assert list(lab.router.resolver_pids()) == [], "DNS is not on the start's path"
    lab.run(lab.router.update_resolvers, [named])
    assert len(list(lab.router.resolver_pids())) == 1

    # another instance on the network: its name differs and the portal raised the peers' serial
    # (it does for every instance that joins); the devices are not made again
    more = dataclasses.replace(
        named, hosts=(*named.hosts, ("db", "198.19.160.21")), peers_serial=named.peers_serial + 1
    )
    again = dataclasses.replace(spec, networks=(dataclasses.replace(spec.networks[0], segment=more),))
    lab.run(lab.router.prepare, again)
    assert made == ["skrtb0"]
    # a changed device field, or a bridge gone from under the node, is prepared again
    moved = dataclasses.replace(more, host_address="198.19.160.30/24")
    lab.run(
        lab.router.prepare,
        dataclasses.replace(again, networks=(dataclasses.replace(again.networks[0], segment=moved),)),
    )
    ip("-n", lab.node, "link", "del", "skrtb0")
    lab.run(lab.router.prepare, again)
    assert made == ["skrtb0"] * 3
    assert "skrtb0" in ip("-n", lab.node, "link", "show")
    lab.run(lab.router.teardown)


def _normal(listing: object) -> list[str]:
    """A table as the kernel lists it, without handles and with set and map elements in order."""
    items = []
    for obj in listing["nftables"]:  # type: ignore[index]
        for kind, raw in obj.items():
            if kind == "metainfo":
                continue
            body = {k: v for k, v in raw.items() if k != "handle"}
            if "elem" in body:
                body["elem"] = sorted(json.dumps(e, sort_keys=True) for e in body["elem"])
            items.append(json.dumps({kind: body}, sort_keys=True))
    # rules keep their order within a chain; chains, sets and maps in any order
    rules = [i for i in items if i.startswith('{"rule"')]
    return sorted(i for i in items if not i.startswith('{"rule"')) + rules


@contextlib.contextmanager
def recorded_loads() -> Iterator[list[list[dict[str, object]]]]:
    """Each nftables load while inside: its commands, or ``[{"whole": None}]`` for a whole load."""
    loads: list[list[dict[str, object]]] = []
    real_run, real_apply = nft.run, nft.apply

    def run(cmds: list[dict[str, object]]) -> None:
        loads.append(cmds)
        real_run(cmds)

    def apply(tables: object) -> None:
        real_apply(tables)  # type: ignore[arg-type]  # through run() above
        loads.append([{"whole": None}])

    nft.run, nft.apply = run, apply  # type: ignore[assignment]
    try:
        yield loads
    finally:
        nft.run, nft.apply = real_run, real_apply  # type: ignore[assignment]


def test_per_nic_changes_give_the_tables_a_whole_load_gives(lab: Lab) -> None:
    """attach, rule changes, a new MAC, detach: loaded as per-NIC deltas, equal to loading whole."""
    lab.run(lab.router.ensure, lab.segment(0))
    ssh = (SecurityRule(Direction.EGRESS), SecurityRule(Direction.INGRESS, "tcp", 22, 22))
    web = (*ssh, SecurityRule(Direction.INGRESS, "tcp", 80, 80, ("198.19.0.0/16",)))
    first = dataclasses.replace(lab.spec(), security=ssh)
    second_id = "6c0ffee0-0000-4000-8000-000000000002"
    nic = dataclasses.replace(lab.spec().networks[0], address="198.19.160.21/24", mac="52:54:00:16:00:0b")
    second = dataclasses.replace(lab.spec(), instance_id=second_id, networks=(nic,), security=web)
    steps = [
        lambda: lab.router.attach(first),
        lambda: lab.router.attach(second),
        lambda: lab.router.set_security(IID, web),
        lambda: lab.router.set_security(second_id, ()),
        lambda: lab.router.attach(
            dataclasses.replace(
                first, networks=(dataclasses.replace(first.networks[0], mac="52:54:00:16:00:0c"),)
            )
        ),
        lambda: lab.router.detach(second_id),
    ]
    deltas: list[list[dict[str, object]]] = []
    with recorded_loads() as loads:
        for step in steps:
            lab.run(step)
            incremental = _normal(lab.run(nft.listing, "bridge", lab.table))
            assert loads and loads[-1] != [{"whole": None}], "a per-NIC change loaded the tables whole"
            deltas.append(loads[-1])
            lab.run(lab.router.converge)
            assert loads[-1] == [{"whole": None}]
            assert _normal(lab.run(nft.listing, "bridge", lab.table)) == incremental
    # each delta names only the instance it changes (its cost does not grow with the others)
    assert IID[:8] not in json.dumps(deltas[1]) + json.dumps(deltas[3])
    assert second_id[:8] not in json.dumps(deltas[2]) + json.dumps(deltas[4])
    assert "52:54:00:16:00:0c" in json.dumps(lab.run(nft.listing, "bridge", lab.table))

    # tables deleted behind the node's back: the next change finds its delta refused and loads whole
    lab.run(nft.delete, list(lab.router.desired()))
    lab.run(lab.router.attach, second)
    listing = json.dumps(lab.run(nft.listing, "bridge", lab.table))
    assert "52:54:00:16:00:0b" in listing and "52:54:00:16:00:0c" in listing
    assert json.dumps(lab.run(nft.listing, "inet", lab.table)) != "null", "the inet table is back too"
    lab.run(lab.router.teardown)


def group7_spec(lab: Lab) -> InstanceSpec:
    """The lab's instance with all egress and ingress from group 7 only, whose one member it is."""
    rules = (SecurityRule(Direction.EGRESS), SecurityRule(Direction.INGRESS, remote=(), remote_group="7"))
    return dataclasses.replace(
        lab.spec(),
        security=rules,
        security_version=1,
        security_members=(GroupMembers("7", ("198.19.160.20",), 1),),
    )


def test_a_group_whose_only_member_comes_and_goes_is_loaded_by_delta(lab: Lab) -> None:
    """A node running one container at a time: the group its rules name gets its set with the
    first member and loses it with the last, each as a delta equal to loading whole."""
    lab.run(lab.router.ensure, lab.segment(0))
    spec = group7_spec(lab)
    lab.run(lab.router.attach, dataclasses.replace(spec, security=()))  # a record to start from
    with recorded_loads() as loads:
        for step in (
            lambda: lab.router.detach(IID),
            lambda: lab.router.attach(spec),  # the set of group 7 appears
            lambda: lab.router.detach(IID),  # and goes
            lambda: lab.router.attach(spec),
        ):
            lab.run(step)
            assert loads[-1] != [{"whole": None}], f"loaded whole: {loads}"
            incremental = _normal(lab.run(nft.listing, "bridge", lab.table))
            lab.run(lab.router.converge)
            assert loads[-1] == [{"whole": None}]
            assert _normal(lab.run(nft.listing, "bridge", lab.table)) == incremental
    sets = [json.dumps(c) for load in loads for c in load if "set" in json.dumps(c)[:20]]
    assert any('"add": {"set"' in c and "grp_7" in c for c in sets), sets
    assert any('"delete": {"set"' in c and "grp_7" in c for c in sets), sets
    listing = json.dumps(lab.run(nft.listing, "bridge", lab.table))
    assert "grp_7" in listing and "198.19.160.20" in listing
    lab.run(lab.router.detach, IID)
    assert "grp_7" not in json.dumps(lab.run(nft.listing, "bridge", lab.table))
    lab.run(lab.router.teardown)


def test_a_remote_group_is_a_set_whose_members_change_without_touching_rules(lab: Lab) -> None:
    """Ingress from group 7 only: a neighbour gets through once it is a member, and not after;
    each membership change is one set element, loaded alone (no chain is rewritten)."""
    lab.run(lab.router.ensure, lab.segment(0))
    spec = group7_spec(lab)
    lab.run(lab.router.attach, spec)
    wire_instance(lab)
    with neighbour_ns(lab) as other:

        def neighbour() -> bool:
            return sh(other, "ping", "-c", "1", "-W", "1", "198.19.160.20").returncode == 0

        assert not neighbour(), "not a member"
        loads: list[list[dict[str, object]]] = []
        real = nft.run
        nft.run = lambda cmds: (loads.append(list(cmds)), real(cmds))[1]  # type: ignore[assignment]
        try:
            joined = GroupMembers("7", ("198.19.160.20", "198.19.160.21"), 2)
            assert lab.run(lab.router.set_security_many, {}, {}, [joined]) == []
            assert neighbour(), "a member now"
            # an older list run late is ignored; the newer one stays
            assert lab.run(lab.router.set_security_many, {}, {}, [GroupMembers("7", (), 1)]) == ["group:7"]
            assert neighbour()
            assert (
                lab.run(lab.router.set_security_many, {}, {}, [GroupMembers("7", ("198.19.160.20",), 3)])
                == []
            )
            assert not neighbour(), "left the group"
        finally:
            nft.run = real  # type: ignore[assignment]
        assert [list(c) for load in loads for c in load] == [
            ["add"],
            ["delete"],
        ], f"each change is one element of set grp_7: {loads}"
        assert all(c[verb]["element"]["name"] == "grp_7" for load in loads for c in load for verb in c)
    lab.run(lab.router.detach, IID)
    assert not list(lab.router.root.glob("groups/*")), "a group no rule names any more is forgotten"
    lab.run(lab.router.teardown)
