"""Quota bookkeeping: refusals name the limit; concurrent creates never overshoot."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import connections, transaction
from rest_framework.test import APIClient

from portal.cloud import networks
from portal.cloud.models import ComputeNode, HostPort, Instance, Network, Port
from portal.tenancy.choices import Role
from portal.tenancy.models import Membership, Quota, Tenant
from tests.portal.conftest import FakeNodes, World


def _body(w: World, name: str) -> dict[str, Any]:
    return {"tenant": "acme", "name": name, "image": "tiny:1", "flavor": w.flavor_public.pk, "kind": "vm"}


def test_quota_refusal_names_the_limit(world: World, nodes: FakeNodes) -> None:
    Quota.objects.filter(tenant=world.a).update(instances=2)  # web-1 already counts as one
    c = world.client("a_member")
    assert c.post("/api/v1/instances/", _body(world, "one"), format="json").status_code == 202
    r = c.post("/api/v1/instances/", _body(world, "two"), format="json")
    assert r.status_code == 409
    assert "Quota exceeded for instances" in r.json()["message"] and "2 of 2" in r.json()["message"]
    Quota.objects.filter(tenant=world.a).update(instances=50, ram_mb=300)
    r = c.post("/api/v1/instances/", _body(world, "three"), format="json")
    assert r.status_code == 409 and "ram_mb" in r.json()["message"]
    # deleting frees the claim
    assert c.delete(f"/api/v1/instances/{world.instance_a.pk}/").status_code == 202
    r = c.post("/api/v1/instances/", _body(world, "three"), format="json")
    assert r.status_code == 409, "the claim holds until the node confirms the delete"
    nodes.run()
    assert c.post("/api/v1/instances/", _body(world, "three"), format="json").status_code == 202


def test_duplicate_name_is_409(world: World) -> None:
    r = world.client("a_member").post("/api/v1/instances/", _body(world, "web-1"), format="json")
    assert r.status_code == 409 and "already has" in r.json()["message"]


def test_usage_endpoint(world: World) -> None:
    q = world.client("a_viewer").get("/api/v1/quotas/").json()["results"][0]
    assert q["usage"] == {
        "instances": 1,
        "vcpus": 1,
        "ram_mb": 128,
        "disk_gb": 1,
        "containers": 0,
        "vms": 1,
        "volumes": 0,
        "volume_gb": 0,
        "networks": 1,  # the default network of the world's instance
    }
    assert (q["volumes"], q["volume_gb"], q["networks"]) == (10, 100, 5)


@pytest.mark.django_db(transaction=True)
def test_50_concurrent_creates_never_overshoot(world: World) -> None:
    limit = 10
    Quota.objects.filter(tenant=world.a).update(instances=limit)
    user = world.users["a_member"]
    results: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(50)

    def worker(i: int) -> None:
        try:
            c = APIClient()
            c.force_login(user)
            barrier.wait()
            r = c.post("/api/v1/instances/", _body(world, f"par-{i}"), format="json")
            with lock:
                results.append(r.status_code)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 50
    assert results.count(202) == limit - 1  # web-1 holds one
    assert results.count(409) == 50 - (limit - 1)
    assert Instance.objects.filter(tenant=world.a).live().count() == limit


def _race(n: int, post: Any) -> list[int]:
    """``post(i)`` from ``n`` threads released together; their status codes."""
    results: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(n)

    def worker(i: int) -> None:
        try:
            barrier.wait()
            code = post(i)
            with lock:
                results.append(code)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


@pytest.mark.django_db(transaction=True)
def test_tenants_launching_their_first_instance_at_once_get_distinct_networks(world: World) -> None:
    """Subnets, VNIs and addresses are picked then inserted: racing picks must all end distinct.

    On SQLite writers queue; on PostgreSQL (tests/pg/run) they run side by side and the
    unique constraints plus a retry decide.
    """
    n = 12
    user = world.users["operator"]
    for i in range(n):
        t = Tenant.objects.create(slug=f"race{i}", name=f"Race {i}")
        Membership.objects.create(user=user, tenant=t, role=Role.MEMBER)

    def post(i: int) -> int:
        c = APIClient()
        c.force_login(user)
        body = {**_body(world, "first"), "tenant": f"race{i}"}
        r = c.post("/api/v1/instances/", body, format="json")
        assert r.status_code == 202, r.content
        return r.status_code

    assert _race(n, post) == [202] * n
    nets = list(Network.objects.filter(tenant__slug__startswith="race"))
    assert len(nets) == n
    assert len({x.cidr for x in nets}) == n and len({x.vni for x in nets}) == n
    assert len({x.bridge for x in nets}) == n


@pytest.mark.django_db(transaction=True)
def test_concurrent_creates_in_one_network_get_distinct_addresses(world: World) -> None:
    Quota.objects.filter(tenant=world.a).update(
        instances=100, vms=100, vcpus=100, ram_mb=100_000, disk_gb=1000
    )
    user = world.users["a_member"]

    def post(i: int) -> int:
        c = APIClient()
        c.force_login(user)
        r = c.post("/api/v1/instances/", _body(world, f"addr-{i}"), format="json")
        assert r.status_code == 202, r.content
        return int(r.status_code)

    assert _race(20, post) == [202] * 20
    addresses = list(Port.objects.filter(network__tenant=world.a).values_list("address", flat=True))
    assert len(addresses) == 20 and len(set(addresses)) == 20  # the fixture's web-1 has no port


@pytest.mark.django_db(transaction=True)
def test_nodes_joining_a_network_at_once_get_distinct_addresses(world: World) -> None:
    """Heartbeats of different nodes lock only their own node row, so on PostgreSQL their
    host addresses on one network are picked side by side: a lost race must pick again."""
    network = networks.default_network(world.a)
    nodes = [ComputeNode.objects.create(name=f"join-{i}", queue=f"node.join-{i}") for i in range(12)]

    def join(i: int) -> int:
        with transaction.atomic():
            ComputeNode.objects.select_for_update().get(pk=nodes[i].pk)  # as a heartbeat does
            networks.host_port(network, nodes[i])
        return 0

    assert _race(len(nodes), join) == [0] * len(nodes)
    addresses = list(HostPort.objects.filter(network=network).values_list("address", flat=True))
    assert len(addresses) == len(nodes) and len(set(addresses)) == len(nodes)
