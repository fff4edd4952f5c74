"""Node loss in the namespace topology: a lost node comes back still running a moved container.

The three "hosts" of ``test_multinode`` (network namespaces joined by an
underlay, a real compute worker in each; h1 and h2 dedicated to acme, h3 to
bobco).  acme's container runs on h1; h1's worker stops (the process group
this test started, by PID) while the container keeps running, as on a node
whose worker or network died; the sweeper marks h1 down and an operator
evacuates it: the container is rebuilt on h2 (never on bobco's h3).  Then h1's
worker starts again with its old container still there: its queue and its
reconcile destroy that copy, and the one on h2 keeps running.

One kernel serves all three hosts: each worker has a cgroup tree of its own
(``SKYPORT_CGROUP_PARENT``), as separate hosts would, or both copies would
share the container's cgroup and crun's ``delete --force`` of h1's copy
would kill h2's too (the first run of this test found that).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
from django.db import connection

from portal.cloud.models import ComputeNode, Evacuation, Instance
from portal.cloud.tasks import sweep
from portal.images.nodekeys import node_key
from tests.e2e import test_multinode as mn
from tests.e2e.test_end_to_end import Stack, _client, wait_for
from tests.e2e.test_multinode import Underlay, _container_pid, cluster  # noqa: F401 -- cluster is a fixture
from tests.netcleanup import table_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.host, pytest.mark.slow]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


#: an underlay of this test's own, so it may run beside test_multinode (whose is 198.19.0.0/24)
UNDERLAY_HOST = "198.19.9.1"
HOSTS = {"h1": "198.19.9.11", "h2": "198.19.9.12", "h3": "198.19.9.13"}


def test_returning_node_destroys_the_copy_the_portal_moved(
    request: pytest.FixtureRequest, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mn, "UNDERLAY_HOST", UNDERLAY_HOST)
    monkeypatch.setattr(mn, "HOSTS", HOSTS)
    stack, underlay, nodes = request.getfixturevalue("cluster")
    settings.SKYPORT_HEARTBEAT_SECONDS = 1  # as the workers beat (Stack's environment)
    try:
        _scenario(stack, underlay, nodes)
    except BaseException:
        print(stack.logs())
        raise


def _scenario(stack: Stack, underlay: Underlay, nodes: dict[str, str]) -> None:
    base = stack.base
    version = mn.seed_tenants_and_busybox()
    op = _client("ev-operator", None, staff=True)
    acme = _client("ev-acme", "acme")
    wait_for(
        "three nodes up with a healthy container driver",
        lambda: (
            ComputeNode.objects.filter(
                name__in=nodes.values(), status="up", drivers__container__ok=True
            ).count()
            == 3
        ),
        timeout=90,
    )
    mn.dedicate(op, nodes)
    flavor = op.get("/api/v1/flavors/", {"name": "m1.tiny"}).json()["results"][0]["id"]

    def settled(iid: str, state: str = "active", node: str | None = None) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            got: dict[str, Any] = acme.get(f"/api/v1/instances/{iid}/").json()
            assert got["vm_state"] != "error", got
            done = got["vm_state"] == state and got["task_state"] is None
            return got if done and (node is None or got["node"] == node) else None

        return wait_for(f"instance {iid} to be {state}", check, timeout=120)  # type: ignore[no-any-return]

    # 1. acme's container on h1 (h2 disabled meanwhile)
    ComputeNode.objects.filter(name=nodes["h2"]).update(status="disabled")
    body = {
        "tenant": "acme",
        "name": "box",
        "image": f"busybox:{version}",
        "flavor": flavor,
        "kind": "container",
    }
    r = acme.post("/api/v1/instances/", body, format="json")
    assert r.status_code == 202, r.json()
    box = settled(r.json()["id"])
    assert box["node"] == nodes["h1"]
    ComputeNode.objects.filter(name=nodes["h2"]).update(status="up")
    old_pid = _container_pid(base, nodes["h1"], box["id"])

    # 2. h1's worker stops; its container keeps running
    worker = stack.procs[1]  # the cluster fixture starts the control worker, then h1, h2, h3
    assert f"node.{nodes['h1']}" in str(worker.args)
    os.killpg(worker.pid, signal.SIGTERM)
    worker.wait(30)
    assert _alive(old_pid), "the container outlives its node's worker"
    wait_for(f"{nodes['h1']} down", lambda: sweep()["down"] >= 1 or _down(nodes["h1"]), timeout=30)

    # 3. evacuate: rebuilt on h2, acme's other node, never on bobco's h3
    r = op.post(f"/api/v1/nodes/{nodes['h1']}/evacuate/")
    assert r.status_code == 202, r.json()
    assert [(m["name"], m["result"], m["target"]) for m in r.json()["instances"]] == [
        ("box", "rebuilding", nodes["h2"])
    ]
    moved = settled(box["id"], node=nodes["h2"])
    assert moved["addresses"] == box["addresses"]
    new_pid = _container_pid(base, nodes["h2"], box["id"])
    assert new_pid != old_pid and _alive(new_pid)

    # 4. h1 comes back with its old copy: the copy is destroyed, h2's is kept
    back = time.monotonic()
    h1 = nodes["h1"]
    stack.start(
        h1, "-A", "compute.worker", "worker", "-Q", f"node.{h1}", "--concurrency", "2",
        wrap=("nsenter", f"--net=/run/netns/{underlay.netns['h1']}", "--"),
        SKYPORT_NODE_NAME=h1, SKYPORT_NODE_DIR=str(base / h1), SKYPORT_NODE_KEY=node_key(h1),
        SKYPORT_TUNNEL_ADDRESS=HOSTS["h1"], SKYPORT_NFT_TABLE=table_for(h1),
        SKYPORT_CGROUP_PARENT=f"skyport-{h1}",
    )  # fmt: skip
    wait_for("the old copy on h1 to be gone", lambda: not _alive(old_pid), timeout=60)
    gone_s = time.monotonic() - back
    wait_for(
        "the evacuation to be closed",
        lambda: not Evacuation.objects.filter(instance_id=box["id"], cleaned_at__isnull=True).exists(),
        timeout=30,
    )
    assert not (base / h1 / "containers" / f"sky-{box['id']}").exists()
    assert _alive(new_pid), "never the other way round"
    inst = Instance.objects.select_related("node").get(pk=box["id"])
    assert inst.node is not None
    assert (inst.node.name, inst.vm_state, inst.power_state) == (nodes["h2"], "active", "running")
    wait_for("h1 up again", lambda: ComputeNode.objects.filter(name=h1, status="up").exists(), timeout=30)
    assert ComputeNode.objects.get(name=h1).orphans == []
    print(f"returning node: the moved copy on h1 was gone {gone_s:.1f} s after its worker started again")

    # 5. delete; h2 cleans up
    assert acme.delete(f"/api/v1/instances/{box['id']}/").status_code == 202
    settled(box["id"], "deleted")
    assert not _alive(new_pid)
    connection.close()


def _down(node: str) -> bool:
    return ComputeNode.objects.filter(name=node, status="down").exists()
