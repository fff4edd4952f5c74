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
    """Take snapshot ``name`` of a VM through the services and let its node report success."""
    from portal.cloud import services
    from portal.cloud.models import Instance
    from portal.cloud.tasks import apply_observation

    services.act(instance, "snapshot", {"name": name}, None)
    inst = Instance.objects.select_related("node").get(pk=instance.pk)
    node = inst.node.name if inst.node else ""
    observed = {"instance_id": str(inst.pk), "node": node, "action": "snapshot", "action_id": inst.action_id}
    apply_observation(observed | {"ok": True, "power_state": inst.power_state})
