"""Density through the REST API: N busybox containers on one real compute node, nothing lost.

    SKYPORT_TEST_BROKER_URL=redis://127.0.0.1:6379/7 SKYPORT_TEST_NETWORK_POOL=198.18.128.0/20 \\
        nice -n 19 .venv/bin/python bench/api_density.py [--n 1000] [--json out.json]

The same stack as bench/api_e2e.py (scratch SQLite, or a throwaway PostgreSQL with
``SKYPORT_BENCH_POSTGRES=1``; real Redis, a real control worker and a real compute worker with
crun + conmon, the node dedicated to the tenant).  One tenant network sized
for N (``SKYPORT_NETWORK_PREFIX`` 22 for 1000: one bridge, below its 1023 ports), a private flavor
of 16 MiB, and the node's overcommit ratios raised by the operator so the scheduler places N.

1. N ``POST /api/v1/instances/`` one after another; time until the API shows all N running.
2. The portal's view against the node's: the set of running instances in the database equals
   ``crun list`` under the node's own crun root (and conmon's PIDs are alive).
3. Memory: MemAvailable drop per container, the containers' cgroup memory, this node's conmon RSS.
4. N ``DELETE``; time until all are ``deleted``; then nothing of them is left on the node:
   no crun state, no instance directory, no cgroup in any hierarchy, no veth, no conmon process.

Exit status 1 when anything was lost or left behind.  Only this run's processes (by PID, the
stack's own) and state directory are cleaned up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("SKYPORT_NETWORK_PREFIX", "22")

import api_e2e as e2e
import container_start
from django.conf import settings
from django.core.management import call_command

from compute.drivers.container import cgroups_path
from compute.network import (
    bridge,
    veth,
)
from portal.cloud import services
from portal.cloud.models import ComputeNode, Flavor, Instance, Network
from portal.tenancy.models import Quota, Tenant
from tests.e2e import test_end_to_end as e2e_test
from tests.netcleanup import teardown_node

CGROUP_HIERARCHIES = ("memory", "cpu", "cpuacct", "pids", "freezer", "devices", "blkio")


def conmons(state_dir: Path) -> dict[int, int]:
    """PID -> RSS bytes of the conmon processes that supervise containers under ``state_dir``."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "comm").read_text().strip() != "conmon":
                continue
            if str(state_dir) not in (proc / "cmdline").read_bytes().decode(errors="replace"):
                continue
            status = (proc / "status").read_text()
        except OSError:
            continue
        rss = next((int(x.split()[1]) * 1024 for x in status.splitlines() if x.startswith("VmRSS:")), 0)
        found[int(proc.name)] = rss
    return found


def crun_list(crun_root: Path) -> dict[str, str]:
    """Container id -> status, as crun sees it under the node's own root."""
    if not crun_root.exists():
        return {}
    r = subprocess.run(
        ["crun", f"--root={crun_root}", "list", "--format=json"], capture_output=True, text=True, timeout=60
    )
    if r.returncode != 0:
        raise RuntimeError(f"crun list: {r.stderr.strip()}")
    return {c["id"]: c["status"] for c in json.loads(r.stdout or "[]")}


def leftovers(state_dir: Path, ids: list[str]) -> dict[str, int]:
    base = state_dir / "containers"
    left = {
        "crun state": len(crun_list(base / "crun")),
        "instance dirs": sum(1 for _ in base.glob("sky-*")) if base.exists() else 0,
        "cgroups": 0,
        "veths": 0,
        "conmon processes": len(conmons(state_dir)),
    }
    for iid in ids:
        rel = cgroups_path(iid).lstrip("/")
        left["cgroups"] += sum(1 for h in CGROUP_HIERARCHIES if (Path("/sys/fs/cgroup") / h / rel).exists())
        left["veths"] += int(Path("/sys/class/net", veth.host_ifname(iid[:8], 0)).exists())
    return left


def cgroup_memory(iid: str) -> int:
    try:
        return int(
            (
                Path("/sys/fs/cgroup/memory") / cgroups_path(iid).lstrip("/") / "memory.usage_in_bytes"
            ).read_text()
        )
    except OSError:
        return 0


