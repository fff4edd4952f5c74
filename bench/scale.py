"""The control plane under many nodes: heartbeat lag, false node-down marks, DB writes, Redis, CPU.

    .venv/bin/python bench/scale.py [--nodes 100,250,500] [--instances 40] [--period 5]
        [--seconds 60] [--control-workers 1] [--concurrency 4] [--json out.json]
        [--metering-beat 0,60]   # a run per usage sampling period (0: every beat, as before)

What runs, all started by this script and stopped by PID:

- PostgreSQL: a throwaway cluster (initdb as ``postgres``, unix socket in a private directory,
  ``fsync=off`` as tests/pg/run; ``track_commit_timestamp=on`` so the bench reads when each
  heartbeat's update committed), migrated with ``manage.py migrate``;
- a redis-server of its own (broker db 0, the portal's cache db 1);
- ``--control-workers`` real ``celery -A portal worker -Q control`` processes (prefork pool of
  ``--concurrency`` 2, as compose runs them) and one ``celery -A portal beat`` (the sweeper
  that marks silent nodes down);
- the **simulator**: this process multiplexes N node identities, each a real
  :class:`compute.tasks.NodeService` over two :class:`compute.drivers.fake.FakeDriver` s (VM and
  container) holding ``--instances`` running workloads whose rows the bench created in the
  database.  Every ``--period`` seconds each node calls ``NodeService.report()``, the very code
  the node's heartbeat process runs (drivers' health, inventory with per-instance CPU and memory
  counters, capacity, cache listing), which publishes a ``portal.node_report`` to ``control``
  through Celery with Skyport's settings.  Why one process, not N ``compute.worker`` processes:
  500 Celery workers (each a main process, a pool and a heartbeat child, ~60 MB) do not fit in
  this 2-core, few-GB machine; the control plane receives the same messages either way.  The
  beats of the nodes are spread evenly over the period.

Measured over ``--seconds`` after one warm-up period:

- heartbeat lag: commit time of the node row's update (``pg_xact_commit_timestamp(xmin)``)
  minus the beat's ``sent_at``, for every beat the bench sees (it polls the node table every
  0.5 s; a beat overwritten within 0.5 s by the node's next one is not seen: with 5 s beats,
  none);
- beats sent late by the simulator itself (its own lag, so that a slow simulator is not
  blamed on the control plane) and the ``control`` queue's length at the end (backlog);
- false node-down marks: ``node.down`` events (every node beats throughout);
- DB rows written per hour: inserted + updated + deleted tuples (pg_stat_user_tables) scaled
  to an hour, and the tables that take most;
- Redis memory (``used_memory``) at the end, and the control workers' CPU (utime + stime of
  their process groups from ``/proc``, as a share of one core);
- at the end, while the nodes still beat: the metering roll of the hour they beat in (every
  instance's day and month row summed from its hours), its time and day rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(what: str, ok: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


class Procs:
    """Children of this run, each in its own process group, stopped by PID."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None, user: str = "") -> None:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 -- the child's for its lifetime
        self.procs[name] = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO,
            start_new_session=True,
            user=user or None,
        )

    def stop(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)


def _pg_bindir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not found:
        raise SystemExit("PostgreSQL is not installed (Debian package postgresql)")
    return found[-1].parent


