"""Login, scoping, roles, CSRF and error pages of the browser UI."""

from __future__ import annotations

import re

import pytest
from django.test import Client, RequestFactory

from portal.audit.models import Event
from portal.cloud.models import ComputeNode, Instance
from portal.tenancy.choices import Role
from portal.tenancy.models import Membership
from portal.web.errors import not_found, server_error
from tests.portal.conftest import World
from tests.web.helpers import client, text

TENANT_PAGES = [
    "/",
    "/instances/",
    "/instances/new/",
    "/images/",
    "/networks/",
    "/security-groups/",
    "/events/",
]
USER_PAGES = ["/ssh-keys/", "/tokens/"]
OPS_PAGES = ["/ops/", "/ops/nodes/", "/ops/tenants/", "/ops/instances/", "/ops/drift/", "/ops/events/"]


def test_login_required_everywhere(world: World) -> None:
    anon = client(world, None)
    inst = world.instance_a.pk
    for url in [*TENANT_PAGES, *USER_PAGES, *OPS_PAGES, f"/instances/{inst}/", "/ops/tenants/acme/quota/"]:
        r = anon.get(url)
        assert r.status_code == 302 and r["Location"].startswith("/login/?next="), url
    r = anon.get(f"/instances/{inst}/status/", headers={"HX-Request": "true"})
    assert r.status_code == 401 and r["HX-Redirect"] == "/login/"
    r = anon.post(f"/instances/{inst}/action/", {"action": "stop"})
    assert r.status_code == 302
    assert Instance.objects.get(pk=inst).task_state is None


def test_login_and_logout_pages(world: World) -> None:
    c = Client()
    assert c.get("/login/").status_code == 200
    r = c.post("/login/", {"username": "a_member", "password": "wrong"})
    assert r.status_code == 400 and "correct username and password" in text(r)
    assert 'value="a_member"' in text(r), "the user name is kept"
    r = c.post("/login/", {"username": "a_member", "password": "pw-a_membera_member", "next": "/instances/"})
    assert (r.status_code, r["Location"]) == (302, "/instances/")
    assert Event.objects.filter(action="session.login", actor_name="a_member").exists()
    assert c.get("/logout/").status_code == 405, "logout is POST only"
    r = c.post("/logout/")
    assert r.status_code == 302 and r["Location"] == "/login/"
    assert c.get("/").status_code == 302


def test_member_of_other_tenant_gets_404(world: World) -> None:
    b = client(world, "b_member")
    pk = world.instance_a.pk
    for url in [f"/instances/{pk}/", f"/instances/{pk}/status/", f"/instances/{pk}/console/",
                f"/instances/{pk}/stats/", f"/instances/{pk}/delete/"]:  # fmt: skip
        r = b.get(url)
        assert r.status_code == 404, url
        assert "<h1>Not found</h1>" in text(r)
    assert b.post(f"/instances/{pk}/action/", {"action": "stop"}).status_code == 404
    assert b.post(f"/instances/{pk}/delete/").status_code == 404
    assert Instance.objects.get(pk=pk).task_state is None
    secret = world.a.images.get().pk  # private image of acme
    assert b.get(f"/images/{secret}/").status_code == 404
    assert "web-1" not in text(b.get("/instances/"))
    assert b.post(f"/tokens/{world.token_a.pk}/revoke/").status_code == 404
    assert b.post(f"/ssh-keys/{world.key_a.pk}/delete/").status_code == 404
    denied = Event.objects.filter(actor_name="b_member", status_code=404)
    assert denied.count() == 4 and all(e.outcome == "failure" for e in denied)


