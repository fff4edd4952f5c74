"""Quota bookkeeping: refusals name the limit; concurrent creates never overshoot."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import connections
from rest_framework.test import APIClient

from portal.cloud.models import Instance
from portal.tenancy.models import Quota
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
    assert q["usage"] == {"instances": 1, "vcpus": 1, "ram_mb": 128, "disk_gb": 1, "containers": 0, "vms": 1}


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
