"""Bad input is a 4xx with a message; every state-changing request is audited."""

from __future__ import annotations

import pytest
from django.db import OperationalError

from portal.audit.models import Event
from portal.cloud.models import Instance
from tests.portal.conftest import World


def test_bad_input_is_400_with_message(world: World) -> None:
    c = world.client("a_member")
    cases = [
        {"tenant": "acme", "name": "Bad Name!", "image": "tiny:1", "flavor": world.flavor_public.pk},
        {"tenant": "acme", "name": "ok", "image": "tiny:1", "flavor": 999999},
        {"tenant": "acme", "name": "ok", "image": "tiny:1", "flavor": "x"},
        {"tenant": "acme", "name": "ok", "image": "../../etc/passwd", "flavor": world.flavor_public.pk},
        {
            "tenant": "acme",
            "name": "ok",
            "image": "tiny:1",
            "flavor": world.flavor_public.pk,
            "kind": "lxc",
        },
        {},
        [],
    ]
    for body in cases:
        r = c.post("/api/v1/instances/", body, format="json")
        assert r.status_code == 400, (body, r.content)
        assert r.json()["message"], body
    r = c.post("/api/v1/instances/", "{not json", content_type="application/json")
    assert r.status_code == 400 and "JSON" in r.json()["message"]
    assert c.get("/api/v1/instances/not-a-uuid/").status_code == 404
    assert c.get("/api/v1/nope/").json()["message"] == "Not found."
    assert c.get("/api/v1/instances/", {"ordering": "nonsense", "page": 1}).status_code == 200
    assert c.get("/api/v1/instances/", {"page": 999}).status_code == 404


def test_container_without_dedicated_node_is_409_saying_what_to_do(world: World) -> None:
    r = world.client("b_member").post(
        "/api/v1/instances/",
        {
            "tenant": "bobco",
            "name": "c1",
            "image": "busybox:1",
            "flavor": world.flavor_public.pk,
            "kind": "container",
        },
        format="json",
    )
    assert r.status_code == 409
    assert "dedicate" in r.json()["message"]


def test_events_record_writes_and_refusals(world: World) -> None:
    c = world.client("a_member")
    r = c.post(
        "/api/v1/instances/",
        {"tenant": "acme", "name": "audited", "image": "tiny:1", "flavor": world.flavor_public.pk},
        format="json",
        HTTP_X_REQUEST_ID="req-12345678",
    )
    assert r.status_code == 202 and r["X-Request-ID"] == "req-12345678"
    ev = Event.objects.get(request_id="req-12345678")
    assert (ev.action, ev.outcome, ev.tenant, ev.actor_name) == (
        "instance.create",
        "success",
        world.a,
        "a_member",
    )
    assert ev.object_id == r.json()["id"] and ev.source_ip == "127.0.0.1" and ev.status_code == 202
    world.client("a_viewer").delete(f"/api/v1/instances/{world.instance_a.pk}/")
    denied = Event.objects.filter(outcome="denied", actor_name="a_viewer").get()
    assert denied.tenant == world.a and "member role" in denied.message
    # events are visible to the tenant, not to others
    seen = world.client("a_viewer").get("/api/v1/events/", {"outcome": "denied"}).json()["results"]
    assert [e["actor_name"] for e in seen] == ["a_viewer"]
    assert world.client("b_admin").get("/api/v1/events/", {"tenant__slug": "acme"}).json()["results"] == []


def test_schema_and_docs_are_served(world: World) -> None:
    c = world.client("a_member")
    assert c.get("/api/schema/").status_code == 200
    assert c.get("/api/docs/").status_code == 200


def test_a_busy_sqlite_writer_lock_is_503_retry_later_and_changes_nothing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite gives up after its 30 s busy timeout under a burst of writers: that is 503, not 500."""
    from portal.cloud import placement

    def locked(*args: object, **kwargs: object) -> None:
        raise OperationalError("database is locked")

    monkeypatch.setattr(placement, "place", locked)
    before = Instance.objects.count()
    r = world.client("a_member").post(
        "/api/v1/instances/",
        {"tenant": "acme", "name": "busy", "image": "tiny:1", "flavor": world.flavor_public.pk},
        format="json",
    )
    assert r.status_code == 503, r.content
    assert r["Retry-After"] == "5"
    assert r.json()["code"] == "database_busy" and "nothing was changed" in r.json()["message"]
    assert Instance.objects.count() == before
