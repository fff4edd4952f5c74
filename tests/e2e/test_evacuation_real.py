"""Node loss for real: a container and a VM on node A; A is lost; evacuated, both run on node B.

Real compute workers (crun, libvirt) for two nodes, a control worker, Redis
and the portal, as ``test_end_to_end`` starts them.  Both "nodes" share this
machine's kernel, network namespace and libvirtd: the namespace topology of
``test_multinode`` cannot run VMs (libvirtd plugs a VM's tap into a bridge of
its own namespace, not the node's).  On one host the lost node's workloads
cannot be left running either (a libvirt domain name and a tap name exist
once per host), so the test powers them off as a lost host would: it stops
A's worker (its own process group, by PID) and destroys A's container and
domain through A's drivers.  What a returning node does with copies the
portal moved away is tested against fake nodes (``tests/portal/test_evacuation.py``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection
from rest_framework.test import APIClient

from portal.cloud.models import ComputeNode, Evacuation
from portal.cloud.tasks import sweep
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

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.host, pytest.mark.slow]


def test_evacuate_a_lost_node_rebuilds_its_container_and_vm_on_another(
    request: pytest.FixtureRequest, settings: Any
) -> None:
    s, (node_a, node_b) = request.getfixturevalue("stack")  # test_end_to_end's two-node stack
    settings.SKYPORT_HEARTBEAT_SECONDS = 1  # as the workers beat (Stack's environment)
    try:
        _scenario(s, node_a, node_b)
    except BaseException:
        print(s.logs())
        raise


def _scenario(s: Stack, node_a: str, node_b: str) -> None:
    Tenant.objects.create(slug="acme", name="Acme")
    call_command("bootstrap")
    call_command(
        "import_sample_images", "--dir", os.environ.get("SKYPORT_IMAGE_DIR", str(ROOT / "var/images"))
    )
    op = _client("ev-operator", None, staff=True)
    acme = _client("ev-acme", "acme")
    wait_for(
        "both nodes up with healthy drivers",
        lambda: (
            ComputeNode.objects.filter(
                name__in=[node_a, node_b], status="up", drivers__vm__ok=True, drivers__container__ok=True
            ).count()
            == 2
        ),
        timeout=90,
    )
    for node in (node_a, node_b):
        r = op.patch(f"/api/v1/nodes/{node}/", {"tenancy": "dedicated", "owner": "acme"}, format="json")
        assert r.status_code == 200, r.json()
    flavor = op.get("/api/v1/flavors/", {"name": "m1.tiny"}).json()["results"][0]["id"]
    sample = op.get("/api/v1/images/", {"name": "sample"}).json()["results"][0]
    image = f"{sample['name']}:{sample['version']}"

    def launch(name: str, kind: str) -> dict[str, Any]:
        body = {"tenant": "acme", "name": name, "image": image, "flavor": flavor, "kind": kind}
        r = acme.post("/api/v1/instances/", body, format="json")
        assert r.status_code == 202, r.json()
        return r.json()  # type: ignore[no-any-return]

    def settled(c: APIClient, iid: str, state: str = "active") -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            got: dict[str, Any] = c.get(f"/api/v1/instances/{iid}/").json()
            assert got["vm_state"] != "error", got
            return got if got["vm_state"] == state and got["task_state"] is None else None

        return wait_for(f"instance {iid} to be {state}", check, timeout=180)  # type: ignore[no-any-return]

    # 1. both on A (B disabled meanwhile), both running
    ComputeNode.objects.filter(name=node_b).update(status="disabled")
    ctr, vm = launch("box", "container"), launch("vm", "vm")
    assert ctr["node"] == vm["node"] == node_a
    ctr, vm = settled(acme, ctr["id"]), settled(acme, vm["id"])
    ComputeNode.objects.filter(name=node_b).update(status="up")
    addresses = {i["name"]: i["addresses"][0]["address"] for i in (ctr, vm)}

    # 2. refused while A lives
    r = op.post(f"/api/v1/nodes/{node_a}/evacuate/")
    assert r.status_code == 409, r.json()

    # 3. A is lost: its worker stops (the process group this test started), its workloads go dark
    worker = s.procs[1]  # Stack.start_cluster: control, node A, node B
    assert f"node.{node_a}" in str(worker.args)
    lost_at = time.monotonic()
    os.killpg(worker.pid, signal.SIGTERM)
    worker.wait(30)
    _power_off(s, node_a, [ctr["id"], vm["id"]])
    wait_for(
        f"{node_a} marked down by the sweeper", lambda: sweep()["down"] >= 1 or _down(node_a), timeout=30
    )
    down_s = time.monotonic() - lost_at

    # 4. evacuate: both rebuilt on B, same addresses, reachable there
    r = op.post(f"/api/v1/nodes/{node_a}/evacuate/")
    assert r.status_code == 202, r.json()
    body = r.json()
    assert body["counts"] == {"rebuilding": 2}, body
    assert {m["target"] for m in body["instances"]} == {node_b}
    started = time.monotonic()
    got = {name: settled(acme, i["id"]) for name, i in (("box", ctr), ("vm", vm))}
    rebuilt_s = time.monotonic() - started
    for name, inst in got.items():
        assert (inst["node"], inst["power_state"]) == (node_b, "running"), inst
        assert inst["addresses"][0]["address"] == addresses[name]
    assert (s.base / node_b / "containers" / f"sky-{ctr['id']}").is_dir()
    domains = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--name"], capture_output=True, text=True, timeout=30
    ).stdout
    assert f"sky-{vm['id']}" in domains
    assert _ping(addresses["box"], timeout=30), "the container answers on B"
    assert _ping(addresses["vm"], timeout=90), "the VM answers on B"
    answered_s = time.monotonic() - started
    print(
        f"evacuation: {node_a} down {down_s:.1f} s after its worker was stopped (sweeper, 1 s beats); "
        f"both active on {node_b} {rebuilt_s:.1f} s after the evacuate call, "
        f"both answering ping {answered_s:.1f} s after it"
    )
    ev = {e.instance_id: e for e in Evacuation.objects.all()}
    assert {str(k) for k in ev} == {ctr["id"], vm["id"]}
    assert all(e.source.name == node_a and e.target and e.target.name == node_b for e in ev.values())

    # 5. delete both on B; the node cleans up
    for inst in (ctr, vm):
        assert acme.delete(f"/api/v1/instances/{inst['id']}/").status_code == 202
    for inst in (ctr, vm):
        settled(acme, inst["id"], "deleted")
    connection.close()


def _down(node: str) -> bool:
    return ComputeNode.objects.filter(name=node, status="down").exists()


def _power_off(s: Stack, node: str, ids: list[str]) -> None:
    """What losing the host does to its workloads, through the node's own drivers."""
    from compute.config import NodeConfig
    from compute.drivers.container import ContainerDriver
    from compute.drivers.vm import LibvirtDriver

    cfg = NodeConfig(
        node, s.base / node, "qemu:///system", os.environ.get("SKYPORT_ACCEL", "auto"), "crun", BROKER
    )
    for driver in (ContainerDriver(cfg), LibvirtDriver(cfg)):
        for iid in ids:
            driver.destroy(iid)
