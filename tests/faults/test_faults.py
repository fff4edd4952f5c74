"""Faults: each ends with every instance in a true state, nothing lost, no orphans after a reconcile.

Real workers, real Redis (the test's own), real libvirt and crun; see conftest.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from portal.audit.models import Event
from portal.cloud import dispatch
from portal.cloud.models import Instance, UnsentMessage
from portal.tenancy.models import Quota, Tenant
from tests.e2e.test_end_to_end import wait_for
from tests.faults.conftest import (
    RESEND_AFTER,
    VISIBILITY,
    Cluster,
    acme_client,
    assert_true_and_no_orphans,
    launch,
    settled,
)
from tests.hostcaps import libvirtd_lock, require_binary, require_root

pytestmark = [pytest.mark.host, pytest.mark.slow]


def _node_drivers(cluster: Cluster) -> tuple[Any, Any]:
    from compute.config import NodeConfig
    from compute.drivers.container import ContainerDriver
    from compute.drivers.vm import LibvirtDriver

    cfg = NodeConfig(cluster.node, cluster.base / cluster.node, "qemu:///system", "auto", "crun", "")
    return LibvirtDriver(cfg), ContainerDriver(cfg)


def _delete_all(c: Any) -> None:
    live = list(Instance.objects.live())
    for inst in live:
        assert c.delete(f"/api/v1/instances/{inst.pk}/").status_code == 202
    for inst in live:
        settled(c, str(inst.pk), "deleted")


def test_compute_worker_killed_in_the_middle_of_a_create(cluster: Cluster) -> None:
    c = acme_client()
    log = cluster.base / f"{cluster.node}.log"
    before = log.read_text().count("compute.instance.create")
    vm = launch(c, "survivor", kind="vm")
    wait_for("the node to take the create", lambda: log.read_text().count("compute.instance.create") > before,
             timeout=30, every=0.01)  # fmt: skip
    killed = time.monotonic()
    cluster.kill_compute()  # kill -9 of the worker, its pool and its heartbeat
    got = c.get(f"/api/v1/instances/{vm['id']}/").json()
    assert got["task_state"] == "spawning", got
    # A restarted worker's consumer gives back the messages taken longer ago than the visibility
    # timeout when it starts, and after that only every 100 s (kombu's Redis transport checks
    # every 10 s and acts on every 10th check; docs/faults.md).  A worker restarted by its service
    # manager after a crash is back after a few seconds; this one waits the timeout out first.
    time.sleep(max(0.0, killed + float(VISIBILITY) + 0.5 - time.monotonic()))
    cluster.start_compute()
    # the unacknowledged message is delivered again; spawning is idempotent by instance id
    got = settled(c, vm["id"], timeout=120)
    assert got["power_state"] == "running"
    vms, _ = _node_drivers(cluster)
    assert [i.instance_id for i in vms.list()].count(vm["id"]) == 1
    assert_true_and_no_orphans(cluster)
    _delete_all(c)
    assert_true_and_no_orphans(cluster)


def test_redis_restarted_during_a_burst_of_100_creates(cluster: Cluster) -> None:
    tenant = Tenant.objects.get(slug="acme")
    Quota.objects.filter(tenant=tenant).update(
        instances=100, containers=100, vcpus=200, ram_mb=200 * 1024, disk_gb=1000
    )
    clients = [acme_client() for _ in range(4)]
    flavor = clients[0].get("/api/v1/flavors/", {"name": "m1.tiny"}).json()["results"][0]["id"]
    results: list[int] = []
    lock = threading.Lock()

    busy: list[int] = []
    body = {"tenant": "acme", "image": "busybox", "flavor": flavor, "kind": "container"}

    def one(i: int) -> None:
        # a client as the API asks: a 503 (SQLite's writer lock not granted within 30 s on a loaded
        # host: 100 writers at once) created nothing and says when to try again (Retry-After)
        for _ in range(6):
            r = clients[i % 4].post("/api/v1/instances/", body | {"name": f"b{i}"}, format="json")
            if r.status_code != 503:
                break
            with lock:
                busy.append(i)
            connection.close()
            time.sleep(float(r["Retry-After"]))
        with lock:
            results.append(r.status_code)
        connection.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(100)]
    for t in threads[:50]:
        t.start()
    cluster.redis.stop()  # a clean restart in the middle of the burst
    time.sleep(1.0)
    for t in threads[50:]:
        t.start()
    cluster.redis.start()
    for t in threads:
        t.join(120)
    # never a 500: a create whose message the broker refused after its commit is kept
    assert sorted(set(results)) == [202], results
    kept = UnsentMessage.objects.count()
    print(f"burst of 100: {len(busy)} answers 503 + Retry-After, retried; {kept} message(s) kept unsent")
    assert Instance.objects.live().count() == 100

    def running() -> bool:
        dispatch.flush()  # what the beat's sweep does every 5 s: the kept messages go out
        return Instance.objects.live().filter(vm_state="active", task_state__isnull=True).count() == 100

    # nothing lost: every create reaches the node and runs
    try:
        wait_for("100 containers running", running, timeout=240, every=1)
    except AssertionError as exc:
        behind = Instance.objects.live().exclude(vm_state="active", task_state__isnull=True)
        states = [(str(i.pk), i.vm_state, i.task_state, i.power_state, i.status_reason) for i in behind]
        raise AssertionError(f"{exc}; {len(states)} behind: {states}") from None
    assert not Instance.objects.filter(vm_state="error").exists()
    assert_true_and_no_orphans(cluster)
    _delete_all(clients[0])
    assert_true_and_no_orphans(cluster)


def test_a_create_the_broker_lost_is_sent_again(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The create never reaches the node (as kombu loses a message popped when Redis restarts):
    the node's heartbeats do not list its action id, its queue is empty, and the control worker
    sends it again (portal/cloud/resend.py)."""
    real = dispatch._send
    lost: list[str] = []

    def lose_the_first_create(queue: str, task: str, args: list[Any]) -> None:
        if task == "compute.instance.create" and not lost:
            lost.append(args[0]["action_id"])
            return
        real(queue, task, args)

    monkeypatch.setattr(dispatch, "_send", lose_the_first_create)
    c = acme_client()
    t0 = time.monotonic()
    app = launch(c, "lost-once", kind="container")
    got = settled(c, app["id"], timeout=90)
    took = time.monotonic() - t0
    assert lost and got["power_state"] == "running"
    (resent,) = Event.objects.filter(object_id=app["id"], action="dispatch.resend")
    assert resent.request_id == lost[0] and "did not take the compute.instance.create" in resent.message
    print(f"a lost create: sent again and running {took:.1f} s after the POST (resend: {RESEND_AFTER} s)")
    assert_true_and_no_orphans(cluster)
    _delete_all(c)
    assert_true_and_no_orphans(cluster)


