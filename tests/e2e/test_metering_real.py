"""Real heartbeats meter real workloads: a container (crun) and a VM (libvirt, the tiny sample guest).

The stack of tests/e2e/test_end_to_end.py (two compute workers, a control
worker, Redis, heartbeats every second) runs one container on a node
dedicated to its tenant and one VM; within a minute of each becoming active
the portal holds usage samples with non-zero memory (cgroup memory for the
container, QEMU's resident memory for the VM) and hour rows with running
time and used memory.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection

from portal.cloud.models import ComputeNode
from portal.metering.models import UsageHour, UsageSample
from portal.tenancy.models import Tenant
from tests.e2e import test_end_to_end as e2e
from tests.e2e.test_end_to_end import ROOT, Stack, _client, wait_for

stack = e2e.stack  # the end-to-end stack fixture

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.host, pytest.mark.slow]


def test_real_heartbeats_give_memory_samples_for_a_vm_and_a_container(stack: tuple[Stack, list[str]]) -> None:
    s, (node_a, node_b) = stack
    try:
        _run(node_a, node_b)
    except BaseException:
        print(s.logs())
        raise
    finally:
        connection.close()


def _run(node_a: str, node_b: str) -> None:
    Tenant.objects.create(slug="acme", name="Acme")
    call_command("bootstrap")
    call_command(
        "import_sample_images", "--dir", os.environ.get("SKYPORT_IMAGE_DIR", str(ROOT / "var/images"))
    )
    op = _client("m-operator", None, staff=True)
    acme = _client("m-acme", "acme")
    wait_for(
        "both nodes to register with healthy drivers",
        lambda: (
            ComputeNode.objects.filter(
                name__in=[node_a, node_b], status="up", drivers__vm__ok=True, drivers__container__ok=True
            ).count()
            == 2
        ),
        timeout=90,
    )
    r = op.patch(f"/api/v1/nodes/{node_a}/", {"tenancy": "dedicated", "owner": "acme"}, format="json")
    assert r.status_code == 200, r.json()
    flavor = op.get("/api/v1/flavors/", {"name": "m1.tiny"}).json()["results"][0]["id"]
    sample = op.get("/api/v1/images/", {"name": "sample"}).json()["results"][0]
    image = f"{sample['name']}:{sample['version']}"

    def launch(name: str, kind: str) -> dict[str, Any]:
        r = acme.post(
            "/api/v1/instances/",
            {"tenant": "acme", "name": name, "image": image, "flavor": flavor, "kind": kind},
            format="json",
        )
        assert r.status_code == 202, r.json()
        return r.json()  # type: ignore[no-any-return]

    def settled(iid: str, state: str) -> Any:
        def check() -> Any:
            got = acme.get(f"/api/v1/instances/{iid}/").json()
            assert got["vm_state"] != "error", got
            return got if got["vm_state"] == state and got["task_state"] is None else None

        return wait_for(f"{iid} {state}", check, timeout=180)

    ctr, vm = launch("meter-ct", "container"), launch("meter-vm", "vm")
    assert ctr["decided_kind"] == "container" and vm["decided_kind"] == "vm"
    try:
        for inst in (ctr, vm):
            settled(inst["id"], "active")
            sample = wait_for(
                f"a usage sample with memory for {inst['decided_kind']}",
                lambda iid=inst["id"]: UsageSample.objects.filter(
                    instance_id=iid, source="heartbeat", running=True, memory_bytes__gt=0
                ).first(),
                timeout=60,
            )
            print(
                f"{inst['decided_kind']}: {sample.memory_bytes / 2**20:.1f} MiB, cpu {sample.cpu_time_ns} ns"
            )
            assert sample.vcpus == 1 and sample.ram_mb > 0
            hours = wait_for(
                "an hour row with running time and used memory",
                lambda iid=inst["id"]: UsageHour.objects.filter(
                    instance_id=iid, running_ms__gt=0, memory_mib_ms__gt=0
                ).first(),
                timeout=30,
            )
            assert hours.ram_mib_ms >= hours.running_ms * sample.ram_mb
        usage = acme.get("/api/v1/usage/", {"tenant": "acme", "group_by": "kind"}).json()
        assert {line["key"] for line in usage["lines"]} == {"vm", "container"}
        assert all(float(line["running_hours"]) > 0 for line in usage["lines"])

        # seconds of a few MiB: the first interval between two heartbeats can be below the six decimals the
        # API shows (0.0000005 GiB-h is ~40 ms of 46 MiB); the next heartbeats add to the same hour row
        def vm_memory_shows() -> float | None:
            lines = acme.get("/api/v1/usage/", {"tenant": "acme", "group_by": "kind"}).json()["lines"]
            gib_h = float(next(x for x in lines if x["key"] == "vm")["used_memory_gib_hours"])
            return gib_h if gib_h > 0 else None

        gib_h = wait_for("the VM line to show used memory", vm_memory_shows, timeout=60)
        print(f"vm used memory: {gib_h} GiB-h")
    finally:
        for inst in (ctr, vm):
            acme.delete(f"/api/v1/instances/{inst['id']}/")
        for inst in (ctr, vm):
            settled(inst["id"], "deleted")