def test_bad_ids_are_404_html_and_api_stays_json(world: World) -> None:
    c = client(world, "a_member")
    for url in ["/instances/not-a-uuid/", "/instances/00000000-0000-0000-0000-000000000000/",
                "/images/99999/", "/nope/", "/ops/nodes/nope/tenancy/"]:  # fmt: skip
        r = c.get(url)
        assert r.status_code in (404, 405), url
    r = c.get("/nope/")
    assert r["Content-Type"].startswith("text/html") and "Not found" in text(r)
    r = c.get("/api/v1/nope/")
    assert r.status_code == 404 and r.json() == {"message": "Not found.", "code": "not_found"}
    rf = RequestFactory()
    assert not_found(rf.get("/api/v1/x/"))["Content-Type"] == "application/json"
    assert server_error(rf.get("/api/v1/x/")).status_code == 500
    assert server_error(rf.get("/api/v1/x/"))["Content-Type"] == "application/json"
    html = server_error(rf.get("/instances/"))
    assert html.status_code == 500 and b"Something went wrong" in html.content


def test_viewer_sees_pages_but_cannot_write(world: World) -> None:
    v = client(world, "a_viewer")
    pk = world.instance_a.pk
    page = text(v.get(f"/instances/{pk}/"))
    assert 'value="stop" disabled' in page and "you are viewer" in page
    assert "Viewers cannot launch" in text(v.get("/instances/"))
    launch_page = text(v.get("/instances/new/"))
    assert "This needs the member role" in launch_page
    r = v.post(f"/instances/{pk}/action/", {"action": "stop"})
    assert r.status_code == 403 and "This needs the member role in the tenant; you are viewer." in text(r)
    assert v.post(f"/instances/{pk}/delete/").status_code == 403
    assert v.get(f"/instances/{pk}/delete/").status_code == 403
    r = v.post("/instances/new/", {"name": "x", "image": "1", "flavor": world.flavor_public.pk, "kind": "vm"})
    assert r.status_code == 403
    assert Instance.objects.get(pk=pk).task_state is None
    assert Instance.objects.filter(tenant=world.a).count() == 1
    denied = Event.objects.filter(actor_name="a_viewer", outcome="denied")
    assert {e.action for e in denied} == {"instance.stop", "instance.delete", "instance.create"}
    assert all("member role" in e.message for e in denied)
    preview = v.get("/instances/new/preview/", {"image": "1", "flavor": world.flavor_public.pk})
    assert "This needs the member role" in text(preview)


def test_csrf_is_enforced(world: World) -> None:
    c = Client(enforce_csrf_checks=True)
    c.force_login(world.users["a_member"])
    pk = world.instance_a.pk
    r = c.post(f"/instances/{pk}/action/", {"action": "stop"})
    assert r.status_code == 403 and "security token" in text(r)
    assert Instance.objects.get(pk=pk).task_state is None
    page = c.get(f"/instances/{pk}/")
    token = page.context["csrf_token"]
    assert f'hx-headers=\'{{"X-CSRFToken": "{token}"}}\'' in text(page), "htmx sends the token"
    r = c.post(f"/instances/{pk}/action/", {"action": "stop"}, headers={"X-CSRFToken": str(token)})
    assert r.status_code == 303
    assert Instance.objects.get(pk=pk).task_state == "stopping"


def test_operator_console_is_for_staff(world: World) -> None:
    for url in OPS_PAGES:
        r = client(world, "a_admin").get(url)
        assert r.status_code == 403 and "for operators" in text(r), url
    admin = client(world, "a_admin")
    for url in ("/ops/nodes/shared-1/drain/", "/ops/nodes/shared-1/enable/"):
        assert admin.post(url).status_code == 403, url
    assert admin.get("/ops/nodes/shared-1/drain/").status_code == 403
    assert ComputeNode.objects.get(name="shared-1").status == "up"


@pytest.mark.parametrize("who", ["a_member", "a_viewer", "a_admin"])
def test_tenant_pages_render(world: World, who: str) -> None:
    c = client(world, who)
    pk = world.instance_a.pk
    urls = [*TENANT_PAGES, *USER_PAGES, f"/instances/{pk}/", f"/instances/{pk}/status/",
            f"/instances/{pk}/console/", f"/instances/{pk}/stats/", "/instances/rows/",
            f"/images/{world.a.images.get().pk}/", "/instances/new/preview/"]  # fmt: skip
    for url in urls:
        r = c.get(url)
        assert r.status_code == 200, (url, r.status_code)
    assert c.get(f"/ssh-keys/{world.key_a.pk}/delete/").status_code in (200, 404)


