from __future__ import annotations

from typing import Any

from django.test import Client

from tests.portal.conftest import World


def client(world: World, who: str | None) -> Client:
    c = Client()
    if who:
        c.force_login(world.users[who])
    return c


def text(response: Any) -> str:
    return response.content.decode()


def taken_snapshot(instance: Any, name: str) -> None:
    """Take snapshot ``name`` of a VM (a ``creating`` Snapshot row) and let its node report it taken.

    The node's observation lists the VM's snapshots, as a real node's does; the row becomes ``available``.
    """
    from portal.cloud.models import Instance
    from portal.cloud.tasks import apply_observation
    from portal.storage import snapshots

    snapshots.take(instance, name, None)
    inst = Instance.objects.select_related("node").get(pk=instance.pk)
    node = inst.node.name if inst.node else ""
    observed = {"instance_id": str(inst.pk), "node": node, "action": "snapshot", "action_id": inst.action_id}
    listed = [{"name": s.name, "created_at": 1.0} for s in inst.snapshots.all()]
    apply_observation(observed | {"ok": True, "power_state": inst.power_state, "snapshots": listed})
