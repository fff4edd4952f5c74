"""Pages after the first are read keys first (portal/api/pagination.py): same rows, same order."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from portal.api.pagination import KeysFirstPaginator
from portal.cloud.models import Instance
from portal.tenancy.models import Tenant
from tests.portal.conftest import World


def _more_instances(world: World, n: int) -> list[str]:
    base = world.instance_a
    now = timezone.now()
    made = []
    for k in range(n):
        i = Instance.objects.create(
            tenant=world.a, name=f"app-{k:02d}", kind="vm", isolation_reason="vm: test", image=base.image,
            flavor=base.flavor, network=base.network, vcpus=1, ram_mb=128, disk_gb=1,
            created_by=base.created_by, vm_state="active", power_state="running", node=base.node,
        )  # fmt: skip
        # some share a creation time: the order's ties must not move a row between pages
        Instance.objects.filter(pk=i.pk).update(created_at=now - timedelta(seconds=k // 3))
        made.append(str(i.pk))
    return made


def test_every_page_holds_what_slicing_the_ordered_list_gives(world: World) -> None:
    _more_instances(world, 11)
    Instance.objects.filter(name="app-04").update(vm_state="deleted")  # not listed
    c = APIClient()
    c.force_authenticate(world.users["a_member"])
    expected = [
        str(pk)
        for pk in Instance.objects.filter(tenant=world.a)
        .exclude(vm_state="deleted")
        .order_by("-created_at", "pk")
        .values_list("pk", flat=True)
    ]
    got: list[str] = []
    for page in (1, 2, 3):
        r = c.get(
            "/api/v1/instances/", {"tenant": "acme", "page": page, "page_size": 4, "ordering": "-created_at"}
        )
        assert r.status_code == 200, r.content
        assert r.data["count"] == 11
        got += [row["id"] for row in r.data["results"]]
    assert sorted(got) == sorted(expected)  # each live instance once, none twice
    assert len(got) == len(set(got)) == 11
    times = [Instance.objects.get(pk=pk).created_at for pk in got]
    assert times == sorted(times, reverse=True)  # newest first across the page boundaries
    r = c.get("/api/v1/instances/", {"tenant": "acme", "page": 4, "page_size": 4})
    assert r.status_code == 404  # past the end, as before


def test_a_later_page_reads_its_keys_then_its_rows(db: Any) -> None:
    for k in range(7):
        Tenant.objects.create(slug=f"t{k}", name=f"T{k}")
    qs = Tenant.objects.order_by("-slug")
    pages = KeysFirstPaginator(qs, 3)
    assert pages.count == 7
    with CaptureQueriesContext(connection) as first:
        one = [t.slug for t in pages.page(1)]
    with CaptureQueriesContext(connection) as later:
        two = [t.slug for t in pages.page(2)]
    three = [t.slug for t in pages.page(3)]
    assert one + two + three == [t.slug for t in qs]
    assert len(first) == 1
    assert len(later) == 2
    assert "OFFSET" in later[0]["sql"] and '"slug"' not in later[0]["sql"].split("FROM")[0]  # keys only
    # rows of values(): sliced as they are
    assert list(KeysFirstPaginator(qs.values("slug"), 3).page(3)) == [{"slug": "t0"}]


def test_a_row_deleted_between_the_two_reads_is_left_out(db: Any, monkeypatch: Any) -> None:
    for k in range(5):
        Tenant.objects.create(slug=f"t{k}", name=f"T{k}")
    qs = Tenant.objects.order_by("slug")
    real = type(qs).filter

    def filter_after_a_delete(self: Any, *args: Any, **kwargs: Any) -> Any:
        if "pk__in" in kwargs:
            Tenant.objects.filter(slug="t3").delete()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(qs), "filter", filter_after_a_delete)
    assert [t.slug for t in KeysFirstPaginator(qs, 2).page(2)] == ["t2"]
