"""Creates through one web server against two at once: throughput and the invariants (issue 17, item 3).

    .venv/bin/python bench/web_servers.py [--servers 1,2] [--creates 400] [--threads 16] [--rounds 2]

A throwaway PostgreSQL and redis-server (as ``bench/scale.py``), migrated; four empty shared nodes
with room for more than the quota.  For each count in ``--servers`` (each count ``--rounds``
times, alternating), that many real gunicorns with `make run`'s flags (Makefile
``GUNICORN_FLAGS``: 3 workers of 4 threads each) serve the portal on ports of their own, and
``--threads`` clients send ``--creates`` ``POST /api/v1/instances/`` over HTTP with a bearer
token, each to the servers in turn, for a fresh tenant whose quota admits half of them.
Each server is warmed up first (60 GETs from 6 clients: every worker has loaded the portal).
Reported per run: wall time, answered creates a second, accepted (202) a second, latency p50 and
p95, the statuses, quota overshoot and double placement (a node holding more vCPUs or memory
than it has; both must be 0).  Nothing consumes the nodes' queues: this measures the web tier,
the quota lock and the capacity claims, not the nodes.  On one machine both counts share its
cores with PostgreSQL, so two servers add processes, not CPU: the bench says what two cost or
gain here; on two hosts each would have its own.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import Procs, _free_port, _pct, django_on_throwaway_postgres, overfilled  # noqa: E402

from tests.security.gunicorn import make_run_flags  # noqa: E402


def start_servers(procs: Procs, count: int, tag: str) -> list[str]:
    urls = []
    for k in range(count):
        port = _free_port()
        procs.start(
            f"web-{tag}-{k}",
            [str(Path(sys.executable).with_name("gunicorn")), "portal.wsgi", "-b", f"127.0.0.1:{port}",
             *make_run_flags()],
        )  # fmt: skip
        urls.append(f"http://127.0.0.1:{port}")
    for url in urls:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"gunicorn at {url} did not answer /healthz within 60 s")
            time.sleep(0.2)
    return urls


def setup(creates: int) -> None:
    from django.contrib.auth import get_user_model
    from django.utils import timezone

    from portal.cloud.models import ComputeNode, Flavor
    from portal.images.models import Artifact, Image

    Flavor.objects.create(name="s1.tiny", vcpus=1, ram_mb=128, disk_gb=1)
    image = Image.objects.create(name="tiny", version="1", status="active")
    Artifact.objects.create(image=image, format="qcow2", digest="sha256:" + "0" * 64, size=1)
    both = {k: {"ok": True, "detail": "synthetic", "capabilities": []} for k in ("vm", "container")}
    for k in range(4):
        ComputeNode.objects.create(
            name=f"web-bench-{k}", queue=f"node.web-bench-{k}", status="up", vcpus=creates,
            ram_mb=creates * 128, disk_gb=creates * 10, drivers=both, last_heartbeat=timezone.now(),
        )  # fmt: skip
    get_user_model().objects.create_user(username="webbench", password=secrets.token_hex(16))


def tenant_token(slug: str, creates: int) -> str:
    from django.contrib.auth import get_user_model

    from portal.tenancy.models import APIToken, Membership, Quota, Tenant

    tenant = Tenant.objects.create(slug=slug, name=slug)
    Quota.objects.filter(tenant=tenant).update(
        instances=creates // 2, vcpus=10**6, ram_mb=10**9, disk_gb=10**7, vms=creates, containers=creates
    )
    user = get_user_model().objects.get(username="webbench")
    membership = Membership.objects.create(user=user, tenant=tenant, role="member")
    token = APIToken(user=user, membership=membership, name=slug, expires_at="2999-01-01T00:00:00Z")
    key = token.issue()
    token.save()
    return key


def warm_up(urls: list[str], token: str) -> None:
    """Requests until every worker has loaded the portal (a cold worker's first request is ~2 s)."""

    def get(url: str) -> None:
        auth = {"Authorization": f"Bearer {token}"}
        for _ in range(10):
            req = urllib.request.Request(f"{url}/api/v1/flavors/", headers=auth)
            with urllib.request.urlopen(req, timeout=60) as r:
                r.read()

    clients = [threading.Thread(target=get, args=(url,)) for url in urls for _ in range(6)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()


def burst(urls: list[str], slug: str, token: str, creates: int, threads: int) -> dict[str, Any]:
    from portal.cloud.models import Flavor, Instance

    flavor = Flavor.objects.get(name="s1.tiny").pk
    todo = list(range(creates))
    lock = threading.Lock()
    statuses: list[int] = []
    took: list[float] = []

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            body = {"tenant": slug, "name": f"c{i}", "image": "tiny:1", "flavor": flavor, "kind": "vm"}
            req = urllib.request.Request(
                f"{urls[i % len(urls)]}/api/v1/instances/",
                data=json.dumps(body).encode(),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                method="POST",
            )
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    code = r.status
                    r.read()
            except urllib.error.HTTPError as e:
                code = e.code
                e.read()
            with lock:
                statuses.append(code)
                took.append(time.monotonic() - t0)

    workers = [threading.Thread(target=client) for _ in range(threads)]
    t0 = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.monotonic() - t0
    live = Instance.objects.live().filter(tenant__slug=slug)
    return {
        "servers": len(urls),
        "wall_s": round(wall, 2),
        "answered_per_s": round(len(statuses) / wall, 1),
        "accepted_per_s": round(statuses.count(202) / wall, 1),
        "p50_ms": round(statistics.median(took) * 1000, 1),
        "p95_ms": round(_pct(took, 0.95) * 1000, 1),
        "statuses": {str(k): statuses.count(k) for k in sorted(set(statuses))},
        "overshoot": max(0, live.count() - creates // 2),
        "double_placement": overfilled(live),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="1,2", help="comma-separated numbers of web servers")
    parser.add_argument("--creates", type=int, default=400, help="creates per run (quota: half)")
    parser.add_argument("--threads", type=int, default=16, help="concurrent clients")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each server count, alternating")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="skyport-bench-web-"))
    procs = Procs(tmp)
    rows = []
    try:
        django_on_throwaway_postgres(procs)
        from django.db import connections

        setup(args.creates)
        connections.close_all()
        counts = [int(x) for x in args.servers.split(",")]
        for rnd in range(args.rounds):
            for count in counts:
                tag = f"{rnd}-{count}"
                urls = start_servers(procs, count, tag)
                slug = f"t{rnd}x{count}"
                token = tenant_token(slug, args.creates)
                warm_up(urls, token)
                rows.append(burst(urls, slug, token, args.creates, args.threads))
                print(json.dumps(rows[-1]), file=sys.stderr)
                for k in range(count):
                    procs.stop(f"web-{tag}-{k}")
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\n{args.creates} creates by {args.threads} clients over HTTP, quota {args.creates // 2}; "
        f"gunicorn {' '.join(make_run_flags())} per server; PostgreSQL\n"
    )
    head = f"{'servers':>7}{'wall s':>8}{'answered/s':>11}{'accepted/s':>11}{'p50 ms':>8}{'p95 ms':>8}"
    print(head + "  statuses               overshoot  double placement")
    for r in rows:
        print(
            f"{r['servers']:>7}{r['wall_s']:>8}{r['answered_per_s']:>11}{r['accepted_per_s']:>11}"
            f"{r['p50_ms']:>8}{r['p95_ms']:>8}  {json.dumps(r['statuses']):<22} {r['overshoot']:>9}"
            f"  {r['double_placement']:>16}"
        )
    return 0 if all(r["overshoot"] == 0 and r["double_placement"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
