"""Console tickets without nodes: who may get one, what the broker must be (docs/console.md)."""

from __future__ import annotations

from typing import Any

from compute.console.streams import redis_url
from portal.console.models import ConsoleSession
from tests.portal.conftest import World


def url(world: World) -> str:
    return f"/api/v1/instances/{world.instance_a.pk}/console/sessions/"


def test_member_gets_a_ticket_stored_only_as_its_hash(world: World) -> None:
    resp = world.client("a_member").post(url(world), {"mode": "write"}, format="json")
    assert resp.status_code == 201, resp.content
    body = resp.json()
    session = ConsoleSession.objects.get(pk=body["session"])
    assert body["ticket"] not in session.ticket_hash and len(session.ticket_hash) == 64
    assert session.mode == "write" and session.started_at is None


def test_viewer_may_view_only_and_outsiders_get_404(world: World) -> None:
    assert world.client("a_viewer").post(url(world), {"mode": "view"}, format="json").status_code == 201
    assert world.client("a_viewer").post(url(world), {"mode": "write"}, format="json").status_code == 403
    assert world.client("b_admin").post(url(world), {"mode": "view"}, format="json").status_code == 404


def test_a_vm_has_no_exec(world: World) -> None:
    resp = world.client("a_member").post(url(world), {"mode": "exec"}, format="json")
    assert resp.status_code == 409 and "use its serial console" in resp.json()["message"]


def test_consoles_need_a_redis_broker(world: World, settings: Any) -> None:
    settings.CELERY_BROKER_URL = "amqp://u:p@127.0.0.1:5672/skyport"
    resp = world.client("a_member").post(url(world), {"mode": "write"}, format="json")
    assert resp.status_code == 409 and "need CELERY_BROKER_URL to be one Redis" in resp.json()["message"]
    assert redis_url("redis://127.0.0.1:6379/3") == "redis://127.0.0.1:6379/3"
    assert redis_url("sentinel://a:26379;sentinel://b:26379") is None