def test_an_observation_the_broker_lost_gets_the_create_sent_again(cluster: Cluster) -> None:
    """The node creates the container and sends its observation; the observation vanishes from
    the ``control`` queue before the control worker reads it (as kombu can lose a popped message).
    The node's heartbeat says it handled the create; the control worker sends it again, and the
    node finds the container there and observes again."""
    control = cluster.stack.procs[0]
    os.killpg(control.pid, signal.SIGTERM)  # nobody reads the control queue for a moment
    control.wait(30)
    c = acme_client()
    app = launch(c, "unheard", kind="container")
    action_id = Instance.objects.get(pk=app["id"]).action_id
    node_log = cluster.base / f"{cluster.node}.log"
    wait_for(
        "the node to finish the create",
        lambda: re.search(r"Task compute\.instance\.create\[[0-9a-f-]+\] succeeded", node_log.read_text()),
        timeout=60,
        every=0.2,
    )
    redis = ["redis-cli", "-p", str(cluster.redis.port)]

    def observations() -> list[str]:
        out = subprocess.run([*redis, "lrange", "control", "0", "-1"], capture_output=True, text=True).stdout
        return [m for m in out.splitlines() if '"portal.observe"' in m and action_id in _body(m)]

    wait_for("the observation in the control queue", observations, timeout=30, every=0.2)
    for message in observations():  # lost on the way
        subprocess.run([*redis, "lrem", "control", "0", message], check=True, capture_output=True)
    cluster.stack.start(
        "control", "-A", "portal", "worker", "-Q", "control", "--pool", "threads", "--concurrency", "4"
    )
    t0 = time.monotonic()
    got = settled(c, app["id"], timeout=90)
    assert got["power_state"] == "running"
    (resent,) = Event.objects.filter(object_id=app["id"], action="dispatch.resend")
    assert resent.request_id == action_id and "its observation did not arrive" in resent.message
    print(
        f"a lost observation: the create sent again, running {time.monotonic() - t0:.1f} s after the restart"
    )
    assert Event.objects.filter(object_id=app["id"], action="node.create").count() == 1
    assert_true_and_no_orphans(cluster)
    _delete_all(c)
    assert_true_and_no_orphans(cluster)


