"""Tenant networks across nodes: VNIs, per-node host addresses, tunnel peers and peer updates."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from compute.spec import VNI_MAX, CreateInstance, InstanceSpec, NetworkSegment, Task, from_json
from portal.cloud import networks
from portal.cloud.models import ComputeNode, HostPort, Network
from portal.cloud.tasks import apply_node_report
from portal.tenancy.models import Tenant
from tests.portal.conftest import UP_BOTH, FakeNodes, World, heartbeat


def _node(name: str, owner: Tenant | None, tunnel: str | None, status: str = "up") -> ComputeNode:
    return ComputeNode.objects.create(
        name=name,
        queue=f"node.{name}",
        tenancy="dedicated" if owner else "shared",
        owner=owner,
        status=status,
        vcpus=8,
        ram_mb=8192,
        disk_gb=100,
        drivers=UP_BOTH,
        tunnel_address=tunnel,
    )


def _launch(world: World, who: str, tenant: str, name: str, group: str = "") -> dict[str, Any]:
    r = world.client(who).post(
        "/api/v1/instances/",
        {
            "tenant": tenant,
            "name": name,
            "image": "busybox:1",
            "flavor": world.flavor_public.pk,
            "anti_affinity_group": group,
        },
        format="json",
    )
    assert r.status_code == 202, r.json()
    return r.json()  # type: ignore[no-any-return]


def _creates(sent: list[tuple[str, str, list[Any]]]) -> dict[str, InstanceSpec]:
    return {q: from_json(CreateInstance, args[0]).spec for q, task, args in sent if task == Task.CREATE}


def _ensures(sent: list[tuple[str, str, list[Any]]]) -> dict[str, NetworkSegment]:
    return {q: from_json(NetworkSegment, args[0]) for q, task, args in sent if task == Task.ENSURE_NETWORK}


def test_each_network_gets_its_own_vni_and_a_tunnel_sized_mtu(world: World) -> None:
    a = networks.default_network(world.a)
    b = networks.default_network(world.b)
    assert a.vni >= 1 and b.vni >= 1 and a.vni != b.vni
    assert a.mtu == b.mtu == 1450
    assert networks.default_network(world.a).vni == a.vni
    r = world.client("a_member").get(f"/api/v1/networks/{a.pk}/").json()
    assert r["vni"] == a.vni


def test_vni_allocation_reuses_gaps_once_the_top_is_taken(world: World) -> None:
    a = networks.default_network(world.a)
    Network.objects.filter(pk=a.pk).update(vni=VNI_MAX)
    assert networks.allocate_vni() == 1
    assert networks.default_network(world.b).vni == 1


def test_instances_on_two_nodes_get_tunnel_peers_and_own_host_addresses(
    world: World, sent: list[tuple[str, str, list[Any]]], nodes: FakeNodes
) -> None:
    n1 = _node("tn1", world.a, "198.51.100.1")
    n2 = _node("tn2", world.a, "198.51.100.2")
    _node("tn3", world.a, "198.51.100.3", status="down")  # down: never a peer, never told
    first = _launch(world, "a_member", "acme", "a1", group="spread")
    spec1 = _creates(sent)[f"node.{first['node']}"]
    (nic1,) = spec1.networks
    net = Network.objects.get(tenant=world.a, name="default")
    assert (nic1.segment.vni, nic1.mtu, nic1.segment.tunnel_peers) == (net.vni, 1450, ())
    assert nic1.segment.tunnel_local == ComputeNode.objects.get(name=first["node"]).tunnel_address
    assert nodes.run() == 1
    sent.clear()

    second = _launch(world, "a_member", "acme", "a2", group="spread")
    assert {first["node"], second["node"]} == {"tn1", "tn2"}
    (nic2,) = _creates(sent)[f"node.{second['node']}"].networks
    assert nic2.segment.tunnel_peers == (nic1.segment.tunnel_local,)
    # the node that already carried the network learns the new peer, with its own address
    ensured = _ensures(sent)
    assert list(ensured) == [f"node.{first['node']}"]
    seg = ensured[f"node.{first['node']}"]
    assert (seg.vni, seg.tunnel_local, seg.tunnel_peers) == (
        net.vni,
        nic1.segment.tunnel_local,
        (nic2.segment.tunnel_local,),
    )
    assert seg.host_address == nic1.segment.host_address
    assert nodes.run() == 3  # the create, the ensure, and a1's default group now admitting a2
    sent.clear()

    # each node has its own address on the network, from the same pool as the ports, never the .1
    hosts = {hp.node.name: hp.address for hp in HostPort.objects.filter(network=net)}
    assert set(hosts) == {"tn1", "tn2"}
    ports = set(net.ports.values_list("address", flat=True))
    subnet = ipaddress.ip_network(net.cidr)
    assert len(set(hosts.values()) | ports) == 4
    assert all(ipaddress.ip_address(a) in subnet for a in set(hosts.values()) | ports)
    assert net.host_address not in set(hosts.values()) | ports
    assert nic1.segment.host_address == f"{hosts[first['node']]}/{subnet.prefixlen}"

    # a third instance on a node that already carries the network: the other carrier only learns
    # its name (for its resolver); the peers are unchanged
    third = _launch(world, "a_member", "acme", "a3")
    (other,) = _ensures(sent).values()
    assert len(other.tunnel_peers) == 1 and other.tunnel_peers[0] != other.tunnel_local
    assert ("a3", third["addresses"][0]["address"]) in other.hosts
    # every node has the same gateway, the subnet's .1, handed to the instance with DNS there
    assert other.gateway == nic1.segment.gateway == f"{net.host_address}/{subnet.prefixlen}"
    assert (nic1.gateway, nic1.dns) == (net.host_address, (net.host_address,))
    assert {n1.pk, n2.pk} == {n.pk for n in networks.network_nodes(net)}


def test_a_node_that_leaves_a_network_is_pruned_from_the_other_carriers(
    world: World, sent: list[tuple[str, str, list[Any]]], nodes: FakeNodes
) -> None:
    """The last instance of a node on a network deleted: the remaining carriers get a newer, shorter list."""
    _node("tn1", world.a, "198.51.100.1")
    _node("tn2", world.a, "198.51.100.2")
    _node("tn3", world.a, "198.51.100.3")
    first = _launch(world, "a_member", "acme", "p1", group="spread")
    second = _launch(world, "a_member", "acme", "p2", group="spread")
    third = _launch(world, "a_member", "acme", "p3", group="spread")
    nodes.run()
    net = Network.objects.get(tenant=world.a, name="default")
    before = net.peers_serial
    addr = {n.name: n.tunnel_address for n in ComputeNode.objects.all()}
    sent.clear()

    def run() -> list[tuple[str, str, list[Any]]]:
        """Deliver like ``nodes.run`` but keep what was sent (the observation's own messages too)."""
        seen = []
        while sent:
            seen.append(sent.pop(0))
            nodes.service(seen[-1][0]).handle(seen[-1][1], *seen[-1][2])
        return seen

    r = world.client("a_member").delete(f"/api/v1/instances/{second['id']}/")
    assert r.status_code == 202, r.json()
    ensured = _ensures(run())  # the node deletes it; the observation reaches the portal
    assert set(ensured) == {f"node.{first['node']}", f"node.{third['node']}"}
    for queue, seg in ensured.items():
        name = queue.removeprefix("node.")
        other = third["node"] if name == first["node"] else first["node"]
        assert seg.tunnel_peers == (addr[other],), "the node that left is no longer a peer"
        assert seg.peers_serial > before
    net.refresh_from_db()
    assert net.peers_serial == max(s.peers_serial for s in ensured.values())
    assert {n.name for n in networks.network_nodes(net)} == {first["node"], third["node"]}
    sent.clear()

    # back on tn2 (the only node without a "spread" member); then a delete on a node that still
    # carries the network through another instance prunes nobody
    assert _launch(world, "a_member", "acme", "p4", group="spread")["node"] == second["node"]
    fourth = _launch(world, "a_member", "acme", "p5")
    nodes.run()
    sent.clear()
    assert world.client("a_member").delete(f"/api/v1/instances/{fourth['id']}/").status_code == 202
    assert _ensures(run()) == {}


def test_nodes_without_a_tunnel_address_stay_local(
    world: World, sent: list[tuple[str, str, list[Any]]]
) -> None:
    _node("ln1", world.a, None)
    _node("ln2", world.a, None)
    _launch(world, "a_member", "acme", "a1", group="g")
    _launch(world, "a_member", "acme", "a2", group="g")
    specs = _creates(sent)
    assert set(specs) == {"node.ln1", "node.ln2"}
    for spec in specs.values():
        (nic,) = spec.networks
        assert (
            nic.segment.vni is not None
            and nic.segment.tunnel_local is None
            and nic.segment.tunnel_peers == ()
        )
        assert nic.segment.host_address is not None
    assert _ensures(sent) == {}


def _beat(name: str, tunnel: str = "") -> dict[str, Any]:
    return heartbeat(name, vcpus=8, ram_mb=8192, disk_gb=100, tunnel_address=tunnel)


def test_heartbeat_records_the_tunnel_address_and_a_change_reaches_the_peers(
    world: World, sent: list[tuple[str, str, list[Any]]], nodes: FakeNodes
) -> None:
    node = apply_node_report(_beat("hb1", "198.51.100.7"))
    assert node is not None and node.tunnel_address == "198.51.100.7"
    assert sent == []  # a new node carries no network yet
    assert apply_node_report(_beat("hb1", "bogus")) is None  # malformed: dropped
    _node("hb2", world.a, "198.51.100.8")
    ComputeNode.objects.filter(name="hb1").update(tenancy="dedicated", owner=world.a)
    _launch(world, "a_member", "acme", "a1", group="g")
    _launch(world, "a_member", "acme", "a2", group="g")
    nodes.run()
    sent.clear()
    # hb1 moves to another underlay address: every node of its networks is told
    apply_node_report(_beat("hb1", "198.51.100.9"))
    ensured = _ensures(sent)
    assert set(ensured) == {"node.hb1", "node.hb2"}
    assert ensured["node.hb1"].tunnel_local == "198.51.100.9"
    assert ensured["node.hb2"].tunnel_peers == ("198.51.100.9",)
    sent.clear()
    apply_node_report(_beat("hb1", "198.51.100.9"))
    assert sent == []  # nothing changed
    # a node that stops tunnelling is no peer any more
    apply_node_report(_beat("hb1", ""))
    assert ComputeNode.objects.get(name="hb1").tunnel_address is None
    assert _ensures(sent)["node.hb2"].tunnel_peers == ()


@pytest.mark.django_db(transaction=True)
def test_migration_gives_existing_networks_vnis_and_the_tunnel_mtu() -> None:
    executor = MigrationExecutor(connection)
    executor.migrate([("cloud", "0003_network_vni_computenode_tunnel_address_hostport")])
    apps = executor.loader.project_state(
        [("cloud", "0003_network_vni_computenode_tunnel_address_hostport")]
    ).apps
    tenant = apps.get_model("tenancy", "Tenant").objects.create(slug="old", name="Old")
    Net = apps.get_model("cloud", "Network")
    for i in range(3):
        Net.objects.create(
            tenant=tenant,
            name=f"n{i}",
            cidr=f"198.19.{200 + i}.0/24",
            bridge=f"skn-old{i}",
            host_address=f"198.19.{200 + i}.1",
            mtu=1500,
        )
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())
    got = list(Network.objects.filter(tenant__slug="old").order_by("pk").values_list("vni", "mtu"))
    assert got == [(1, 1450), (2, 1450), (3, 1450)]


