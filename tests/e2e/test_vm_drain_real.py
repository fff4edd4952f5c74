"""A drain migrates a running VM for real: its disk, with what the guest wrote on it, runs on node B.

The two-node stack of ``test_end_to_end`` (real compute workers with libvirt,
a control worker, Redis, the portal on a local port), as
``test_evacuation_real`` uses it: the namespace topology of ``test_multinode``
cannot run VMs (libvirtd plugs a VM's tap into a bridge of its own network
namespace).  Both nodes share this machine's libvirtd, where a domain name
exists once, and during a cold migration the VM exists on both nodes (stopped
on A until B runs it): so B's worker is started again with a domain prefix of
its own (``SKYPORT_DOMAIN_PREFIX``), as two hosts would have two daemons.  The
control worker is started again with the portal's URL, secret key and image
store, since its steps (the upload token, the blob location, the import) meet
the portal serving in this process.

The guest is the tiny sample VM; its user-data writes a random marker to its
disk (beyond the boot partition) on its first boot and prints what it finds on
every boot: the target must print the marker the source wrote.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.core.management import call_command
from django.db import connection

from portal.audit.models import Event
from portal.cloud.models import ComputeNode, Evacuation
from portal.images.models import Image
from portal.tenancy.models import Tenant
from tests.e2e.test_end_to_end import (  # noqa: F401 -- stack is a fixture
    BROKER,
    ROOT,
    Stack,
    _client,
    _ping,
    stack,
    wait_for,
)
from tests.netcleanup import table_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.host, pytest.mark.slow]

B_PREFIX = "skyb-"
#: first boot: write a marker 100 MiB into the disk (past the 64 MiB boot partition); every boot: say it
MARKER_SCRIPT = """#!/bin/sh
m=$(dd if=/dev/vda bs=1M skip=100 count=1 2>/dev/null | head -c 41 | tr -dc 'A-Za-z0-9-')
case "$m" in
MARK-*) echo "SKYPORT-MARKER found $m" ;;
*) t="MARK-$(cat /proc/sys/kernel/random/uuid)"
   printf '%s' "$t" | dd of=/dev/vda bs=1M seek=100 conv=notrunc,fsync 2>/dev/null
   sync
   echo "SKYPORT-MARKER wrote $t" ;;
esac
"""


def test_drain_migrates_a_running_vm_with_its_disk_to_another_node(
    request: pytest.FixtureRequest, settings: Any
) -> None:
    s, (node_a, node_b) = request.getfixturevalue("stack")
    settings.SKYPORT_HEARTBEAT_SECONDS = 1  # as the workers beat (Stack's environment)
    vm_id = ""
    try:
        vm_id = _scenario(s, node_a, node_b)
    except BaseException:
        print(s.logs())
        raise
    finally:
        _destroy_on_b(s, node_b, vm_id)


def _restart(s: Stack, index: int, name: str, args: list[str], **env: str) -> None:
    """Stop one worker this test's stack started (its process group, by PID) and start it again."""
    old = s.procs[index]
    assert name in " ".join(str(a) for a in old.args)
    os.killpg(old.pid, signal.SIGTERM)
    old.wait(30)
    s.start(name, *args, **env)