def test_operator_pages_render(world: World) -> None:
    c = client(world, "operator")
    assert c.get("/").status_code == 302, "an operator without tenants lands in the console"
    for url in [*OPS_PAGES, "/ops/tenants/acme/quota/", *USER_PAGES]:
        assert c.get(url).status_code == 200, url
    assert c.get(f"/instances/{world.instance_a.pk}/").status_code == 200, "operators see every instance"
    assert "You are not a member of any tenant" in text(c.get("/instances/"))


def test_tenant_switcher_only_offers_memberships(world: World) -> None:
    Membership.objects.create(user=world.users["a_admin"], tenant=world.b, role=Role.VIEWER)
    c = client(world, "a_admin")
    assert "<h1>Acme" in text(c.get("/"))
    r = c.post("/tenant/", {"tenant": "bobco", "next": "/events/"})
    assert (r.status_code, r["Location"]) == (303, "/events/")
    page = text(c.get("/"))
    assert "<h1>Bob Co" in page and "(viewer)" in page
    r = c.post("/tenant/", {"tenant": "nobody"})
    assert r.status_code == 404 and "not a member" in text(r)
    r = c.post("/tenant/", {"tenant": "acme", "next": "https://evil.example/"})
    assert r["Location"] == "/"
    client_b = client(world, "b_member")
    assert client_b.post("/tenant/", {"tenant": "acme"}).status_code == 404


def test_viewers_are_not_offered_what_their_role_cannot_do(world: World) -> None:
    """Upload, launch, delete and instance actions: hidden or disabled, with the reason, for viewers."""
    secret = world.a.images.get().pk  # private image of acme
    pk = world.instance_a.pk
    member, viewer = client(world, "a_member"), client(world, "a_viewer")
    offered = {
        "/images/": 'href="/images/upload/"',
        "/": 'href="/instances/new/"',
        "/instances/": 'href="/instances/new/"',
        f"/images/{secret}/": f'href="/images/{secret}/delete/"',
        f"/instances/{pk}/": f'href="/instances/{pk}/delete/"',
    }
    for url, link in offered.items():
        assert link in text(member.get(url)), url
        assert link not in text(viewer.get(url)), url
    assert "Viewers cannot upload images." in text(viewer.get("/images/"))
    assert "Viewers cannot launch instances." in text(viewer.get("/"))
    assert "No delete: This needs the member role in the tenant; you are viewer." in text(
        viewer.get(f"/images/{secret}/")
    )
    # instance actions: every button disabled and the reason shown; snapshot, revert, publish absent
    detail = text(viewer.get(f"/instances/{pk}/"))
    buttons = re.findall(r'<button type="submit" name="action" value="(\w+)"( disabled)?>', detail)
    assert buttons and all(disabled for _, disabled in buttons), buttons
    assert "This needs the member role in the tenant; you are viewer." in detail
    assert '<button type="button" class="danger" disabled>Delete…</button>' in detail
    for form in (f"/instances/{pk}/revert/", f"/instances/{pk}/publish/", 'value="snapshot"'):
        assert form not in detail, form
        assert form in text(member.get(f"/instances/{pk}/")), form
    # a public image is deleted by operators only: not offered to tenant members either
    public = world.instance_a.image
    assert public is not None and public.owner_id is None
    link, url = f'href="/images/{public.pk}/delete/"', f"/images/{public.pk}/"
    assert link not in text(member.get(url))
    Membership.objects.create(user=world.users["operator"], tenant=world.a, role=Role.VIEWER)
    assert link in text(client(world, "operator").get(url))
