"""API end to end vs bare crun and the bare drivers, and 100 concurrent creates.

    .venv/bin/python bench/api_e2e.py [--runs 5] [--burst 100] [--containers-only]

The broker is SKYPORT_TEST_BROKER_URL (default redis://127.0.0.1:6379/6); tenant networks come
from SKYPORT_TEST_NETWORK_POOL (default 198.18.0.0/15), the bare drivers' bridge uses its last /24.
``--containers-only`` skips the VM runs and the burst; the container runs then also print where
the time went (from the workers' own log lines, millisecond stamps).

container: POST /api/v1/instances (kind=container) -> the API shows power_state
           running, against ContainerDriver.spawn -> running in this process
           and plain `crun run -d` of a hand-made bundle on the same rootfs;
vm:        POST (kind=vm) -> the guest's ready marker on its serial console,
           against LibvirtDriver.spawn -> ready marker (bench/vm_boot.py compares
           the driver with plain libvirt defineXML+create);
burst:     N concurrent POSTs from N threads against a quota of N/2 instances:
           wall time, overshoot (must be 0), double placement (must be 0).

Real Redis, a real control worker and two real compute workers (one node
dedicated to the container tenant, one shared), a scratch SQLite database, or
with ``SKYPORT_BENCH_POSTGRES=1`` a throwaway PostgreSQL cluster (bench/scale.py's,
on a unix socket, fsync off) started and stopped by this run.
Needs root, libvirtd, crun and redis-server (``make run`` or ``make test``
set them up) and the sample images in var/images.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import container_start  # noqa: E402
import scale  # noqa: E402  # no Django: its throwaway PostgreSQL and the double-placement count

BASE = Path("/var/lib/skyport") / f"bench-{secrets.token_hex(4)}"
BROKER = os.environ.get("SKYPORT_TEST_BROKER_URL", "redis://127.0.0.1:6379/6")
os.environ.update(
    DJANGO_SETTINGS_MODULE="portal.settings",
    SKYPORT_VAR_DIR=str(BASE / "var"),
    CELERY_BROKER_URL=BROKER,
    SKYPORT_SECRET_KEY=secrets.token_urlsafe(50),
    SKYPORT_HEARTBEAT_SECONDS="1",
    SKYPORT_ALLOWED_HOSTS="testserver,127.0.0.1",
)
os.environ.pop("DATABASE_URL", None)
#: the portal's database when not SQLite: a throwaway PostgreSQL cluster, stopped at exit
DATABASE_URL = ""
if os.environ.get("SKYPORT_BENCH_POSTGRES") == "1":
    import atexit
    import tempfile

    _pg = scale.Procs(Path(tempfile.mkdtemp(prefix="skyport-bench-pg-", dir="/var/tmp")))
    atexit.register(shutil.rmtree, _pg.tmp, True)
    atexit.register(_pg.stop_all)
    DATABASE_URL = os.environ["DATABASE_URL"] = scale.start_postgres(_pg)
POOL = ipaddress.IPv4Network(os.environ.get("SKYPORT_TEST_NETWORK_POOL", "198.18.0.0/15"))
os.environ["SKYPORT_NETWORK_POOL"] = str(POOL)
BARE_NET = list(POOL.subnets(new_prefix=24))[-1]

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.utils import timezone  # noqa: E402
from rest_framework.test import APIClient  # noqa: E402

from compute.config import NodeConfig  # noqa: E402
from compute.drivers.container import ContainerDriver  # noqa: E402
from compute.drivers.vm import LibvirtDriver  # noqa: E402
from compute.network import bridge  # noqa: E402
from compute.spec import InstanceSpec, Kind, NetworkAttachment, NetworkSegment  # noqa: E402
from portal.cloud import dispatch, services  # noqa: E402
from portal.cloud.models import ComputeNode, Instance, Network  # noqa: E402
from portal.images.models import Image  # noqa: E402
from portal.images.nodekeys import node_key  # noqa: E402
from portal.tenancy.models import Membership, Quota, Tenant  # noqa: E402
from tests.e2e.test_end_to_end import PortalServer, Stack, wait_for  # noqa: E402
from tests.netcleanup import teardown_node  # noqa: E402

READY = "SKYPORT-READY"


def client(username: str, tenant: str) -> APIClient:
    user = get_user_model().objects.create_user(username=username, password=secrets.token_urlsafe(12))
    Membership.objects.create(user=user, tenant=Tenant.objects.get(slug=tenant), role="member")
    c = APIClient()
    c.force_login(user)
    return c


def poll(check: Any, every: float = 0.005, timeout: float = 180) -> float:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return time.monotonic()
        time.sleep(every)
    raise TimeoutError("no result")


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


#: per counted API run: (wall clock at the POST, POST answered after s, running seen after s)
MARKS: list[tuple[float, float, float]] = []


def api_runs(
    c: APIClient, tenant: str, image: str, flavor: int, kind: str, runs: int, ready: Any
) -> list[float]:
    times = []
    for i in range(-1, runs):  # run -1 warms caches (image, layers) and is not counted
        wall, t0 = time.time(), time.monotonic()
        r = c.post(
            "/api/v1/instances/",
            {"tenant": tenant, "name": f"{kind}-{i}", "image": image, "flavor": flavor, "kind": kind},
            format="json",
        )
        answered = time.monotonic() - t0
        assert r.status_code == 202, r.json()
        iid = r.json()["id"]
        try:
            took = poll(lambda iid=iid: ready(c, iid), timeout=120) - t0
        except TimeoutError:
            raise TimeoutError(
                f"{kind} {iid} not ready: {c.get(f'/api/v1/instances/{iid}/').json()}"
            ) from None
        if i >= 0:
            times.append(took)
            if kind == "container":
                MARKS.append((wall, answered, took))
        print(f"  api {kind} run {i + 1}: {took:.3f} s", file=sys.stderr)
        c.delete(f"/api/v1/instances/{iid}/")
        poll(lambda iid=iid: Instance.objects.get(pk=iid).vm_state == "deleted", every=0.05)
    return times


def bare_runs(
    driver: Any, image: Image, kind: Kind, runs: int, net: NetworkAttachment, ready: Any
) -> list[float]:
    artifact = image.artifact_for(kind.value)
    assert artifact is not None
    times = []
    for i in range(-1, runs):  # run -1 warms caches and is not counted
        nic = NetworkAttachment(net.segment, f"{BARE_NET[51 + i]}/24", "52:54:00:fe:00:" + f"{i + 1:02x}")
        spec = InstanceSpec(
            instance_id=str(uuid.uuid4()),
            name=f"bare-{i}",
            hostname=f"bare-{i}",
            tenant="bench",
            kind=kind,
            vcpus=1,
            ram_mb=128,
            disk_gb=1,
            image=artifact.ref(),  # fetched from the portal's blob endpoint, as a node does
            networks=(nic,),
        )
        t0 = time.monotonic()
        driver.spawn(spec)
        try:
            took = poll(lambda s=spec: ready(driver, s.instance_id)) - t0
        finally:
            driver.destroy(spec.instance_id)
        if i >= 0:
            times.append(took)
        print(f"  bare {kind.value} run {i + 1}: {took:.3f} s", file=sys.stderr)
    return times


def burst(n: int, flavor: int, image: str) -> tuple[float, int, int, int]:
    """n concurrent creates against a quota of n // 2, placed on four synthetic shared nodes.

    Messages to nodes are dropped (no VM boots): this measures the API, the
    quota lock and the capacity claims.
    """
    both = {"vm": {"ok": True, "detail": "synthetic"}, "container": {"ok": True, "detail": "synthetic"}}
    for k in range(4):
        ComputeNode.objects.create(
            name=f"burst-{k}",
            queue=f"node.burst-{k}",
            status="up",
            vcpus=4,
            ram_mb=4096,
            disk_gb=100,
            drivers=both,
            last_heartbeat=timezone.now(),
        )
    tenant = Tenant.objects.create(slug="burst", name="Burst")
    Quota.objects.filter(tenant=tenant).update(
        instances=n // 2, vcpus=10_000, ram_mb=10**7, disk_gb=10**6, vms=n
    )
    user = get_user_model().objects.create_user(username="burst", password=secrets.token_urlsafe(12))
    Membership.objects.create(user=user, tenant=tenant, role="member")
    statuses: list[int] = []
    lock = threading.Lock()
    gate = threading.Barrier(n)
    original, dispatch._send = dispatch._send, lambda queue, task, args: None  # type: ignore[assignment]

    def one(i: int) -> None:
        from django.db import connections

        c = APIClient()
        c.force_login(user)
        gate.wait()
        r = c.post(
            "/api/v1/instances/",
            {"tenant": "burst", "name": f"b{i}", "image": image, "flavor": flavor, "kind": "vm"},
            format="json",
        )
        with lock:
            statuses.append(r.status_code)
        connections.close_all()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    dispatch._send = original  # type: ignore[assignment]
    live = Instance.objects.filter(tenant=tenant).live()
    overshoot = max(0, live.count() - n // 2)
    return wall, statuses.count(202), overshoot, scale.overfilled(live)


LOG_LINE = re.compile(
    r"^\[(?P<at>[\d-]+ [\d:]+,\d+): INFO/[\w-]+\] Task (?P<task>[\w.]+)\[[\w-]+\] "
    r"(?P<what>received|succeeded in (?P<took>[\d.e-]+)s)"
)


def log_marks(text: str, task: str) -> list[tuple[str, float, float]]:
    """(``received`` or ``succeeded``, wall clock, run time in the pool) of ``task`` in a worker log."""
    out = []
    for line in text.splitlines():
        m = LOG_LINE.match(line)
        if m and m["task"] == task:
            at = datetime.datetime.strptime(m["at"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((m["what"].split()[0], at, float(m["took"] or 0)))
    return out


def breakdown(node_log: str, control_log: str) -> list[dict[str, float]]:
    """Where each counted container POST's time went, in ms after the POST, from the workers' logs.

    The node worker's main process logs ``received`` when it takes the message off the broker and
    ``succeeded in Xs`` (X measured in the pool process) when the pool hands the result back;
    the control worker logs the same for the observation.  Runs are sequential, so the first
    create received after a POST is that POST's, and the first observation received after it is
    its answer.
    """
    creates = log_marks(node_log, "compute.instance.create")
    observes = log_marks(control_log, "portal.observe")
    rows = []
    for wall, answered, took in MARKS:
        got = next(at for what, at, _ in creates if what == "received" and at >= wall - 0.002)
        done, ran = next((at, t) for what, at, t in creates if what == "succeeded" and at >= got)
        seen = next(at for what, at, _ in observes if what == "received" and at >= got)
        applied, apply_took = next((at, t) for what, at, t in observes if what == "succeeded" and at >= seen)
        rows.append({
            "post_answered": answered * 1000, "node_received": (got - wall) * 1000,
            "task_ran": ran * 1000, "node_done": (done - wall) * 1000,
            "control_received": (seen - wall) * 1000, "apply_ran": apply_took * 1000,
            "applied": (applied - wall) * 1000, "running_seen": took * 1000,
        })  # fmt: skip
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--burst", type=int, default=100)
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    ap.add_argument("--keep-logs", type=Path, help="copy the workers' logs into this directory")
    ap.add_argument("--containers-only", action="store_true", help="no VM runs, no burst; print a breakdown")
    args = ap.parse_args()
    BASE.mkdir(parents=True, mode=0o755, exist_ok=True)
    BASE.chmod(0o755)
    call_command("migrate", verbosity=0)
    with open(os.devnull, "w") as quiet:
        call_command("bootstrap", stdout=quiet)
        images = os.environ.get("SKYPORT_IMAGE_DIR", str(REPO / "var/images"))
        call_command("import_sample_images", "--dir", images, stdout=quiet)
    from portal.celery import app

    app.conf.broker_url = BROKER
    subprocess.run(["redis-cli", "-u", BROKER, "flushdb"], capture_output=True, timeout=10)
    tag = secrets.token_hex(2)
    ded, shared = f"bench{tag}c", f"bench{tag}v"
    # Nodes (the workers and this process's bare drivers) fetch image blobs from the portal over HTTP.
    server = PortalServer()
    settings.SKYPORT_PORTAL_URL = server.url
    os.environ["SKYPORT_NODE_NAME"] = "bench-bare"
    os.environ["SKYPORT_NODE_KEY"] = node_key("bench-bare")
    stack = Stack(BASE, str(settings.DATABASES["default"]["NAME"]), BROKER, DATABASE_URL)
    stack.env["SKYPORT_VAR_DIR"] = str(BASE / "var")
    stack.start_cluster([ded, shared])
    bare_bridge = f"skb{tag}"
    try:
        wait_for(
            "nodes",
            lambda: ComputeNode.objects.filter(status="up", name__in=[ded, shared]).count() == 2,
            timeout=90,
        )
        print("nodes:", list(ComputeNode.objects.values_list("name", "status")), file=sys.stderr)
        Tenant.objects.create(slug="ctr", name="Containers")
        Tenant.objects.create(slug="vms", name="VMs")
        services.set_node_tenancy(ComputeNode.objects.get(name=ded), Tenant.objects.get(slug="ctr"))
        flavor = 1
        busybox = Image.objects.get(name="busybox")
        tiny = Image.objects.get(name="tiny")
        cdrv = ContainerDriver(
            NodeConfig("bench-bare", BASE / "bare", "qemu:///system", "auto", "crun", BROKER)
        )
        vdrv = LibvirtDriver(
            NodeConfig(
                "bench-bare",
                BASE / "bare",
                "qemu:///system",
                os.environ.get("SKYPORT_ACCEL", "auto"),
                "crun",
                BROKER,
            )
        )
        vnode = LibvirtDriver(
            NodeConfig(
                shared,
                BASE / shared,
                "qemu:///system",
                os.environ.get("SKYPORT_ACCEL", "auto"),
                "crun",
                BROKER,
            )
        )
        bridge.ensure_bridge(bare_bridge, address=f"{BARE_NET[1]}/24")
        net = NetworkAttachment(NetworkSegment("bare", bare_bridge), f"{BARE_NET[2]}/24", "52:54:00:fe:00:00")

        def running(c: APIClient, iid: str) -> bool:
            return bool(c.get(f"/api/v1/instances/{iid}/").json()["power_state"] == "running")

        def vm_ready(c: APIClient, iid: str) -> bool:
            try:
                return READY in vnode.console_log(iid, 4096)
            except Exception:  # not spawned yet
                return False

        def bare_running(d: ContainerDriver, iid: str) -> bool:
            return d.info(iid).power_state.value == "running"

        def bare_vm_ready(d: LibvirtDriver, iid: str) -> bool:
            return READY in d.console_log(iid, 4096)

        print("containers ...", file=sys.stderr)
        cb = bare_runs(cdrv, busybox, Kind.CONTAINER, args.runs * 4, net, bare_running)
        oci = busybox.artifact_for("container")
        assert oci is not None
        rootfs = cdrv.layers.pull(oci.location(), oci.digest).layers[0]  # cached by the bare runs
        (BASE / "crun").mkdir()
        crun = container_start.bench_bare(BASE / "crun", rootfs, args.runs * 4)
        crun_quiet = container_start.bench_bare(
            BASE / "crun", rootfs, args.runs * 4, gap=container_start.QUIET
        )
        ca = api_runs(client("c", "ctr"), "ctr", "busybox", flavor, "container", args.runs * 4, running)
        vb: list[float] = []
        va: list[float] = []
        wall, accepted, overshoot, doubles = float("nan"), 0, 0, 0
        if not args.containers_only:
            print("vms ...", file=sys.stderr)
            vb = bare_runs(vdrv, tiny, Kind.VM, args.runs, net, bare_vm_ready)
            va = api_runs(client("v", "vms"), "vms", "tiny", flavor, "vm", args.runs, vm_ready)
            print("burst ...", file=sys.stderr)
            wall, accepted, overshoot, doubles = burst(args.burst, flavor, "tiny")
    except BaseException:
        print(stack.logs(), file=sys.stderr)
        raise
    finally:
        stack.stop()
        if args.keep_logs:
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            for f in BASE.glob("*.log"):
                shutil.copy(f, args.keep_logs / f.name)
        node_log, control_log = (BASE / f"{ded}.log").read_text(), (BASE / "control.log").read_text()
        server.stop()
        for node in (ded, shared):  # resolvers and nftables tables too, not only the bridges
            teardown_node(node, BASE / node, in_this_namespace=True)
        for n in Network.objects.all():
            bridge.delete_bridge(n.bridge)
        bridge.delete_bridge(bare_bridge)
        shutil.rmtree(BASE, ignore_errors=True)

    print("\n| path | runs | median (s) | ratio to bare tool | ratio to bare driver |")
    print("|---|---:|---:|---:|---:|")
    c0, d0 = median(crun), median(cb)
    q0 = median(crun_quiet)
    print(f"| container: bare `crun run -d` (no network), back to back | {len(crun)} | {c0:.3f} | 1.00 | |")
    print(
        f"| container: bare `crun run -d` (no network), each after {container_start.QUIET:g} s idle "
        f"| {len(crun_quiet)} | {q0:.3f} | 1.00 | |"
    )
    ca0, v0, va0 = median(ca), median(vb), median(va)
    print(
        f"| container: driver spawn -> running (veth, conmon) | {len(cb)} | {d0:.3f} "
        f"| {d0 / c0:.2f} / {d0 / q0:.2f} | 1.00 |"
    )
    print(
        f"| container: API POST -> running | {len(ca)} | {ca0:.3f} | {ca0 / c0:.2f} / {ca0 / q0:.2f} "
        f"| {ca0 / d0:.2f} |"
    )
    print("(ratios to bare crun: back to back / each after idle)")
    print(f"| vm: LibvirtDriver.spawn -> guest ready | {len(vb)} | {v0:.2f} | see bench/vm_boot.py | 1.00 |")
    print(f"| vm: API POST -> guest ready | {len(va)} | {va0:.2f} | | {va0 / v0:.2f} |")
    rows = breakdown(node_log, control_log) if MARKS else []
    if rows:
        cols = list(rows[0])
        print("\n| ms after the POST (median of " + str(len(rows)) + ") | " + " | ".join(cols) + " |")
        print("|---|" + "---:|" * len(cols))
        print("| container | " + " | ".join(f"{median([r[k] for r in rows]):.1f}" for k in cols) + " |")
    print(f"\nload average at the end: {Path('/proc/loadavg').read_text().strip()}")
    if args.containers_only:
        return 0
    quota = args.burst // 2
    print(f"\n| concurrent creates | wall (s) | accepted (quota {quota}) | overshoot | double placement |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {args.burst} | {wall:.2f} | {accepted} | {overshoot} | {doubles} |")
    if args.json:
        args.json.write_text(
            json.dumps({
                "runs": args.runs, "crun_s": c0, "crun_quiet_s": q0, "driver_s": d0, "api_container_s": ca0,
                "vm_driver_s": v0, "vm_api_s": va0,
                "burst": {"n": args.burst, "quota": quota, "wall_s": wall, "accepted": accepted,
                          "overshoot": overshoot, "double_placement": doubles},
            })
        )  # fmt: skip
    return 0 if overshoot == 0 and doubles == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