def _console(s: Stack, node: str, iid: str) -> str:
    path = s.base / node / "logs" / f"{iid}.console.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _scenario(s: Stack, node_a: str, node_b: str) -> str:
    from portal.images.nodekeys import node_key

    portal = django_settings.SKYPORT_PORTAL_URL
    _restart(
        s,
        0,
        "control",
        ["-A", "portal", "worker", "-Q", "control", "--pool", "threads", "--concurrency", "4"],
        SKYPORT_PORTAL_URL=portal,
        SKYPORT_SECRET_KEY=django_settings.SECRET_KEY,
        SKYPORT_IMAGE_STORE=str(django_settings.SKYPORT_IMAGE_STORE),
    )
    _restart(
        s,
        2,
        node_b,
        ["-A", "compute.worker", "worker", "-Q", f"node.{node_b}", "--concurrency", "2"],
        SKYPORT_NODE_NAME=node_b,
        SKYPORT_NODE_DIR=str(s.base / node_b),
        SKYPORT_NODE_KEY=node_key(node_b),
        SKYPORT_NFT_TABLE=table_for(node_b),
        SKYPORT_DOMAIN_PREFIX=B_PREFIX,
    )
    Tenant.objects.create(slug="acme", name="Acme")
    call_command("bootstrap")
    call_command(
        "import_sample_images", "--dir", os.environ.get("SKYPORT_IMAGE_DIR", str(ROOT / "var/images"))
    )
    op = _client("mv-operator", None, staff=True)
    acme = _client("mv-acme", "acme")
    wait_for(
        "both nodes up with a healthy VM driver",
        lambda: (
            ComputeNode.objects.filter(name__in=[node_a, node_b], status="up", drivers__vm__ok=True).count()
            == 2
        ),
        timeout=90,
    )
    flavor = op.get("/api/v1/flavors/", {"name": "m1.tiny"}).json()["results"][0]["id"]
    tiny = op.get("/api/v1/images/", {"name": "tiny"}).json()["results"][0]
    sample = f"{tiny['name']}:{tiny['version']}"

    def settled(iid: str, state: str = "active", node: str | None = None) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            got: dict[str, Any] = acme.get(f"/api/v1/instances/{iid}/").json()
            assert got["vm_state"] != "error", got
            ready = got["vm_state"] == state and got["task_state"] is None
            return got if ready and (node is None or got["node"] == node) else None

        return wait_for(f"instance {iid} {state} on {node or 'its node'}", check, timeout=240)  # type: ignore[no-any-return]

    # 1. a running VM on A (B disabled meanwhile); its first boot writes the marker on its disk
    ComputeNode.objects.filter(name=node_b).update(status="disabled")
    body = {"tenant": "acme", "name": "mover", "image": sample, "flavor": flavor, "kind": "vm"}
    r = acme.post("/api/v1/instances/", body | {"user_data": MARKER_SCRIPT}, format="json")
    assert r.status_code == 202, r.json()
    vm = r.json()
    assert vm["node"] == node_a
    vm = settled(vm["id"])
    ComputeNode.objects.filter(name=node_b).update(status="up")
    address = vm["addresses"][0]["address"]
    wrote = wait_for(
        "the guest to write its marker",
        lambda: re.search(r"SKYPORT-MARKER wrote (MARK-[0-9a-f-]{36})", _console(s, node_a, vm["id"])),
        timeout=120,
    ).group(1)
    assert _ping(address, timeout=60), "the VM answers on A"

    # 2. drain A: the VM is migrated cold to B
    started = time.monotonic()
    r = op.post(f"/api/v1/nodes/{node_a}/drain/")
    assert r.status_code == 202, r.json()
    (move,) = r.json()["instances"]
    assert (move["result"], move["target"]) == ("migrating", node_b), move
    got = settled(vm["id"], node=node_b)
    moved_s = time.monotonic() - started
    assert (got["power_state"], got["addresses"][0]["address"]) == ("running", address), got
    found = wait_for(
        "the guest on B to find its marker",
        lambda: re.search(r"SKYPORT-MARKER (\w+) (MARK-[0-9a-f-]{36})", _console(s, node_b, vm["id"])),
        timeout=120,
    )
    assert found.groups() == ("found", wrote), "B boots the disk A wrote"
    assert _ping(address, timeout=90), "the VM answers on B at its address"
    answered_s = time.monotonic() - started

    # 3. the copy on A is destroyed, the hidden image deleted; the steps are in the events
    wait_for(
        "A's copy destroyed",
        lambda: Evacuation.objects.filter(instance_id=vm["id"], step="", cleaned_at__isnull=False).exists(),
        timeout=60,
    )
    domains = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.split()
    assert f"{B_PREFIX}{vm['id']}" in domains and f"sky-{vm['id']}" not in domains
    assert not Image.objects.filter(hidden=True).exists()
    rows = list(
        Event.objects.filter(object_id=vm["id"], action="instance.migrate")
        .order_by("created_at", "pk")
        .values_list("created_at", "message")
    )
    steps = [m for _, m in rows]
    assert len(steps) == 5, steps
    sent = re.search(r"sent its disk: (sha256:[0-9a-f]{64}), (\d+) bytes \((.*)\)", steps[2])
    assert sent, steps
    gaps = [(b - a).total_seconds() for (a, _), (b, _) in itertools.pairwise(rows)]
    print(
        f"drain migration: {node_a} -> {node_b}: running on B {moved_s:.1f} s after the drain call, "
        f"answering ping {answered_s:.1f} s after it; disk sent {int(sent.group(2)):,} bytes "
        f"({sent.group(3)}); steps (s): stop {gaps[0]:.2f}, send {gaps[1]:.2f}, "
        f"import {gaps[2]:.2f}, create {gaps[3]:.2f}; marker {wrote} found on B; "
        f"load {Path('/proc/loadavg').read_text().split()[:3]}"
    )

    # 4. delete it on B; the node cleans up
    assert acme.delete(f"/api/v1/instances/{vm['id']}/").status_code == 202
    settled(vm["id"], "deleted")
    connection.close()
    return str(vm["id"])


def _destroy_on_b(s: Stack, node_b: str, iid: str) -> None:
    """B's domains have a prefix of their own: the stack's clean-up (default prefix) would miss them."""
    from compute.config import NodeConfig
    from compute.drivers import vm as vm_driver

    ids = [iid] if iid else [str(i) for i in _instance_ids()]
    was = vm_driver.PREFIX
    vm_driver.PREFIX = B_PREFIX
    try:
        cfg = NodeConfig(
            node_b, s.base / node_b, "qemu:///system", os.environ.get("SKYPORT_ACCEL", "auto"), "crun", BROKER
        )
        driver = vm_driver.LibvirtDriver(cfg)
        for one in ids:
            driver.destroy(one)
    finally:
        vm_driver.PREFIX = was


def _instance_ids() -> list[Any]:
    from portal.cloud.models import Instance

    return list(Instance.objects.values_list("pk", flat=True))