def test_operators_switch_egress_per_network_and_per_tenant_and_the_nodes_are_told(
    world: World, sent: list[tuple[str, str, list[Any]]], nodes: FakeNodes
) -> None:
    from django.core.management import CommandError, call_command

    from portal.audit.models import Event

    _node("eg1", world.a, None)  # no tunnel: still told, egress is not about peers
    first = _launch(world, "a_member", "acme", "a1")
    (nic,) = _creates(sent)[f"node.{first['node']}"].networks
    assert nic.segment.egress is True and nic.segment.gateway is not None
    nodes.run()
    sent.clear()

    call_command("network", "egress", "off", "acme", "--network", "default")
    assert _ensures(sent)["node.eg1"].egress is False
    assert Event.objects.filter(action="network.egress").exists()
    sent.clear()
    call_command("network", "egress", "on", "acme", "--network", "default")
    assert _ensures(sent)["node.eg1"].egress is True
    sent.clear()
    # the tenant's switch wins over the network's
    call_command("network", "egress", "off", "acme")
    assert _ensures(sent)["node.eg1"].egress is False
    assert Tenant.objects.get(slug="acme").network_egress is False
    net = Network.objects.get(tenant=world.a, name="default")
    assert net.egress is True and networks.segment(net, ComputeNode.objects.get(name="eg1")).egress is False
    with pytest.raises(CommandError, match="no tenant 'nobody'"):
        call_command("network", "egress", "on", "nobody")
    with pytest.raises(CommandError, match="has no network 'other'"):
        call_command("network", "egress", "on", "acme", "--network", "other")


def test_heartbeat_reports_rule_drift_as_an_event(world: World) -> None:
    from portal.audit.models import Event

    node = apply_node_report(_beat("dr1") | {"network_drift": "nftables tables skyport were changed"})
    assert node is not None and node.network_drift == "nftables tables skyport were changed"
    assert Event.objects.filter(action="node.network_drift", message__contains="changed").count() == 1
    node = apply_node_report(_beat("dr1") | {"network_drift": ""})
    assert node is not None and node.network_drift == ""