def start_postgres(procs: Procs) -> str:
    """A throwaway cluster on a unix socket in ``procs.tmp``; returns its DATABASE_URL."""
    bindir, base = _pg_bindir(), procs.tmp / "pg"
    data, sock = base / "data", base / "run"
    sock.mkdir(parents=True, mode=0o700)
    owner = "postgres" if os.getuid() == 0 else ""
    if owner:
        pw = pwd.getpwnam(owner)
        for path in (procs.tmp, base, sock):
            os.chown(path, pw.pw_uid, pw.pw_gid)
    subprocess.run(
        [str(bindir / "initdb"), "-D", str(data), "-U", "skyport", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
        user=owner or None,
    )
    procs.start(
        "postgres",
        [str(bindir / "postgres"), "-D", str(data), "-c", "listen_addresses=", "-c",
         f"unix_socket_directories={sock}", "-c", "fsync=off", "-c", "synchronous_commit=off",
         "-c", "full_page_writes=off", "-c", "max_connections=200", "-c", "track_commit_timestamp=on"],
        user=owner,
    )  # fmt: skip
    _wait("postgres", (sock / ".s.PGSQL.5432").exists, 60)
    _wait(
        "postgres to accept connections",
        lambda: subprocess.run(
            [str(bindir / "pg_isready"), "-h", str(sock)], capture_output=True
        ).returncode == 0,
    )  # fmt: skip
    subprocess.run([str(bindir / "createdb"), "-h", str(sock), "-U", "skyport", "skyport"], check=True)
    return f"postgres://skyport@{quote(str(sock), safe='')}:5432/skyport"


def start_redis(procs: Procs) -> int:
    port = _free_port()
    procs.start(
        "redis",
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", str(procs.tmp)],
    )
    _wait("redis", lambda: _redis(port, "ping") == "PONG")
    return port


def django_on_throwaway_postgres(procs: Procs, **settings: str) -> tuple[dict[str, str], int]:
    """A throwaway PostgreSQL cluster and redis-server (``procs``' children), Django set up on
    them and migrated: the benches' database (``one_run`` here, ``bench/beat_history.py``,
    ``bench/roll_history.py``, ``bench/web_servers.py``).

    ``settings``: more environment variables for the portal.  The machine's own ``SKYPORT_*``
    and ``CELERY_*`` variables are not used.  Returns the environment set (for the bench's
    own Skyport processes) and redis-server's port (broker database 0, the cache 1).
    """
    db_url = start_postgres(procs)
    port = start_redis(procs)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SKYPORT_", "CELERY_", "DJANGO_"))},
        "DJANGO_SETTINGS_MODULE": "portal.settings",
        "DATABASE_URL": db_url,
        "CELERY_BROKER_URL": f"redis://127.0.0.1:{port}/0",
        "SKYPORT_CACHE_URL": f"redis://127.0.0.1:{port}/1",
        "SKYPORT_VAR_DIR": str(procs.tmp / "var"),
        "SKYPORT_SECRET_KEY": secrets.token_urlsafe(50),
        "SKYPORT_LOG_LEVEL": "WARNING",
        **settings,
    }
    os.environ.update(env)
    for key in [k for k in os.environ if k not in env and k.startswith(("SKYPORT_", "CELERY_"))]:
        del os.environ[key]
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    return env, port


def _redis(port: int, *args: str) -> str:
    return subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, text=True
    ).stdout.strip()


