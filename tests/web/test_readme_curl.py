"""Every curl example of README.md runs, as written, against a live server (issue 15, defect 20).

The README's code blocks are parsed; each ``curl`` command (with its continuation lines) runs in
bash with real curl, with only the address changed to the live server's and ``$TOKEN``/``$ID``
set as a reader would set them (``$ID`` from the previous answer's ``id``, ``$IID`` from the
launch's, ``$GID`` from the security group's, ``$NID`` from the network's). ``--fail-with-body``
turns any 4xx/5xx into a failure, so the docs cannot drift from the API again.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command

from portal.cloud import dispatch
from portal.cloud.models import ComputeNode, Flavor
from portal.images.models import Image
from portal.tenancy.models import APIToken, Membership, Tenant
from tests.hostcaps import require, require_binary
from tests.portal.conftest import World

README = Path(__file__).resolve().parents[2] / "README.md"
README_BASE = "http://127.0.0.1:8000"


def curl_examples(text: str) -> list[str]:
    """The curl commands of the README's fenced code blocks, continuation lines joined."""
    commands: list[str] = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.strip() for line in joined.splitlines() if line.strip().startswith("curl ")]
    return commands


def test_the_readme_has_curl_examples() -> None:
    commands = curl_examples(README.read_text())
    assert len(commands) >= 3, commands
    assert any("-T " in c for c in commands), "the upload example is among them"


@pytest.mark.django_db(transaction=True)
def test_every_readme_curl_example_works(
    live_server: Any, world: World, settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.portal import imagefiles as f

    require(shutil.which("curl") is not None, "curl (Makefile DEBS)")
    require_binary("qemu-img")
    settings.SKYPORT_IMAGE_STORE = tmp_path / "store"
    monkeypatch.setattr(
        dispatch, "_send", lambda queue, task, args: None
    )  # no broker: nodes are not the point
    # what the README's reader has: a tenant "demo", its token, the sample image, flavor 1's stand-in
    demo = Tenant.objects.create(slug="demo", name="Demo")
    Membership.objects.create(user=world.users["a_admin"], tenant=demo, role="admin")
    token = APIToken(user=world.users["a_admin"], membership=Membership.objects.get(tenant=demo),
                     name="readme", expires_at="2999-01-01T00:00:00Z")  # fmt: skip
    key = token.issue()
    token.save()
    flavor = Flavor.objects.get(name="m1.tiny")
    f.qcow2(tmp_path / "debian-12.qcow2", "16M")

    # the README's operator step before publishing: an external address on the nodes
    for node in ComputeNode.objects.all():
        call_command("node", "external-address", node.name, "198.18.129.1", "--ports", "20000-29999")
    env = {"PATH": "/usr/bin:/bin", "TOKEN": key, "ID": "", "IID": "", "GID": "", "NID": ""}
    ran = []
    for example in curl_examples(README.read_text()):
        command = (
            example.replace(README_BASE, live_server.url)
            .replace('"flavor": 1', f'"flavor": {flavor.pk}')
            .replace('\\"flavor\\": 1', f'\\"flavor\\": {flavor.pk}')  # in a double-quoted body
        )
        done = subprocess.run(
            ["bash", "-c", command.replace("curl ", "curl --fail-with-body ", 1)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, f"{command}\n-> exit {done.returncode}: {done.stdout} {done.stderr}"
        answer = json.loads(done.stdout)
        if not isinstance(answer, dict):  # e.g. the groups an instance has now
            ran.append(command)
            continue
        env["ID"] = str(answer.get("id", env["ID"]))
        # as the README says: $IID is the launched instance's id, $GID the security group's
        if command.endswith("/api/v1/instances/"):
            env["IID"] = str(answer["id"])
        elif command.endswith("/api/v1/security-groups/"):
            env["GID"] = str(answer["id"])
        elif command.endswith("/api/v1/networks/"):
            env["NID"] = str(answer["id"])
        ran.append(command)
    assert len(ran) == len(curl_examples(README.read_text()))
    debian = Image.objects.get(owner=demo, name="debian", version="12")
    assert debian.status in ("importing", "active"), debian.status_reason