def count(**filters: Any) -> int:
    return Instance.objects.filter(tenant__slug="dens", **filters).count()


def main() -> int:  # noqa: PLR0912 -- one straight run, step by step
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    ap.add_argument(
        "--group",
        choices=["default", "flat"],
        default="default",
        help="default: the tenant's default group (its members admit each other: every create "
        "sends the node the group's new member list); flat: a group made through the API whose "
        "one rule admits the network pool by CIDR",
    )
    ap.add_argument(
        "--max-minutes", type=float, default=40, help="give up each phase (start, delete) after this"
    )
    ap.add_argument(
        "--heartbeat",
        type=float,
        default=5,
        help="the node's heartbeat period in s (the portal's default 5; bench/api_e2e.py uses 1)",
    )
    args = ap.parse_args()
    n = args.n
    base = e2e.BASE
    base.mkdir(parents=True, mode=0o755, exist_ok=True)
    base.chmod(0o755)
    call_command("migrate", verbosity=0)
    with open(os.devnull, "w") as quiet:
        call_command("bootstrap", stdout=quiet)
        images = os.environ.get("SKYPORT_IMAGE_DIR", str(e2e.REPO / "var/images"))
        call_command("import_sample_images", "--dir", images, stdout=quiet)
    from portal.celery import app

    app.conf.broker_url = e2e.BROKER
    subprocess.run(["redis-cli", "-u", e2e.BROKER, "flushdb"], capture_output=True, timeout=10)
    node = f"dens{os.urandom(2).hex()}"
    state_dir = base / node
    server = e2e.PortalServer()
    settings.SKYPORT_PORTAL_URL = server.url
    stack = e2e.Stack(base, str(settings.DATABASES["default"]["NAME"]), e2e.BROKER, e2e.DATABASE_URL)
    stack.env["SKYPORT_VAR_DIR"] = str(base / "var")
    stack.env["SKYPORT_HEARTBEAT_SECONDS"] = str(args.heartbeat)
    stack.start_cluster([node])
    result: dict[str, Any] = {"n": n, "database": settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]}
    ids: list[str] = []
    ok = True
    try:
        e2e.wait_for("node", lambda: ComputeNode.objects.filter(name=node, status="up").exists(), timeout=90)
        tenant = Tenant.objects.create(slug="dens", name="Density")
        big = 10**7
        Quota.objects.filter(tenant=tenant).update(
            instances=n, containers=n, vcpus=big, ram_mb=big, disk_gb=big, vms=0
        )
        # the operator's overcommit: N containers of 1 vCPU / 16 MiB / 1 GB on a 2-core node
        ComputeNode.objects.filter(name=node).update(
            cpu_allocation_ratio=n, ram_allocation_ratio=4.0, disk_allocation_ratio=n
        )
        services.set_node_tenancy(ComputeNode.objects.get(name=node), tenant)
        flavor = Flavor.objects.create(
            name="dens", vcpus=1, ram_mb=16, disk_gb=1, is_public=False, tenant=tenant
        )
        c = e2e.client("d", "dens")
        extra: dict[str, Any] = {}
        if args.group == "flat":
            g = c.post("/api/v1/security-groups/", {"tenant": "dens", "name": "flat"}, format="json")
            assert g.status_code == 201, g.json()
            rule = {"group": g.json()["id"], "direction": "ingress", "remote_cidr": str(e2e.POOL)}
            r = c.post("/api/v1/security-group-rules/", rule, format="json")
            assert r.status_code == 201, r.json()
            extra["security_group_ids"] = [g.json()["id"]]
        result["group"], result["heartbeat_s"] = args.group, args.heartbeat
        give_up = time.monotonic() + args.max_minutes * 60
        mem0 = container_start.mem_available()
        load0 = Path("/proc/loadavg").read_text().split()[:3]
        t0 = time.monotonic()
        for i in range(n):
            if time.monotonic() > give_up:
                print(f"  gave up after {i} POSTs", file=sys.stderr)
                break
            r = c.post(
                "/api/v1/instances/",
                {
                    "tenant": "dens",
                    "name": f"d{i}",
                    "image": "busybox",
                    "flavor": flavor.pk,
                    "kind": "container",
                    **extra,
                },
                format="json",
            )
            assert r.status_code == 202, (i, r.json())
            ids.append(r.json()["id"])
            if (i + 1) % 100 == 0:
                up = count(power_state="running")
                print(
                    f"  {i + 1} posted at {time.monotonic() - t0:.1f} s, {up} running",
                    file=sys.stderr,
                    flush=True,
                )
        posted = time.monotonic() - t0
        last, stuck_since = -1, time.monotonic()
        while True:
            running, failed = count(power_state="running"), count(vm_state="error")
            if running + failed >= n:
                break
            if running != last:
                last, stuck_since = running, time.monotonic()
            if time.monotonic() - stuck_since > 300 or time.monotonic() > give_up:
                print(f"  no progress for 300 s at {running} running", file=sys.stderr)
                break
            time.sleep(1)
        all_running = time.monotonic() - t0
        time.sleep(2)  # let the last starts settle before the memory reading
        mem1 = container_start.mem_available()
        running_ids = set(
            Instance.objects.filter(tenant=tenant, power_state="running").values_list("id", flat=True)
        )
        node_view = crun_list(state_dir / "containers" / "crun")
        portal_view = {f"sky-{i}" for i in map(str, running_ids)}
        node_running = {cid for cid, status in node_view.items() if status == "running"}
        errors = list(
            Instance.objects.filter(tenant=tenant, vm_state="error").values_list("status_reason", flat=True)[
                :5
            ]
        )
        cg = sum(cgroup_memory(iid) for iid in ids)
        supervisors = conmons(state_dir)
        result.update({
            "load_before": " ".join(load0), "load_running": Path("/proc/loadavg").read_text().split()[:3],
            "posted_s": posted, "all_running_s": all_running, "running": len(running_ids),
            "error": count(vm_state="error"), "error_reasons": errors,
            "node_running": len(node_running), "node_total": len(node_view),
            "views_equal": portal_view == node_running,
            "mem_drop_mib": (mem0 - mem1) / 2**20, "mib_per_container": (mem0 - mem1) / n / 2**20,
            "cgroup_mib": cg / 2**20, "conmons": len(supervisors),
            "conmon_rss_mib": sum(supervisors.values()) / 2**20,
        })  # fmt: skip
        print(json.dumps(result, indent=1), file=sys.stderr, flush=True)
        ok = len(running_ids) == n and portal_view == node_running
        t1 = time.monotonic()
        give_up = t1 + args.max_minutes * 60
        for iid in ids:
            if time.monotonic() > give_up:
                break
            assert c.delete(f"/api/v1/instances/{iid}/").status_code in (202, 204)
        deleted_posted = time.monotonic() - t1
        while count(vm_state="deleted") < len(ids) and time.monotonic() < give_up:
            time.sleep(1)
        result["delete_posted_s"] = deleted_posted
        result["all_deleted_s"] = time.monotonic() - t1
        result["deleted"] = count(vm_state="deleted")
        time.sleep(2)
        result["left_on_node"] = leftovers(state_dir, ids)
        ok = ok and result["deleted"] == n and not any(result["left_on_node"].values())
        result["posted"] = len(ids)
    except BaseException:
        ok = False
        print(stack.logs()[-20000:], file=sys.stderr)
        raise
    finally:
        stack.stop()
        server.stop()
        # an interrupted run: its containers (by instance id), then the node's resolvers and tables
        e2e_test._destroy_leftovers(base, [node])
        teardown_node(node, state_dir, in_this_namespace=True)
        for net in Network.objects.all():
            bridge.delete_bridge(net.bridge)
        if not ok:
            for name in ("control.log", f"{node}.log"):
                shutil.copy(base / name, Path("/tmp") / f"api_density-{name}")
            print("logs kept in /tmp/api_density-*.log", file=sys.stderr)
        shutil.rmtree(base, ignore_errors=True)
    result["load_end"] = Path("/proc/loadavg").read_text().split()[:3]
    result["ok"] = ok
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