def _cpu_seconds(pgid: int) -> float:
    """utime + stime of every live process in a process group (a worker and its pool)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def seed(nodes: int, per_node: int) -> dict[str, list[str]]:
    """Nodes (shared, up) and their running instances, in bulk; returns instance ids by node name."""
    from django.contrib.auth import get_user_model

    from portal.cloud import networks
    from portal.cloud.models import ComputeNode, Flavor, Instance
    from portal.images.models import Artifact, Image
    from portal.tenancy.models import Membership, Tenant

    tenant = Tenant.objects.create(slug="scale", name="Scale")
    user = get_user_model().objects.create_user(username="scale", password=secrets.token_hex(16))
    flavor = Flavor.objects.create(name="s1.tiny", vcpus=1, ram_mb=128, disk_gb=1)
    image = Image.objects.create(name="tiny", version="1", status="active")
    for fmt in ("qcow2", "oci"):  # what a create's spec names (its blobs are never fetched here)
        Artifact.objects.create(image=image, format=fmt, digest="sha256:" + "0" * 64, size=1)
    Membership.objects.create(user=user, tenant=tenant, role="member")
    network = networks.default_network(tenant)
    names = [f"sim{n:04d}" for n in range(nodes)]
    ComputeNode.objects.bulk_create(
        ComputeNode(name=name, queue=f"node.{name}", status="down", vcpus=64, ram_mb=262144, disk_gb=10000)
        for name in names
    )
    by_name = {n.name: n for n in ComputeNode.objects.filter(name__in=names)}
    placed: dict[str, list[str]] = {}
    rows = []
    for name in names:
        ids = [uuid.uuid4() for _ in range(per_node)]
        placed[name] = [str(i) for i in ids]
        rows += [
            Instance(
                id=i, tenant=tenant, name=f"{name}-{k}", kind="container", isolation_reason="scale bench",
                image=image, network=network, flavor=flavor, vcpus=1, ram_mb=128, disk_gb=1,
                node=by_name[name], vm_state="active", power_state="running", created_by=user,
            )
            for k, i in enumerate(ids)
        ]  # fmt: skip
    Instance.objects.bulk_create(rows, batch_size=2000)
    from django.db import connection

    if connection.vendor == "postgresql":
        # what autovacuum does within a minute of a bulk load; measured before it, the planner
        # still thinks the table nearly empty and joins every row before sorting a page
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")
    return placed


class Simulator:
    """N node identities in one process: a NodeService each over FakeDrivers, beating on schedule."""

    def __init__(self, placed: dict[str, list[str]], period: float, state: Path, broker: str) -> None:
        from celery import Celery

        from compute import celeryconf
        from compute.config import NodeConfig
        from compute.drivers.fake import FakeDriver
        from compute.spec import Kind, PowerState
        from compute.tasks import NodeService

        self.period = period
        self.app = Celery("scale-sim", fixups=[], amqp=celeryconf.AMQP_CLASS)
        self.app.conf.update(**celeryconf.reliability_settings(), **celeryconf.broker_settings(broker, 300.0))
        self.services = []
        for name, ids in placed.items():
            vm, ct = FakeDriver(Kind.VM), FakeDriver(Kind.CONTAINER)
            now = time.monotonic()
            for iid in ids:
                ct.workloads[iid] = PowerState.RUNNING
                ct.started[iid] = now
            cfg = NodeConfig(
                name, state / name, "test:///default", "qemu", "crun", broker, heartbeat_seconds=period
            )
            self.services.append(
                NodeService(
                    cfg, self._send, {Kind.VM: vm, Kind.CONTAINER: ct}, prepare_bridge=lambda seg: None
                )
            )
        self.late: list[float] = []  # how late the simulator sent each beat (its own limit)
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="simulator", daemon=True)

    def _send(self, task: Any, payload: dict[str, Any]) -> None:
        self.app.send_task(task, args=[payload], queue="control")

    def _run(self) -> None:
        n = len(self.services)
        t0 = time.monotonic()
        k = 0
        while not self._stop.is_set():
            due = t0 + k * self.period / n
            delay = due - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            self.late.append(max(0.0, -delay))
            self.services[k % n].report()
            self.sent += 1
            k += 1

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.app.close()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _tuples(cursor: Any) -> dict[str, int]:
    cursor.execute("SELECT relname, n_tup_ins + n_tup_upd + n_tup_del FROM pg_stat_user_tables")
    return {name: int(n) for name, n in cursor.fetchall()}


def one_run(nodes: int, args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="skyport-bench-scale-"))
    procs = Procs(tmp)
    row: dict[str, Any] = {
        "nodes": nodes,
        "instances": nodes * args.instances,
        "workers": args.control_workers,
        "metering_beat": args.metering_one,
    }
    try:
        env, port = django_on_throwaway_postgres(
            procs,
            DB_CONN_MAX_AGE="60",
            SKYPORT_HEARTBEAT_SECONDS=str(args.period),
            SKYPORT_METERING_BEAT_SECONDS=str(args.metering_one),
        )
        broker = env["CELERY_BROKER_URL"]
        from django.db import connection

        placed = seed(nodes, args.instances)
        if args.api:
            list_page_times(row, "idle")  # the same rows before any node beats: the page itself
        connection.close()
        for w in range(1, args.control_workers + 1):
            procs.start(
                f"control{w}",
                [str(VENV_BIN / "celery"), "-A", "portal", "worker", "-Q", "control", "--pool", args.pool,
                 "-c", str(args.concurrency), "-n", f"control{w}@scale", "--loglevel", args.loglevel],
                env=env,
            )  # fmt: skip
        procs.start(
            "beat", [str(VENV_BIN / "celery"), "-A", "portal", "beat", "--loglevel", "WARNING"], env=env
        )
        sim = Simulator(placed, args.period, tmp / "nodes", broker)
        sim.start()
        warm_up(nodes, args, port)
        lags, seen = measure(args, procs, port, row)
        if args.api:
            api_checks(row, args.burst)  # while the nodes keep beating
        roll_time(row)  # the nodes still beat: the roll waits for their metering writes
        sim.stop()
        row["beats_sent"] = sim.sent
        row["sim_late_p99"] = round(_pct(sim.late[-seen:] if seen else sim.late, 0.99), 2)
        row["lag_p50"], row["lag_p99"] = round(_pct(lags, 0.5), 3), round(_pct(lags, 0.99), 3)
        row["lag_max"] = round(max(lags, default=float("nan")), 3)
        row["beats_seen"] = len(lags)
    finally:
        with contextlib.suppress(Exception):
            from django.db import connection

            connection.close()
        procs.stop_all()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return row


def warm_up(nodes: int, args: argparse.Namespace, port: int) -> None:
    """Until every node is up and the queue holds under a second of beats (at most 90 s)."""
    from portal.cloud.models import ComputeNode

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        up = ComputeNode.objects.filter(status="up").count()
        if up == nodes and int(_redis(port, "llen", "control") or 0) <= max(1, nodes / args.period):
            break
        time.sleep(1)
    time.sleep(args.period)


def measure(
    args: argparse.Namespace, procs: Procs, port: int, row: dict[str, Any]
) -> tuple[list[float], int]:
    from django.db import connection

    from portal.audit.models import Event

    workers = [procs.procs[f"control{w}"].pid for w in range(1, args.control_workers + 1)]
    with connection.cursor() as cur:
        before, cpu0, t0 = _tuples(cur), sum(_cpu_seconds(p) for p in workers), time.monotonic()
        last: dict[str, float] = {}
        lags: list[float] = []
        while time.monotonic() - t0 < args.seconds:
            cur.execute(
                "SELECT name, extract(epoch from last_heartbeat), "
                "extract(epoch from pg_xact_commit_timestamp(xmin)) FROM cloud_computenode"
            )
            for name, sent, committed in cur.fetchall():
                if sent is None or committed is None or last.get(name) == float(sent):
                    continue
                if name in last:  # the first one seen may predate the window
                    lags.append(float(committed) - float(sent))
                last[name] = float(sent)
            time.sleep(0.5)
        elapsed = time.monotonic() - t0
        cpu = sum(_cpu_seconds(p) for p in workers) - cpu0
        after = _tuples(cur)
    delta = {t: after.get(t, 0) - before.get(t, 0) for t in after}
    row["rows_per_hour"] = int(sum(delta.values()) * 3600 / elapsed)
    row["top_tables"] = {
        t: int(n * 3600 / elapsed) for t, n in sorted(delta.items(), key=lambda kv: -kv[1])[:3] if n
    }
    row["control_cpu"] = round(cpu / elapsed, 2)
    row["backlog"] = int(_redis(port, "llen", "control") or 0)
    row["redis_mb"] = round(
        int(_redis(port, "info", "memory").split("used_memory:")[1].split()[0]) / 2**20, 1
    )
    row["false_down"] = Event.objects.filter(action="node.down").count()
    row["beats_per_s"] = round(len(lags) / elapsed, 1)
    return lags, len(lags)


def roll_time(row: dict[str, Any]) -> None:
    """How long the roll of the hour the nodes beat in takes (every instance's day and month row).

    Rolled as if that hour had closed (``now`` one hour on): the day and month rows of every
    instance that beat, summed from their hours, as the beat's ``portal.metering.roll`` does once
    an hour (docs/metering.md).
    """
    import datetime as dt

    from django.utils import timezone

    from portal.metering import sampling

    t0 = time.monotonic()
    row["roll_day_rows"] = sampling.roll(timezone.now() + dt.timedelta(hours=1))
    row["roll_s"] = round(time.monotonic() - t0, 2)


def api_checks(row: dict[str, Any], burst: int) -> None:
    """The API under this load: a list page's time and queries, and a create burst's invariants.

    In this process, through DRF's test client against the same PostgreSQL, while the simulated
    nodes keep beating.  List: ``GET /api/v1/instances/?tenant=scale`` (page 1 and the last page
    of the tenant's N*40 instances, 30 each).  Burst: ``burst`` creates by 16 threads for a new
    tenant whose quota admits half of them, onto 4 empty nodes of its own (32 vCPUs, 16 GiB each:
    room for more than the quota, so the quota binds); messages to the nodes are dropped (nothing
    consumes the simulated nodes' queues), so this measures the API, the quota lock and the
    capacity claims.
    """
    from django.contrib.auth import get_user_model
    from django.db import connections
    from rest_framework.test import APIClient

    from portal.cloud import dispatch
    from portal.cloud.models import ComputeNode, Flavor, Instance
    from portal.tenancy.models import Membership, Quota, Tenant

    list_page_times_apart(row, "list")

    # nodes of the burst's own: the simulated ones host the scale tenant's containers, and a VM of
    # another tenant never shares a host with them (the isolation invariant)
    from django.utils import timezone

    both = {k: {"ok": True, "detail": "synthetic", "capabilities": []} for k in ("vm", "container")}
    for k in range(4):
        ComputeNode.objects.create(
            name=f"burst-{k}", queue=f"node.burst-{k}", status="up", vcpus=32, ram_mb=16384, disk_gb=1000,
            drivers=both, last_heartbeat=timezone.now(),
        )  # fmt: skip
    tenant = Tenant.objects.create(slug="burst", name="Burst")
    Quota.objects.filter(tenant=tenant).update(
        instances=burst // 2, vcpus=10**6, ram_mb=10**9, disk_gb=10**7, vms=burst, containers=burst
    )
    user = get_user_model().objects.create_user(username="burst", password=secrets.token_hex(16))
    Membership.objects.create(user=user, tenant=tenant, role="member")
    flavor = Flavor.objects.get(name="s1.tiny").pk
    statuses: list[int] = []
    reasons: list[str] = []  # the first refusal's body, and any unexpected answer's
    lock = threading.Lock()
    todo = list(range(burst))
    original, dispatch._send = dispatch._send, lambda queue, task, args: None  # type: ignore[assignment]

    def worker() -> None:
        client = APIClient(HTTP_HOST="localhost")
        client.force_login(user)
        while True:
            with lock:
                if not todo:
                    break
                i = todo.pop()
            r = client.post(
                "/api/v1/instances/",
                {"tenant": "burst", "name": f"b{i}", "image": "tiny:1", "flavor": flavor, "kind": "vm"},
                format="json",
            )
            with lock:
                statuses.append(r.status_code)
                if r.status_code not in (202, 409) or (r.status_code == 409 and not reasons):
                    reasons.append(r.content.decode(errors="replace")[:300])
        connections.close_all()

    # The burst's nodes send no heartbeats of their own (the creates' messages go nowhere), so
    # they beat here, as a node's heartbeat refreshes its row: otherwise the sweeper marks them
    # down within 3 periods and the rest of the burst is refused for that, not for quota.
    done = threading.Event()

    def beat() -> None:
        while not done.wait(1.0):
            ComputeNode.objects.filter(name__startswith="burst-").update(
                status="up", last_heartbeat=timezone.now()
            )
        connections.close_all()

    threads = [threading.Thread(target=worker) for _ in range(16)]
    beating = threading.Thread(target=beat, daemon=True)
    beating.start()
    t0 = time.monotonic()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        dispatch._send = original  # type: ignore[assignment]
        done.set()
        beating.join(5)
    row["burst_s"] = round(time.monotonic() - t0, 1)
    row["burst_statuses"] = {str(k): statuses.count(k) for k in sorted(set(statuses))}
    row["burst_refusal"] = reasons[:3]
    live = Instance.objects.live().filter(tenant=tenant)
    row["burst_overshoot"] = max(0, live.count() - burst // 2)
    row["burst_double_placement"] = overfilled(live)


def overfilled(live: Any) -> int:
    """Double placement after a burst: the nodes holding ``live`` instances (a queryset) that hold
    more memory or vCPUs than they have (one count each), and instances placed on no node."""
    from portal.cloud.models import ComputeNode, Instance

    over = 0
    for node in ComputeNode.objects.filter(instances__in=live).distinct():
        here = Instance.objects.live().filter(node=node)
        over += int(sum(i.ram_mb for i in here) > node.ram_mb * node.ram_allocation_ratio)
        over += int(sum(i.vcpus for i in here) > node.vcpus * node.cpu_allocation_ratio)
    return over + int(live.filter(node__isnull=True).count())


def list_page_times_apart(row: dict[str, Any], prefix: str) -> None:
    """:func:`list_page_times` in a forked process, as a web server is one of its own.

    Not in this process, where the simulator's thread (every node's beats built and sent here)
    would make the page wait for the interpreter lock as well as for the machine's cores.
    """
    from django.db import connections

    connections.close_all()  # the child opens its own
    ctx = multiprocessing.get_context("fork")
    results = ctx.SimpleQueue()

    def child() -> None:
        timed: dict[str, Any] = {}
        try:
            list_page_times(timed, prefix)
        finally:
            results.put(timed)

    proc = ctx.Process(target=child, name="list-page")
    proc.start()
    timed = results.get()
    proc.join(30)
    if not timed:
        raise RuntimeError(f"timing the list page in a child failed (exit code {proc.exitcode})")
    row.update(timed)


def list_page_times(row: dict[str, Any], prefix: str) -> None:
    """p95 and query counts of ``GET /api/v1/instances/?tenant=scale``, first and last page, 30 each."""
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from rest_framework.test import APIClient

    from portal.cloud.models import Instance

    c = APIClient(HTTP_HOST="localhost")  # portal.settings' ALLOWED_HOSTS, not the tests'
    c.force_login(get_user_model().objects.get(username="scale"))
    total = Instance.objects.filter(tenant__slug="scale").count()
    last = (total + 49) // 50
    for page in (1, last):
        for _ in range(3):  # not timed: the process's first requests import and build what Django caches
            c.get("/api/v1/instances/", {"tenant": "scale", "page": page})
        times, cpu, queries = [], [], set()
        for _ in range(30):
            with CaptureQueriesContext(connection) as q:
                t0, c0 = time.perf_counter(), time.process_time()
                r = c.get("/api/v1/instances/", {"tenant": "scale", "page": page})
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            assert r.status_code == 200, r.content[:300]
            queries.add(len(q))
        key = "first" if page == 1 else "last"
        row[f"{prefix}_{key}_p95_ms"] = round(_pct(times, 0.95) * 1000, 1)
        # this process's CPU for a request (not PostgreSQL's): the rest of the time is waiting
        row[f"{prefix}_{key}_cpu_p50_ms"] = round(_pct(cpu, 0.5) * 1000, 1)
        row[f"{prefix}_{key}_queries"] = sorted(queries)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="100,250,500", help="comma-separated N for successive runs")
    parser.add_argument("--instances", type=int, default=40, help="instances per node")
    parser.add_argument("--period", type=float, default=5.0, help="heartbeat period (s)")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured window per run")
    parser.add_argument("--control-workers", type=int, default=1)
    parser.add_argument(
        "--concurrency", type=int, default=2, help="pool size per control worker (compose: 2)"
    )
    parser.add_argument("--pool", default="prefork", help="the control workers' pool (compose: prefork)")
    parser.add_argument("--json", help="append the rows here (JSON lines)")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory (logs)")
    parser.add_argument("--loglevel", default="WARNING", help="the control workers' log level")
    parser.add_argument(
        "--api", action="store_true", help="also time the list page and run a create burst (api_checks)"
    )
    parser.add_argument("--burst", type=int, default=500, help="creates in the burst (--api)")
    parser.add_argument(
        "--metering-beat",
        default="60",
        help="comma-separated SKYPORT_METERING_BEAT_SECONDS, a run each (0: every beat sampled)",
    )
    args = parser.parse_args()
    rows = []
    runs = [(int(n), int(m)) for n in args.nodes.split(",") for m in args.metering_beat.split(",")]
    for n, m in runs:
        # one process per run: Django is set up once per process, each run has its own database
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(n), "--metering-one", str(m), *sys.argv[1:]],
            capture_output=True, text=True,
        ) if "--one" not in sys.argv else None  # fmt: skip
        if out is not None:
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    _table(rows, args)
    if args.json:
        with open(args.json, "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


def _table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"\nheartbeat every {args.period:g} s, {args.instances} instances per node, "
        f"{args.seconds:g} s measured; {args.control_workers} control worker(s), "
        f"{args.pool} pool of {args.concurrency}\n"
    )
    head = (
        f"{'nodes':>6}{'insts':>7}{'beats/s':>8}{'lag p50':>8}{'lag p99':>8}{'max':>7}{'sim late':>9}"
        f"{'backlog':>8}{'down':>5}{'rows/h':>10}{'redis MB':>9}{'ctl CPU':>8}{'sampled':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['nodes']:>6}{r['instances']:>7}{r['beats_per_s']:>8}{r['lag_p50']:>8}{r['lag_p99']:>8}"
            f"{r['lag_max']:>7}{r['sim_late_p99']:>9}{r['backlog']:>8}{r['false_down']:>5}"
            f"{r['rows_per_hour']:>10}{r['redis_mb']:>9}{r['control_cpu']:>8}"
            f"{(str(r['metering_beat']) + ' s') if r.get('metering_beat') else 'every':>8}"
        )
    for r in rows:
        print(f"  N={r['nodes']}: most written tables per hour {r['top_tables']}")
        if "roll_s" in r:
            print(f"  N={r['nodes']}: the hour's roll: {r['roll_day_rows']} day rows in {r['roll_s']} s")
        if "list_first_p95_ms" in r:
            print(
                f"  N={r['nodes']}: list page p95 {r['list_first_p95_ms']} ms (first page, queries "
                f"{r['list_first_queries']}, CPU p50 {r.get('list_first_cpu_p50_ms')} ms), "
                f"{r['list_last_p95_ms']} ms (last page, queries {r['list_last_queries']}, CPU p50 "
                f"{r.get('list_last_cpu_p50_ms')} ms); burst of {sum(r['burst_statuses'].values())} in "
                f"{r['burst_s']} s: {r['burst_statuses']}, quota overshoot {r['burst_overshoot']}, "
                f"double placement {r['burst_double_placement']}"
            )
        if "idle_first_p95_ms" in r:
            print(
                f"  N={r['nodes']}: list page p95 before any beat {r['idle_first_p95_ms']} ms (first page, "
                f"queries {r['idle_first_queries']}, CPU p50 {r.get('idle_first_cpu_p50_ms')} ms), "
                f"{r['idle_last_p95_ms']} ms (last page, queries {r['idle_last_queries']}, CPU p50 "
                f"{r.get('idle_last_cpu_p50_ms')} ms)"
            )


def _one() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", type=int)
    parser.add_argument("--nodes")
    parser.add_argument("--instances", type=int, default=40)
    parser.add_argument("--period", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--control-workers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--pool", default="prefork")
    parser.add_argument("--json")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--api", action="store_true")
    parser.add_argument("--burst", type=int, default=500)
    parser.add_argument("--loglevel", default="WARNING")
    parser.add_argument("--metering-beat")
    parser.add_argument("--metering-one", type=int, default=60)
    args = parser.parse_args()
    print(json.dumps(one_run(args.one, args)))
    return 0


if __name__ == "__main__":
    sys.exit(_one() if "--one" in sys.argv else main())
