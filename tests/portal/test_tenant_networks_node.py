"""Two tenant networks made through the portal, one container with a NIC on each, on a real node.

The portal creates the networks and the instance (its real spec, only the
image swapped for the locally built busybox); a real ``NodeService`` (router:
bridges, gateways, resolvers, nftables in a per-run table; crun) runs it.
The test makes one namespace per network, plugged into that network's bridge,
and reaches the container's address on each from there, and each namespace
from inside the container.  Then the instance and one network are deleted:
the node releases the network (bridge and rules gone).  Nothing mocked on
the node; every link, namespace, table and container is removed at the end.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from compute.network import bridge as bridges
from compute.network import nft
from compute.spec import CreateInstance, DeleteInstance, Kind, ReleaseNetwork, Task, from_json, to_json
from compute.tasks import NodeService
from portal.cloud import networks, secgroups, services
from portal.cloud.models import ComputeNode, Instance
from portal.cloud.placement import Request
from portal.images.models import Image
from tests.compute.container_fixtures import driver, sample_images  # noqa: F401 -- fixtures by name
from tests.hostcaps import require_binary
from tests.portal.conftest import UP_BOTH, World

pytestmark = [pytest.mark.host]


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def run_in(ns: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=20)


def in_container(pid: int, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", "-t", str(pid), "-n", *cmd], capture_output=True, text=True, timeout=20)


@pytest.fixture
def probes() -> Iterator[list[str]]:
    """Namespaces the test plugs into the networks' bridges (removed with their veths at the end)."""
    require_binary("ip")
    require_binary("nsenter")
    made: list[str] = []
    try:
        yield made
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _probe(probes: list[str], bridge: str, address: str, prefix: int) -> str:
    ns = f"sktn-{secrets.token_hex(3)}"
    host = f"sktp{secrets.token_hex(3)}"
    ip("netns", "add", ns)
    probes.append(ns)
    ip("link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns)
    ip("link", "set", host, "master", bridge, "mtu", "1450", "up")
    ip("-n", ns, "link", "set", "eth0", "mtu", "1450", "up")
    ip("-n", ns, "link", "set", "lo", "up")
    ip("-n", ns, "addr", "add", f"{address}/{prefix}", "dev", "eth0")
    return ns


def _ping_from(ns: str, address: str) -> bool:
    return run_in(ns, "ping", "-c1", "-W2", address).returncode == 0


def test_a_container_with_two_nics_on_two_tenant_networks(
    world: World,
    sent: list[tuple[str, str, list[Any]]],
    driver: Any,  # noqa: F811
    sample_images: Any,  # noqa: F811
    probes: list[str],
) -> None:
    require_binary("nft")
    ComputeNode.objects.filter(name="node-a").update(
        status="up", vcpus=8, ram_mb=8192, disk_gb=100, drivers=UP_BOTH
    )
    front = networks.create_network(world.a, "front")
    back = networks.create_network(world.a, "back", prefix=26)
    pinger = secgroups.create_group(world.a, "pinger", "icmp from anyone")
    secgroups.add_rule(pinger, "ingress", "icmp")
    req = Request(
        tenant=world.a,
        name="duo",
        image=Image.objects.get(name="busybox"),
        flavor=world.flavor_public,
        requested_kind="container",
        security_groups=(secgroups.default_group(world.a), pinger),
        networks=(front, back),
    )
    inst = services.create_instance(req, None)
    assert inst.kind == "container" and inst.node is not None and inst.node.name == "node-a"
    (create,) = [from_json(CreateInstance, a[0]) for _, t, a in sent if t == Task.CREATE]
    # the portal's spec as sent; only the image is the locally built busybox (the world's is a stand-in)
    spec = dataclasses.replace(create.spec, image=sample_images.base, command=("sleep", "600"))
    table = f"sktn{secrets.token_hex(3)}"
    config = dataclasses.replace(driver.config, nft_table=table)
    observed: list[dict[str, Any]] = []
    node = NodeService(config, lambda task, payload: observed.append(payload), {Kind.CONTAINER: driver})
    assert node.router is not None
    try:
        obs = node.handle(Task.CREATE, to_json(CreateInstance(spec, create.action_id)))
        assert obs.ok, obs.message
        info = driver.info(spec.instance_id)
        assert info.pid
        nic0, nic1 = spec.networks
        assert nic0.segment.network == "acme/front" and nic1.segment.network == "acme/back"

        # inside: eth0 and eth1 with the portal's addresses and MACs, one default route (eth0's gateway)
        addrs = in_container(info.pid, "ip", "-o", "-4", "addr", "show").stdout
        for i, nic in enumerate(spec.networks):
            line = next(x for x in addrs.splitlines() if f" eth{i} " in x or f" eth{i}@" in x)
            assert f"inet {nic.address} " in line, addrs
            link = in_container(info.pid, "ip", "-o", "link", "show", f"eth{i}").stdout
            assert nic.mac in link and "mtu 1450" in link, link
        routes = in_container(info.pid, "ip", "-4", "route", "show").stdout
        defaults = [r for r in routes.splitlines() if r.startswith("default")]
        assert [d.split(" proto")[0].strip() for d in defaults] == [
            f"default via {front.host_address} dev eth0"
        ]
        assert f"{back.cidr} dev eth1" in routes and f"{front.cidr} dev eth0" in routes, routes

        # the node carries both networks: a bridge each, with its host address and the gateway
        for net, nic in ((front, nic0), (back, nic1)):
            assert bridges.link_exists(net.bridge)
            shown = ip("-4", "-o", "addr", "show", "dev", net.bridge)
            assert f"{net.host_address}/" in shown and nic.segment.host_address in shown, shown

        # a namespace on each network reaches the container's address there, and is reached from it
        probe_front = _probe(probes, front.bridge, str(ipaddress.ip_network(front.cidr)[5]), 24)
        probe_back = _probe(probes, back.bridge, str(ipaddress.ip_network(back.cidr)[5]), 26)
        start = time.monotonic()
        assert _ping_from(probe_front, nic0.ip), "front namespace -> the container's eth0"
        assert _ping_from(probe_back, nic1.ip), "back namespace -> the container's eth1"
        took = time.monotonic() - start
        for target in (str(ipaddress.ip_network(front.cidr)[5]), str(ipaddress.ip_network(back.cidr)[5])):
            r = in_container(info.pid, "ping", "-c1", "-W2", target)
            assert r.returncode == 0, (target, r.stdout, r.stderr)
        # each network stays an island: the front namespace has no way to the back network
        assert not _ping_from(probe_front, nic1.ip)
        print(f"two NICs: both probes answered in {took:.3f} s")

        # security groups are enforced on both NICs: without the icmp rule the probes get no answer
        rules = secgroups.rules_for(Instance.objects.get(pk=inst.pk))
        node.router.set_security(spec.instance_id, [r for r in rules if r.protocol != "icmp"])
        assert not _ping_from(probe_front, nic0.ip) and not _ping_from(probe_back, nic1.ip)
        node.router.set_security(spec.instance_id, rules)
        assert _ping_from(probe_front, nic0.ip) and _ping_from(probe_back, nic1.ip)

        # delete the instance, then the network: the node releases it at once (bridge and rules gone)
        for ns in list(probes):  # the probes' veths hold the bridges; a release keeps a bridge in use
            # Deleting the veth removes both ends at once; a namespace's own devices go only when
            # the kernel gets round to destroying it, later under load (CI once saw the bridge
            # still in use then, and the release rightly kept it).
            subprocess.run(["ip", "-n", ns, "link", "del", "eth0"], check=True)
            subprocess.run(["ip", "netns", "del", ns], check=True)
            probes.remove(ns)
        deleted = node.handle(Task.DELETE, to_json(DeleteInstance(spec.instance_id, Kind.CONTAINER, "del-1")))
        assert deleted.ok, deleted.message
        Instance.objects.filter(pk=inst.pk).update(vm_state="deleted")
        inst.ports.all().delete()
        sent.clear()
        networks.delete_network(front)
        (release,) = [a[0] for _, t, a in sent if t == Task.RELEASE_NETWORK]
        assert from_json(ReleaseNetwork, release).bridge == front.bridge
        assert node.handle(Task.RELEASE_NETWORK, release) is True
        assert not bridges.link_exists(front.bridge)
        assert bridges.link_exists(back.bridge)  # not deleted: kept until idle
        kernel = json.dumps([nft.listing("inet", table), nft.listing("bridge", table)])
        assert front.bridge not in kernel and back.bridge in kernel  # the rules of front are gone
    finally:
        driver.destroy(spec.instance_id)
        node.router.teardown()
        for net in (front, back):
            bridges.delete_bridge(net.bridge)
    assert not bridges.link_exists(back.bridge)