def _body(message: str) -> str:
    """A Celery message's decoded body (base64 in the Redis list)."""
    import base64
    import json

    try:
        return base64.b64decode(json.loads(message)["body"]).decode()
    except (ValueError, KeyError):
        return ""


def _libvirtd_pid() -> int:
    return int(Path("/var/run/libvirtd.pid").read_text().strip())


def test_libvirtd_killed_while_vms_run(cluster: Cluster) -> None:
    with libvirtd_lock(alone=True):  # tests/run's other lanes boot VMs on the same libvirtd
        _libvirtd_killed_while_vms_run(cluster)


def _libvirtd_killed_while_vms_run(cluster: Cluster) -> None:
    c = acme_client()
    vm = launch(c, "steady", kind="vm")
    settled(c, vm["id"])
    vms, _ = _node_drivers(cluster)
    qemu_pid = vms.info(vm["id"]).pid
    assert qemu_pid
    os.kill(_libvirtd_pid(), signal.SIGKILL)
    # the node reports its VM driver down; the VM is not declared missing
    wait_for(
        "the node to report libvirt down",
        lambda: cluster.node_row().drivers.get("vm", {}).get("ok") is False,
        timeout=30,
    )
    time.sleep(2.5)  # a few more heartbeats while libvirtd is away
    got = c.get(f"/api/v1/instances/{vm['id']}/").json()
    assert (got["vm_state"], got["power_state"]) == ("active", "running"), got
    os.kill(qemu_pid, 0)  # the guest kept running without libvirtd
    subprocess.run([str(Path(__file__).resolve().parents[2] / "compute/host/start-libvirtd.sh")], check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    cluster.wait_node_up(vm=True)
    assert vms.info(vm["id"]).pid == qemu_pid, "the same QEMU process, found again by the new libvirtd"
    assert_true_and_no_orphans(cluster)
    _delete_all(c)
    assert_true_and_no_orphans(cluster)


def test_workloads_destroyed_behind_the_portals_back(cluster: Cluster) -> None:
    c = acme_client()
    vm, ctr = launch(c, "vm-gone", kind="vm"), launch(c, "ctr-gone", kind="container", image="busybox")
    settled(c, vm["id"])
    settled(c, ctr["id"])
    _, ctrs = _node_drivers(cluster)
    subprocess.run(["virsh", "-c", "qemu:///system", "destroy", f"sky-{vm['id']}"], check=True,
                   capture_output=True)  # fmt: skip
    pid = ctrs.info(ctr["id"]).pid
    os.kill(pid, signal.SIGKILL)
    wait_for(
        "reconcile to see both",
        lambda: (
            {i.power_state for i in Instance.objects.filter(pk__in=[vm["id"], ctr["id"]])}
            <= {"shutdown", "crashed", "nostate"}
        ),
        timeout=30,
    )
    assert Event.objects.filter(action="reconcile.power_state", object_id=vm["id"]).exists()
    assert Event.objects.filter(action="reconcile.power_state", object_id=ctr["id"]).exists()
    assert Instance.objects.get(pk=vm["id"]).vm_state == "stopped"
    assert_true_and_no_orphans(cluster)
    # the portal can act on the true state: start both again
    for inst in (vm, ctr):
        assert (
            c.post(f"/api/v1/instances/{inst['id']}/actions/", {"action": "start"}, format="json").status_code
            == 202
        )
    for inst in (vm, ctr):
        assert settled(c, inst["id"])["power_state"] == "running"
    _delete_all(c)
    assert_true_and_no_orphans(cluster)


def _task_runs(log: Path, task: str, task_id: str) -> list[str]:
    """How the worker ended each run of ``task_id``, from its log (celery's INFO line per run)."""
    ended = re.compile(rf"Task {re.escape(task)}\[{re.escape(task_id)}\] (succeeded|raised|failed)")
    return ended.findall(log.read_text(errors="replace"))


def _observations(log: Path) -> list[str]:
    """What the control worker's ``portal.observe`` runs returned ("applied", "duplicate", ...),
    or "raised" for a run that failed, in the order of the log."""
    ended = re.compile(r"Task portal\.observe\[[0-9a-f-]+\] (?:succeeded in \S+s: '(\w+)'|(raised))")
    return [m[0] or m[1] for m in ended.findall(log.read_text(errors="replace"))]


def test_the_same_node_message_delivered_twice(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every node message goes out twice with one task id, as a broker redelivery sends it."""

    sent: list[tuple[str, str]] = []

    def twice(queue: str, task: str, args: list[Any]) -> None:
        task_id = str(uuid.uuid4())
        sent.append((task, task_id))
        for _ in range(2):
            cluster.app.send_task(task, args=args, queue=queue, task_id=task_id)

    monkeypatch.setattr(dispatch, "_send", twice)
    node_log, control_log = cluster.base / f"{cluster.node}.log", cluster.base / "control.log"

    def both_copies_handled(task: str, observed_before: int) -> list[str]:
        """Wait for the node to finish both runs of the message and for the control worker to
        handle both of their observations; return what the two observations did."""
        (task_id,) = [tid for name, tid in sent if name == task]
        wait_for(
            f"the node to run both copies of {task}[{task_id}]",
            lambda: len(_task_runs(node_log, task, task_id)) >= 2,
            timeout=60,
            every=0.2,
        )
        assert _task_runs(node_log, task, task_id) == ["succeeded", "succeeded"]
        wait_for(
            "the control worker to handle both observations",
            lambda: len(_observations(control_log)) >= observed_before + 2,
            timeout=60,
            every=0.2,
        )
        return sorted(_observations(control_log)[observed_before:])

    c = acme_client()
    observed = len(_observations(control_log))
    ctr = launch(c, "dup", kind="container", image="busybox")
    settled(c, ctr["id"])
    assert both_copies_handled("compute.instance.create", observed) == ["applied", "duplicate"]
    _, ctrs = _node_drivers(cluster)
    assert [i.instance_id for i in ctrs.list()].count(ctr["id"]) == 1
    applied = Event.objects.filter(action="node.create", object_id=ctr["id"]).count()
    assert applied == 1, "the duplicate observation is recognised by its action id"
    assert_true_and_no_orphans(cluster)

    observed = len(_observations(control_log))
    _delete_all(c)
    assert both_copies_handled("compute.instance.delete", observed) == ["applied", "duplicate"]
    assert Event.objects.filter(action="node.delete", object_id=ctr["id"]).count() == 1
    assert_true_and_no_orphans(cluster)


@pytest.mark.django_db
def test_image_store_disk_fills_up_during_an_upload(settings: Any, tmp_path: Path) -> None:
    """A 16 MiB tmpfs as the image store: a 24 MiB upload hits ENOSPC half way; nothing is kept."""
    from rest_framework.test import APIClient

    from portal.images.models import Image
    from tests.portal.conftest import make_user
    from tests.portal.imagefiles import qcow2

    require_root()
    require_binary("qemu-img")
    mnt = tmp_path / "store"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        settings.SKYPORT_IMAGE_STORE = mnt
        tenant = Tenant.objects.create(slug="full", name="Full")
        user = make_user("filler")
        from portal.tenancy.models import Membership

        Membership.objects.create(user=user, tenant=tenant, role="member")
        c = APIClient()
        c.force_login(user)
        image = Image.objects.create(name="big", version="1", owner=tenant)
        body = os.urandom(24 << 20)
        r = c.put(f"/api/v1/images/{image.pk}/file/?type=raw", body, content_type="application/octet-stream")
        assert r.status_code == 507, r.content
        assert "store is full" in r.json()["message"]
        image.refresh_from_db()
        assert image.status == "queued", "the image can take the upload again once there is room"
        assert list((mnt / "tmp").iterdir()) == [] and list((mnt / "blobs/sha256").iterdir()) == []
        # with room again, a smaller disk goes through
        small = qcow2(tmp_path / "small.qcow2", "8M").read_bytes()
        r = c.put(
            f"/api/v1/images/{image.pk}/file/?type=qcow2", small, content_type="application/octet-stream"
        )
        assert r.status_code == 202, r.content
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
