"""GET /api/v1/instances/{id}/logs/: through the node contract played by FakeNodes (issue 18, item 5).

The node's answer comes back on a Redis list in production; here FakeNodes
keeps it and ``wait_reply`` delivers the pending messages first, so the real
NodeService and the fake driver's k8s-file parsing answer every request.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from compute.spec import Kind
from portal.cloud import logs as cloud_logs
from portal.cloud.models import Instance
from tests.portal.conftest import FakeNodes, World
from tests.portal.test_flow import _dedicate_node_a

RECORDS = (
    b"2026-12-06T01:20:00.100000000+00:00 stdout F starting\n"
    b"2026-12-06T01:20:00.200000000+00:00 stderr P warn: half \n"
    b"2026-12-06T01:20:00.200000000+00:00 stderr F a line\n"
    b"2026-12-06T01:20:01.000000000+00:00 stdout F ready on :80\n"
    b"2026-12-06T01:20:02.000000000+00:00 stderr F error: boom\n"
)


@pytest.fixture
def answering(nodes: FakeNodes, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, list[Any]]]:
    """The node answers every logs request; returns the messages it was sent."""
    asked: list[tuple[str, str, list[Any]]] = []

    def wait(reply: str, timeout: float) -> dict[str, Any] | None:
        asked.extend(m for m in nodes.sent if m[1] == "compute.instance.logs")
        nodes.run()
        return nodes.replies.pop(reply, None)

    monkeypatch.setattr(cloud_logs, "wait_reply", wait)
    return asked


def _container(world: World, nodes: FakeNodes, records: bytes = RECORDS) -> str:
    _dedicate_node_a(world)
    body = {"tenant": "acme", "name": "app", "image": "busybox:1", "flavor": world.flavor_public.pk}
    r = world.client("a_member").post("/api/v1/instances/", body, format="json")
    assert r.status_code == 202 and r.json()["decided_kind"] == "container", r.content
    nodes.run()
    iid = str(r.json()["id"])
    nodes.service("node.node-a").driver(Kind.CONTAINER).log_records[iid] = records
    return iid


def url(iid: str, query: str = "") -> str:
    return f"/api/v1/instances/{iid}/logs/" + (f"?{query}" if query else "")


def test_lines_are_marked_and_selected(world: World, nodes: FakeNodes, answering: list[Any]) -> None:
    iid = _container(world, nodes)
    c = world.client("a_member")
    got = c.get(url(iid))
    assert got.status_code == 200, got.content
    body = got.json()
    assert body["node"] == "node-a" and not body["truncated"] and not body["retained"]
    assert body["lines"] == [
        {"time": "2026-12-06T01:20:00.100000000Z", "stream": "stdout", "text": "starting"},
        {"time": "2026-12-06T01:20:00.200000000Z", "stream": "stderr", "text": "warn: half a line"},
        {"time": "2026-12-06T01:20:01.000000000Z", "stream": "stdout", "text": "ready on :80"},
        {"time": "2026-12-06T01:20:02.000000000Z", "stream": "stderr", "text": "error: boom"},
    ]
    texts = lambda q: [x["text"] for x in c.get(url(iid, q)).json()["lines"]]  # noqa: E731
    assert texts("tail=1") == ["error: boom"]
    assert texts("tail=0") == []
    assert texts("stream=stderr") == ["warn: half a line", "error: boom"]
    assert texts("stream=stdout&tail=1") == ["ready on :80"]
    assert texts("since=2026-12-06T01:20:01Z") == ["ready on :80", "error: boom"]
    # an offset is honoured: 02:20:01+01:00 is 01:20:01 UTC
    assert texts("since=2026-12-06T02:20:01%2B01:00") == ["ready on :80", "error: boom"]
    # what went to the node: the request on its own queue, answered on a logs reply list
    queue, _, (payload,) = answering[-1]
    assert queue == "node.node-a" and payload["since"] == "2026-12-06T02:20:01+01:00"
    assert payload["instance_id"] == iid and payload["reply"].startswith("skyport:logs:")


def test_scoping_viewer_reads_outsider_404(world: World, nodes: FakeNodes, answering: list[Any]) -> None:
    iid = _container(world, nodes)
    assert world.client("a_viewer").get(url(iid, "tail=2")).status_code == 200
    for who in ("b_admin", "b_member"):
        r = world.client(who).get(url(iid))
        assert r.status_code == 404, (who, r.content)
    asked = len(answering)
    assert world.client("b_admin").get(url(iid, "follow=1")).status_code == 404
    assert len(answering) == asked  # nothing was asked of the node for an outsider


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("tail=abc", "tail"),
        ("tail=-1", "tail"),
        ("tail=10001", "tail"),
        ("tail=99999999999999999999", "tail"),
        ("since=yesterday", "since"),
        ("since=2026-13-01T00:00:00Z", "since"),
        ("since=2026-12-06T01:20:00", "since"),  # no zone: ambiguous
        ("stream=both", "stream"),
        ("follow=maybe", "follow"),
        ("since=", "since"),  # given empty: refused, not read as absent (the schema says date-time)
        ("tail=", "tail"),
    ],
)
def test_bad_parameters_are_400_with_a_message(
    world: World, nodes: FakeNodes, answering: list[Any], query: str, field: str
) -> None:
    iid = _container(world, nodes)
    r = world.client("a_member").get(url(iid, query))
    assert r.status_code == 400, (query, r.content)
    assert field in json.dumps(r.json()), r.json()
    assert answering == []


def test_a_vm_has_a_serial_console_instead(world: World, answering: list[Any]) -> None:
    r = world.client("a_member").get(url(str(world.instance_a.pk)))
    assert r.status_code == 409, r.content
    assert "serial console" in r.json()["message"] and "/console/" in r.json()["message"]


def test_kept_after_delete_until_retention_ends(
    world: World, nodes: FakeNodes, answering: list[Any], settings: Any
) -> None:
    iid = _container(world, nodes)
    c = world.client("a_member")
    assert c.delete(f"/api/v1/instances/{iid}/").status_code == 202
    nodes.run()
    inst = Instance.objects.get(pk=iid)
    assert inst.vm_state == "deleted" and inst.deleted_at is not None
    got = c.get(url(iid, "tail=1")).json()
    assert got["retained"] is True and got["lines"][0]["text"] == "error: boom"
    # past the operator's retention the portal says so without asking the node
    settings.SKYPORT_LOG_RETENTION_HOURS = 72
    Instance.objects.filter(pk=iid).update(deleted_at=inst.deleted_at - dt.timedelta(hours=73))
    asked = len(answering)
    r = c.get(url(iid))
    assert r.status_code == 404 and "kept for 72 h" in r.json()["message"], r.content
    assert len(answering) == asked


def test_a_silent_node_is_504_and_missing_logs_404(
    world: World, nodes: FakeNodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    iid = _container(world, nodes)
    monkeypatch.setattr(cloud_logs, "wait_reply", lambda reply, timeout: None)
    r = world.client("a_member").get(url(iid))
    assert r.status_code == 504 and "did not answer" in r.json()["message"]
    # the node has neither the container nor kept logs (e.g. swept): 404 with the node's reason
    driver = nodes.service("node.node-a").driver(Kind.CONTAINER)
    driver.destroy(iid)
    driver.log_records.pop(iid)

    def wait(reply: str, timeout: float) -> dict[str, Any] | None:
        nodes.run()
        return nodes.replies.pop(reply, None)

    monkeypatch.setattr(cloud_logs, "wait_reply", wait)
    r = world.client("a_member").get(url(iid))
    assert r.status_code == 404 and "no kept logs" in r.json()["message"], r.content


def test_follow_streams_new_lines_once_then_ends(
    world: World, nodes: FakeNodes, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    iid = _container(world, nodes)
    driver = nodes.service("node.node-a").driver(Kind.CONTAINER)
    more = [
        # same time as the last line already sent: must come once, not be skipped
        b"2026-12-06T01:20:02.000000000+00:00 stdout F same-time\n",
        b"2026-12-06T01:20:03.000000000+00:00 stdout F later\n",
    ]
    calls = 0

    def wait(reply: str, timeout: float) -> dict[str, Any] | None:
        nonlocal calls
        calls += 1
        if calls == 2:
            driver.log_records[iid] += more[0]
        if calls == 3:
            driver.log_records[iid] += more[1]
        nodes.run()
        return nodes.replies.pop(reply, None)

    monkeypatch.setattr(cloud_logs, "wait_reply", wait)
    monkeypatch.setattr(cloud_logs, "FOLLOW_POLL_SECONDS", 0.02)
    settings.SKYPORT_LOG_FOLLOW_SECONDS = 1
    r = world.client("a_viewer").get(url(iid, "follow=1&tail=1"))
    assert r.status_code == 200 and r["Content-Type"] == "application/x-ndjson"
    objs = [json.loads(line) for line in b"".join(r.streaming_content).decode().splitlines()]
    assert [o.get("text") for o in objs[:-1]] == ["error: boom", "same-time", "later"]
    assert objs[0]["stream"] == "stderr" and objs[1]["stream"] == "stdout"
    assert "follow limit of 1 s" in objs[-1]["end"]
    assert calls > 5  # it kept polling until the limit


def test_follows_per_process_are_bounded(world: World, nodes: FakeNodes, answering: list[Any]) -> None:
    iid = _container(world, nodes)
    held = [cloud_logs._follow_slots.acquire(blocking=False) for _ in range(cloud_logs.FOLLOW_SLOTS)]
    try:
        assert all(held)
        r = world.client("a_member").get(url(iid, "follow=1"))
        assert r.status_code == 429 and "follows" in r.json()["message"], r.content
    finally:
        for _ in held:
            cloud_logs._follow_slots.release()
    # a follow that fails before streaming gives its slot back
    r = world.client("a_member").get(url(str(world.instance_a.pk), "follow=1"))
    assert r.status_code == 409
    assert all(cloud_logs._follow_slots.acquire(blocking=False) for _ in range(cloud_logs.FOLLOW_SLOTS))
    for _ in range(cloud_logs.FOLLOW_SLOTS):
        cloud_logs._follow_slots.release()


def test_the_instance_page_shows_the_last_lines_marked(
    world: World, nodes: FakeNodes, answering: list[Any]
) -> None:
    iid = _container(world, nodes)
    c = world.client("a_viewer")
    page = c.get(f"/instances/{iid}/").content.decode()
    assert f'hx-get="/instances/{iid}/logs/"' in page and 'id="logs-h"' in page
    panel = c.get(f"/instances/{iid}/logs/").content.decode()
    assert '<span class="stderr"><span class="mark">01:20:02.000 stderr</span> error: boom</span>' in panel
    assert '<span class="stdout"><span class="mark">01:20:01.000 stdout</span> ready on :80</span>' in panel
    assert "read on node-a" in panel and 'hx-trigger="every 5s"' in panel
    only = c.get(f"/instances/{iid}/logs/?stream=stderr").content.decode()
    assert "error: boom" in only and "ready on :80" not in only
    assert world.client("b_admin").get(f"/instances/{iid}/logs/").status_code == 404
    # a VM's page has the console, not this panel
    assert 'id="logs-h"' not in c.get(f"/instances/{world.instance_a.pk}/").content.decode()
    # deleted: the kept logs, drawn once (286 stops htmx polling)
    world.client("a_member").delete(f"/api/v1/instances/{iid}/")
    nodes.run()
    kept = c.get(f"/instances/{iid}/logs/")
    assert kept.status_code == 286 and "kept after the delete" in kept.content.decode()
    assert "hx-trigger" not in kept.content.decode().split("<p", 1)[0]


def test_a_node_that_is_down_is_not_asked(world: World, nodes: FakeNodes, answering: list[Any]) -> None:
    from portal.cloud.models import ComputeNode

    iid = _container(world, nodes)
    ComputeNode.objects.filter(name="node-a").update(status="down")
    r = world.client("a_member").get(url(iid))
    assert r.status_code == 409 and "node-a is down" in r.json()["message"], r.content
    assert answering == []
    panel = world.client("a_member").get(f"/instances/{iid}/logs/").content.decode()
    assert "node-a is down" in panel
