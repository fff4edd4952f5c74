"""API latency with 1000 instances in the database: p50/p95 and SQL queries per request.

    .venv/bin/python bench/api_latency.py [--instances 1000] [--requests 200] [--json out.json]

A scratch SQLite database (WAL, as `make run` uses) with one tenant holding
N instances spread over 4 nodes, each with a port, plus 50 images.  Requests
go through the whole Django stack in this process (middleware, bearer-token
authentication, scoping, serializers) with Django's test client; no network
and no workers are involved.  Each request is timed and its SQL queries
counted; the bare baseline is `GET /healthz` (the same stack, no database).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BASE = Path("/tmp") / f"skyport-bench-latency-{secrets.token_hex(4)}"
os.environ.update(
    DJANGO_SETTINGS_MODULE="portal.settings",
    SKYPORT_VAR_DIR=str(BASE / "var"),
    SKYPORT_SECRET_KEY=secrets.token_urlsafe(50),
    SKYPORT_ALLOWED_HOSTS="testserver",
    CELERY_BROKER_URL="memory://",
)
os.environ.pop("DATABASE_URL", None)

import django  # noqa: E402

django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402
from rest_framework.test import APIClient  # noqa: E402

from portal.cloud import networks  # noqa: E402
from portal.cloud.models import ComputeNode, Flavor, Instance, Port  # noqa: E402
from portal.images.models import Artifact, Image  # noqa: E402
from portal.tenancy.models import APIToken, Membership, Tenant  # noqa: E402


def populate(n: int) -> tuple[str, str]:
    call_command("migrate", verbosity=0)
    tenant = Tenant.objects.create(slug="bench", name="Bench")
    user = get_user_model().objects.create_user("bench", password=secrets.token_urlsafe(12))
    membership = Membership.objects.create(user=user, tenant=tenant, role="admin")
    token = APIToken(user=user, membership=membership, name="bench", expires_at="2999-01-01T00:00:00Z")
    key = token.issue()
    token.save()
    flavor = Flavor.objects.create(name="m1.tiny", vcpus=1, ram_mb=128, disk_gb=1)
    images = []
    for i in range(50):
        image = Image.objects.create(name=f"img{i}", version="1", status="active", owner=None)
        Artifact.objects.create(image=image, format="qcow2", digest="sha256:" + f"{i:064x}", size=1)
        images.append(image)
    nodes = [
        ComputeNode.objects.create(
            name=f"n{i}", queue=f"node.n{i}", status="up", vcpus=256, ram_mb=1 << 20, disk_gb=100000,
            drivers={"vm": {"ok": True, "detail": ""}, "container": {"ok": True, "detail": ""}},
        )
        for i in range(4)
    ]  # fmt: skip
    network = networks.default_network(tenant)
    rows = [
        Instance(
            id=uuid.uuid4(), tenant=tenant, name=f"i{i}", kind="vm", isolation_reason="vm: bench",
            image=images[i % 50], flavor=flavor, network=network, vcpus=1, ram_mb=128, disk_gb=1,
            created_by=user, vm_state="active", power_state="running", node=nodes[i % 4],
        )
        for i in range(n)
    ]  # fmt: skip
    Instance.objects.bulk_create(rows, batch_size=500)
    # One port each; a /24 holds fewer than 1000 addresses, so these rows use the rest of
    # 198.18.0.0/15 (only the row count and shape matter to the queries being measured).
    ports = [
        Port(network=network, instance=inst, address=f"198.19.{i // 250}.{10 + i % 250}",
             mac=f"52:54:00:00:{i // 256:02x}:{i % 256:02x}")
        for i, inst in enumerate(rows)
    ]  # fmt: skip
    from portal.tenancy.models import Quota

    Quota.objects.filter(tenant=tenant).update(
        instances=10 * n, vms=10 * n, vcpus=10 * n, ram_mb=10**9, disk_gb=10**7
    )
    Port.objects.bulk_create(ports, batch_size=500)
    return key, str(rows[n // 2].pk)


def measure(client: APIClient, method: str, path: str, n: int, body: Any = None) -> dict[str, float]:
    times, queries = [], []
    for _ in range(n):
        with CaptureQueriesContext(connection) as ctx:
            start = time.perf_counter()
            r = client.generic(
                method, path, json.dumps(body) if body else "", content_type="application/json"
            )
            took = time.perf_counter() - start
        if r.status_code >= 400:
            raise SystemExit(f"{method} {path} answered {r.status_code}: {r.content[:300]!r}")
        times.append(took * 1000)
        queries.append(len(ctx.captured_queries))
    times.sort()
    return {
        "p50_ms": statistics.median(times),
        "p95_ms": times[int(0.95 * (len(times) - 1))],
        "queries": statistics.median(queries),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()
    BASE.mkdir(parents=True, exist_ok=True)
    try:
        key, one = populate(args.instances)
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
        flavor = Flavor.objects.get().pk
        cases = [
            ("GET /healthz (no database)", "GET", "/healthz", None),
            ("GET /api/v1/instances/ (page of 50)", "GET", "/api/v1/instances/?page_size=50", None),
            ("GET /api/v1/instances/?page_size=500", "GET", "/api/v1/instances/?page_size=500", None),
            ("GET /api/v1/instances/?search=i99", "GET", "/api/v1/instances/?search=i99", None),
            ("GET /api/v1/instances/{id}/", "GET", f"/api/v1/instances/{one}/", None),
            ("GET /api/v1/quotas/ (usage)", "GET", "/api/v1/quotas/", None),
            ("GET /api/v1/images/", "GET", "/api/v1/images/", None),
            (
                "POST /api/v1/instances/preview/",
                "POST",
                "/api/v1/instances/preview/",
                {"name": "x", "image": "img1", "flavor": flavor, "kind": "vm"},
            ),
        ]
        for _, method, path, body in cases:  # warm-up
            measure(client, method, path, 3, body)
        results = {
            label: measure(client, method, path, args.requests, body) for label, method, path, body in cases
        }
    finally:
        connection.close()
        shutil.rmtree(BASE, ignore_errors=True)
    print(f"\nAPI latency, {args.instances} instances in the database, {args.requests} requests each")
    print("| request | p50 (ms) | p95 (ms) | SQL queries |")
    print("|---|---:|---:|---:|")
    for label, r in results.items():
        print(f"| {label} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['queries']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"instances": args.instances, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
