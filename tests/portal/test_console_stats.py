"""Console tails and CPU/memory statistics, through the node contract played by FakeNodes."""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.core.cache import cache

from portal.cloud import metrics
from tests.portal.conftest import FakeNodes, World


@pytest.fixture(autouse=True)
def _empty_cache() -> Any:
    cache.clear()
    yield
    cache.clear()


def _vm(world: World, nodes: FakeNodes) -> str:
    c = world.client("a_member")
    r = c.post(
        "/api/v1/instances/",
        {"name": "web-2", "image": "tiny:1", "flavor": world.flavor_public.pk, "kind": "vm"},
        format="json",
    )
    assert r.status_code == 202, r.content
    nodes.run()
    return str(r.json()["id"])


def test_console_asks_the_node_and_shows_its_tail(world: World, nodes: FakeNodes, sent: list[Any]) -> None:
    iid = _vm(world, nodes)
    c = world.client("a_member")
    first = c.get(f"/api/v1/instances/{iid}/console/").json()
    assert first == {"text": "", "at": None, "node": "shared-1", "refreshing": True}
    assert sent[-1][1] == "compute.instance.console" and sent[-1][2] == [
        {"instance_id": iid, "kind": "vm", "max_bytes": 16384}
    ]
    # a second read within 2 s does not ask again
    assert c.get(f"/api/v1/instances/{iid}/console/").json()["refreshing"] is False
    assert len([m for m in sent if m[1] == "compute.instance.console"]) == 1
    nodes.run()  # the node reads its log and sends it back (portal.console)
    got = c.get(f"/api/v1/instances/{iid}/console/").json()
    assert "fake: web-2 booted" in got["text"] and got["node"] == "shared-1" and got["at"]
    # another tenant cannot read it; the UI panel shows the text
    assert world.client("b_admin").get(f"/api/v1/instances/{iid}/console/").status_code == 404
    page = world.client("a_member").get(f"/instances/{iid}/console/").content.decode()
    assert "fake: web-2 booted" in page


def test_console_of_another_node_is_ignored(world: World, nodes: FakeNodes) -> None:
    from portal.cloud.tasks import apply_console

    iid = _vm(world, nodes)
    assert not apply_console({"instance_id": iid, "node": "node-a", "text": "forged", "at": time.time()})
    assert not apply_console({"instance_id": "not-a-uuid", "node": "shared-1", "text": "x"})
    assert world.client("a_member").get(f"/api/v1/instances/{iid}/console/").json()["text"] == ""


def test_stats_come_with_heartbeats(world: World, nodes: FakeNodes) -> None:
    iid = _vm(world, nodes)
    c = world.client("a_member")
    assert c.get(f"/api/v1/instances/{iid}/stats/").json()["samples"] == []
    svc = nodes.service("node.shared-1")
    for _ in range(3):
        time.sleep(0.05)
        svc.report()
    got = c.get(f"/api/v1/instances/{iid}/stats/").json()
    assert got["vcpus"] == 1 and got["memory_limit_bytes"] == 128 * 2**20
    assert len(got["samples"]) == 2
    for s in got["samples"]:
        assert s["memory_bytes"] == 48 << 20
        assert 10 < s["cpu_percent"] < 40, s  # the fake workload burns a quarter of one CPU
    page = c.get(f"/instances/{iid}/stats/").content.decode()
    assert "% of one CPU" in page and "sparkline" in page
    assert world.client("b_admin").get(f"/api/v1/instances/{iid}/stats/").status_code == 404


def test_a_heartbeat_stores_its_samples_in_two_cache_round_trips(
    world: World, nodes: FakeNodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 17: one get and one set per instance made a 40-instance heartbeat 80 Redis round
    trips, the control worker's first limit as nodes grew (bench/scale.py).  Now one of each."""
    for i in range(8):
        r = world.client("a_member").post(
            "/api/v1/instances/",
            {"name": f"v-{i}", "image": "tiny:1", "flavor": world.flavor_public.pk, "kind": "vm"},
            format="json",
        )
        assert r.status_code == 202, r.content
    nodes.run()
    svc = nodes.service("node.shared-1")
    svc.report()
    calls: list[str] = []
    real = metrics.cache

    class Counting:
        def __getattr__(self, name: str) -> Any:
            calls.append(name)
            return getattr(real, name)

    monkeypatch.setattr(metrics, "cache", Counting())
    time.sleep(0.01)
    svc.report()
    assert sorted(calls) == ["get_many", "set_many"], calls
    monkeypatch.undo()
    # the 8 launched here (the fixture's own instance on shared-1 is not on the fake node)
    running = list(
        world.a.instances.filter(node__name="shared-1", power_state="running", name__startswith="v-")
    )
    assert len(running) == 8
    assert all(len(metrics.samples(str(i.pk))) == 1 for i in running)  # two samples: one CPU delta each


def test_a_cache_that_is_away_costs_the_stats_not_the_heartbeat(
    world: World, nodes: FakeNodes, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A separate SKYPORT_CACHE_URL that is down: the beats still refresh their node (else the
    sweeper marks it down) and are still sampled for usage; only the stats history waits."""
    import redis

    from portal.cloud.models import ComputeNode
    from portal.metering import sampling
    from portal.metering.models import UsageSample

    iid = _vm(world, nodes)
    svc = nodes.service("node.shared-1")

    class Away:
        def __getattr__(self, name: str) -> Any:
            def refuse(*args: Any, **kwargs: Any) -> Any:
                raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

            return refuse

    monkeypatch.setattr(metrics, "cache", Away())
    monkeypatch.setattr(sampling, "cache", Away())
    before = ComputeNode.objects.get(name="shared-1").last_heartbeat
    samples = UsageSample.objects.filter(instance_id=iid, source="heartbeat").count()
    time.sleep(0.01)
    svc.report()
    after = ComputeNode.objects.get(name="shared-1").last_heartbeat
    assert after is not None and (before is None or after > before)
    assert UsageSample.objects.filter(instance_id=iid, source="heartbeat").count() == samples + 1
    assert "the cache failed" in caplog.text and "cannot read the last sampled beat" in caplog.text
    monkeypatch.undo()
    assert metrics.samples(iid) == []  # nothing was kept while it was away


def test_the_host_load_of_the_newest_heartbeat_shows_on_the_node(world: World) -> None:
    from django.test import Client

    from portal.cloud.tasks import apply_node_report
    from tests.portal.conftest import heartbeat

    op = world.client("operator")
    assert op.get("/api/v1/nodes/shared-1/").json()["host_load"] is None  # no beat carried one yet
    load = {"load1": 1.5, "load5": 0.75, "cpu_percent": 42.5, "mem_available_mb": 3000, "disk_free_gb": 55.5}
    now = time.time()
    apply_node_report(heartbeat("shared-1", host=load, sent_at=now))
    assert op.get("/api/v1/nodes/shared-1/").json()["host_load"] == {**load, "at": now}
    # a malformed one is refused with the whole beat, as every field of the contract is
    bad = {**load, "cpu_percent": "busy"}
    assert apply_node_report(heartbeat("shared-1", host=bad, sent_at=now + 1)) is None
    assert op.get("/api/v1/nodes/shared-1/").json()["host_load"]["cpu_percent"] == 42.5
    # the operator's node page shows it
    browser = Client()
    browser.force_login(world.users["operator"])
    page = browser.get("/ops/nodes/shared-1/").content.decode()
    assert "42.5 % busy" in page and "3000 MiB available" in page and "55.5 GiB free" in page
