"""Two web servers at once (issue 17, horizontal): creates spread over both never overshoot a quota
and never place more on a node than it holds.

Two real gunicorns with `make run`'s flags (tests/security/gunicorn.py) share the test's database
(SQLite in the db lane, PostgreSQL in the pg lane) and its broker, as two web hosts behind a load
balancer share PostgreSQL and Redis (docs/deploy.md, "Several hosts").  Threads released
together send their creates alternately to one and the other; the database then holds exactly
what the limits allow.  The creates' messages to the node are removed from the broker at the end.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from django.conf import settings

from portal.cloud.models import ComputeNode, Instance
from portal.tenancy.models import APIToken, Membership, Quota
from tests.portal.conftest import World
from tests.security.gunicorn import Gunicorn

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def servers(tmp_path: Path, world: World) -> Iterator[list[Gunicorn]]:
    started: list[Gunicorn] = []
    try:
        for k in range(2):
            (tmp_path / f"web{k}").mkdir()
            started.append(Gunicorn(tmp_path / f"web{k}"))
        yield started
    finally:
        for server in started:
            server.stop()
        # what the creates sent to the node (nothing consumes node.shared-1 here)
        redis.Redis.from_url(settings.CELERY_BROKER_URL).delete("node.shared-1")


def _token(world: World) -> str:
    user = world.users["a_member"]
    token = APIToken(
        user=user,
        membership=Membership.objects.get(user=user),
        name="two-webs",
        expires_at="2999-01-01T00:00:00Z",
    )
    key = token.issue()
    token.save()
    return key


def _creates(servers: list[Gunicorn], token: str, world: World, n: int) -> list[tuple[int, str]]:
    """``n`` creates from ``n`` threads released together, alternately to each server."""
    results: list[tuple[int, str]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(n)

    def post(i: int) -> None:
        body = {"tenant": "acme", "name": f"two-{i}", "image": "tiny:1", "flavor": world.flavor_public.pk}
        req = urllib.request.Request(
            f"{servers[i % len(servers)].url}/api/v1/instances/",
            data=json.dumps({**body, "kind": "vm"}).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            method="POST",
        )
        barrier.wait()
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                got = (r.status, r.read().decode())
        except urllib.error.HTTPError as e:
            got = (e.code, e.read().decode())
        with lock:
            results.append(got)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert len(results) == n, "a create got no answer"
    return results


def _codes(results: list[tuple[int, str]]) -> dict[int, int]:
    return {code: sum(1 for c, _ in results if c == code) for code in sorted({c for c, _ in results})}


def test_creates_spread_over_two_web_servers_respect_the_quota(servers: list[Gunicorn], world: World) -> None:
    limit = 8
    Quota.objects.filter(tenant=world.a).update(instances=limit)  # web-1 already counts as one
    results = _creates(servers, _token(world), world, 24)
    assert _codes(results) == {202: limit - 1, 409: 24 - (limit - 1)}, results
    refused = [json.loads(body)["message"] for code, body in results if code == 409]
    assert all("Quota exceeded for instances" in m for m in refused), refused[:3]
    assert Instance.objects.filter(tenant=world.a).live().count() == limit


def test_creates_spread_over_two_web_servers_never_overfill_a_node(
    servers: list[Gunicorn], world: World
) -> None:
    # shared-1 is the only node up: room for 2 x 4 = 8 vCPUs, web-1 holds one
    ComputeNode.objects.filter(name="shared-1").update(vcpus=2, cpu_allocation_ratio=4.0)
    Quota.objects.filter(tenant=world.a).update(instances=100)
    results = _creates(servers, _token(world), world, 24)
    assert _codes(results) == {202: 7, 409: 17}, results
    refused = [json.loads(body)["message"] for code, body in results if code == 409]
    assert all("not enough vCPUs" in m for m in refused), refused[:3]
    placed = Instance.objects.live().filter(node__name="shared-1")
    assert sum(i.vcpus for i in placed) == 8  # full, and not one over
    assert Instance.objects.filter(tenant=world.a).live().count() == 8
