"""Launch overrides of a container's image config: command, env, workdir, user (issue 18).

Env values may be secrets: the API answers with the names only, and neither the events,
the audit log nor an error message carries a value.  What the portal can know (the
image config recorded at import, the kind) is checked at the API: 400 or 409 with a
message, nothing created.
"""

from __future__ import annotations

from typing import Any

import pytest

from portal.audit.models import Event
from portal.cloud.models import Instance
from portal.cloud.services import build_spec
from portal.images.models import Artifact
from tests.portal.conftest import FakeNodes, World
from tests.portal.test_flow import _dedicate_node_a

SECRET = "s3cr3t-p4ssw0rd-value"


def post(world: World, who: str = "a_member", tenant: str = "acme", **extra: Any) -> Any:
    body = {"tenant": tenant, "name": "app", "image": "sample:1", "flavor": world.flavor_public.pk}
    return world.client(who).post("/api/v1/instances/", {**body, **extra}, format="json")


def test_overrides_reach_the_node_and_env_values_are_never_echoed(world: World, nodes: FakeNodes) -> None:
    _dedicate_node_a(world)
    r = post(
        world,
        command=["python3", "-m", "http.server", "9000"],
        env=[{"name": "DB_PASSWORD", "value": SECRET}, {"name": "MODE", "value": "prod"}],
        workdir="/srv",
        user="1000:1000",
    )
    assert r.status_code == 202, r.json()
    body = r.json()
    assert body["decided_kind"] == "container"
    assert body["env"] == [
        {"name": "DB_PASSWORD", "value": "********"},
        {"name": "MODE", "value": "********"},
    ]
    assert (body["command"], body["workdir"], body["user"]) == (
        ["python3", "-m", "http.server", "9000"],
        "/srv",
        "1000:1000",
    )
    got = world.client("a_member").get(f"/api/v1/instances/{body['id']}/")
    assert SECRET not in got.content.decode() and got.json()["env"][0]["value"] == "********"
    listing = world.client("a_member").get("/api/v1/instances/")
    assert SECRET not in listing.content.decode()

    spec = build_spec(Instance.objects.get(pk=body["id"]))
    assert spec.command == ("python3", "-m", "http.server", "9000")
    assert dict(spec.env) == {"DB_PASSWORD": SECRET, "MODE": "prod"}
    assert (spec.workdir, spec.user) == ("/srv", "1000:1000")
    assert nodes.run() == 1
    events = world.client("a_member").get("/api/v1/events/", {"object_id": body["id"]})
    assert events.json()["results"] and SECRET not in events.content.decode()
    assert not [e for e in Event.objects.all() if SECRET in str(e.__dict__)]


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        ({"env": [{"name": "A=B", "value": SECRET}]}, "env", "must not contain '='"),
        ({"env": [{"name": "A\x00", "value": SECRET}]}, "env", "Null characters are not allowed"),
        ({"env": [{"name": "", "value": SECRET}]}, "env", "may not be blank"),
        ({"env": [{"name": "TOKEN", "value": "x\x00" + SECRET}]}, "env", "Null characters are not allowed"),
        ({"env": [{"name": f"V{i}", "value": "x"} for i in range(257)]}, "env", "256"),
        ({"env": [{"name": "BIG", "value": "x" * 32769}]}, "env", "32768"),
        ({"env": [{"name": "A", "value": "1"}, {"name": "A", "value": SECRET}]}, "env", "given twice"),
        ({"env": {"A": SECRET}}, "env", "Expected a list"),
        ({"command": ["sh", "-c", "a\x00b"]}, "command", "Null characters are not allowed"),
        ({"command": ["x"] * 257}, "command", "256"),
        ({"workdir": "relative/dir"}, "workdir", "absolute path"),
        ({"user": "root; rm -rf /"}, "user", "user[:group]"),
        ({"user": "70000"}, "user", "65535"),
    ],
    ids=[
        "env-eq", "env-nul-name", "env-empty-name", "env-nul-value", "env-count", "env-size", "env-twice",
        "env-dict",
        "cmd-nul", "cmd-count", "workdir", "user-name", "user-id",
    ],
)  # fmt: skip
def test_bad_overrides_are_400_without_echoing_values(
    world: World, nodes: FakeNodes, extra: dict[str, Any], field: str, words: str
) -> None:
    _dedicate_node_a(world)
    before = Instance.objects.count()
    r = post(world, **extra)
    assert r.status_code == 400, r.content
    assert field in r.json()["errors"], r.json()
    assert words in r.content.decode(), r.json()
    assert SECRET not in r.content.decode()
    assert Instance.objects.count() == before


def test_overrides_on_a_vm_are_refused(world: World, nodes: FakeNodes) -> None:
    before = Instance.objects.count()
    r = post(world, kind="vm", env=[{"name": "A", "value": SECRET}])
    assert r.status_code == 400 and "containers only" in r.json()["errors"]["env"][0]
    # auto that becomes a VM (bobco has no dedicated node): 409 saying why.
    r = post(world, who="b_member", tenant="bobco", command=["sleep", "1"])
    assert r.status_code == 409, r.content
    assert "apply to containers only" in r.json()["message"] and SECRET not in r.content.decode()
    assert Instance.objects.count() == before


def test_an_image_without_a_command_needs_one(world: World, nodes: FakeNodes) -> None:
    _dedicate_node_a(world)
    Artifact.objects.filter(image__name="sample", format="oci").update(
        config={"entrypoint": [], "cmd": [], "env": [], "working_dir": "/", "user": ""}
    )
    r = post(world)
    assert r.status_code == 400 and "no Entrypoint or Cmd" in r.json()["errors"]["command"][0]
    assert post(world, command=["/bin/true"]).status_code == 202
