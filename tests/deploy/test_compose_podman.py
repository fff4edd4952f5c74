"""docker-compose.yml for real: podman builds the images from Debian packages and runs the stack.

The control plane (postgres, redis, migrate, web, control, beat) and one compute node come up
from the repository's compose file, with base images built locally (deploy/build-local-bases.sh);
an operator and a tenant are made with manage.py inside the web container; through the published
web port a VM (TCG) and a container are launched on the compute node, reach active/running,
answer pings on their tenant bridge, and are deleted; then everything the test made is removed.
How the stack is isolated on this shared machine: tests/deploy/podmanstack.py.  Durations of
each phase go to test-artifacts/compose/timings.json (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.podmanstack import ARTIFACTS, ROOT, ComposeStack, wait_for
from tests.hostcaps import require, require_binary, require_root

pytestmark = [pytest.mark.host, pytest.mark.slow]

CONTROL_PLANE = ["postgres", "redis", "migrate", "web", "control", "beat"]
SAMPLES = ["skyport-tiny-*.qcow2*", "busybox-[0-9]*.oci.tar*", "busybox-web-*.oci.tar*"]

TOKENS = """
import json
from datetime import timedelta
from django.contrib.auth import get_user_model
from django.utils import timezone
from portal.tenancy.models import APIToken, Membership
expires = timezone.now() + timedelta(hours=2)
operator = get_user_model().objects.get(username="operator")
demo = Membership.objects.get(user__username="demo", tenant__slug="demo")
keys = {}
for name, user, membership in (("operator", operator, None), ("demo", demo.user, demo)):
    token = APIToken(name="compose-test", user=user, membership=membership, expires_at=expires)
    keys[name] = token.issue()
    token.save()
print(json.dumps(keys))
"""


@pytest.fixture
def stack() -> Iterator[tuple[ComposeStack, dict[str, str]]]:
    require_root()
    for tool in ("podman", "docker-compose", "debootstrap", "nsenter"):
        require_binary(tool)
    require(Path("/dev/kvm").exists(), "/dev/kvm (the compute service passes it through)")
    samples = Path(os.environ.get("SKYPORT_IMAGE_DIR", str(ROOT / "var/images")))
    require(any(samples.glob("skyport-tiny-*.qcow2")), f"sample images in {samples} (`make images`)")
    s = ComposeStack(os.environ.get("SKYPORT_TEST_NETWORK_POOL", "198.19.224.0/19"))
    hosts: dict[str, str] = {}
    try:
        s.prepare()
        for pattern in SAMPLES:
            for f in samples.glob(pattern):
                shutil.copy(f, s.base / "images" / f.name)
        s.local_bases()
        s.build()
        s.make_netns()
        hosts["run"] = s.podman_service("run-service", netns=True)
        s.start("healthchecks", str(ROOT / "deploy/podman-healthchecks.py"), "--project", s.project)
        yield s, hosts
    finally:
        s.logs(hosts.get("run"))
        left = s.close(hosts.get("run"))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "timings.json").write_text(json.dumps(s.timings, indent=1) + "\n")
        print(f"compose test timings (s): {s.timings}")
        assert left == [], f"the compose test left {left}"


def test_compose_runs_the_control_plane_and_a_compute_node(
    stack: tuple[ComposeStack, dict[str, str]],
) -> None:
    s, hosts = stack
    host = hosts["run"]
    started = time.monotonic()

    def manage(*args: str, timeout: float = 120) -> str:
        return s.compose("exec", "-T", "web", "python", "manage.py", *args, host=host, timeout=timeout)

    with s.timed("control plane up"):
        # docker-compose waits for postgres and redis to be healthy and migrate to exit 0
        s.compose("up", "-d", "--no-build", *CONTROL_PLANE, host=host, timeout=600)
        wait_for("web's /healthz on the published port", s.healthz, timeout=120)
    states = json.loads(s.run("podman", "inspect", f"{s.project}_migrate_1", "--format", "{{json .State}}"))
    assert (states["Status"], states["ExitCode"]) == ("exited", 0)

    # operator and tenant, made inside the web container
    manage("bootstrap")
    manage("import_sample_images", "--dir", "/var/lib/skyport/images")
    keys = json.loads(manage("shell", "-c", TOKENS).strip().splitlines()[-1])
    op, demo = keys["operator"], keys["demo"]

    with s.timed("compute node up"):
        node_key = manage("node", "key", s.node).strip()
        s.env["SKYPORT_NODE_KEY"] = node_key
        s.compose("up", "-d", "--no-build", "--no-deps", "compute", host=host, timeout=300)

        def node_ready() -> dict[str, Any] | None:
            code, body = s.http("GET", f"/api/v1/nodes/{s.node}/", op)
            if code != 200:
                return None
            ok = body["status"] == "up" and all(d.get("ok") for d in body["drivers"].values())
            return body if ok and {"vm", "container"} <= set(body["drivers"]) else None

        wait_for(f"node {s.node} up with healthy vm and container drivers", node_ready, timeout=240, every=2)

    code, body = s.http("PATCH", f"/api/v1/nodes/{s.node}/", op, {"tenancy": "dedicated", "owner": "demo"})
    assert code == 200, body
    code, flavors = s.http("GET", "/api/v1/flavors/?name=m1.tiny", demo)
    assert code == 200 and flavors["results"], flavors
    code, images = s.http("GET", "/api/v1/images/?name=sample", demo)
    assert code == 200 and images["results"], images
    image = f"{images['results'][0]['name']}:{images['results'][0]['version']}"

    with s.timed("launch to running"):
        launched = {}
        for kind in ("vm", "container"):
            code, body = s.http(
                "POST",
                "/api/v1/instances/",
                demo,
                {
                    "tenant": "demo",
                    "name": f"ct-{kind}",
                    "image": image,
                    "flavor": flavors["results"][0]["id"],
                    "kind": kind,
                },
            )
            assert code == 202, body
            assert (body["decided_kind"], body["node"]) == (kind, s.node), body
            launched[kind] = body["id"]
        running = {kind: _settled(s, demo, iid, "active", host) for kind, iid in launched.items()}
    for kind, got in running.items():
        assert got["power_state"] == "running", got
        address = got["addresses"][0]["address"]
        # the tenant bridge is in the test's namespace, where the compute service runs
        assert _ping(s, address), f"{kind} at {address} does not answer on its tenant bridge"

    with s.timed("delete"):
        for iid in launched.values():
            code, body = s.http("DELETE", f"/api/v1/instances/{iid}/", demo)
            assert code == 202, body
        for iid in launched.values():
            _settled(s, demo, iid, "deleted", host)
    domains = s.compose(
        "exec", "-T", "compute", "virsh", "-c", "qemu:///system", "list", "--all", "--name", host=host
    )
    assert launched["vm"] not in domains
    s.timings["test body"] = round(time.monotonic() - started, 1)


def _settled(s: ComposeStack, token: str, iid: str, state: str, host: str) -> dict[str, Any]:
    last: list[Any] = []

    def check() -> dict[str, Any] | None:
        code, got = s.http("GET", f"/api/v1/instances/{iid}/", token)
        assert code == 200, got
        assert got["vm_state"] != "error", got
        last[:] = [got]
        return got if got["vm_state"] == state and got["task_state"] is None else None

    try:
        return wait_for(f"instance {iid} to be {state}", check, timeout=240, every=1)  # type: ignore[no-any-return]
    except AssertionError as exc:
        report = _stuck_report(s, token, iid, last[-1] if last else None, host)
        raise AssertionError(f"{exc}\n{report}") from None


def _stuck_report(s: ComposeStack, token: str, iid: str, last: Any, host: str) -> str:
    """What CI shows of a stuck instance, the node's side first (CI keeps only the start of it).

    The stack's containers (a restarted compute container loses the task it held until the
    broker's visibility timeout), what the node's worker is running and holding (celery inspect),
    libvirt's domains, the node's log and processes, then the row, its events and the control
    worker's log without the beat's sweeps.
    """

    def node(*cmd: str) -> str:
        return s.compose("exec", "-T", "compute", *cmd, host=host, timeout=60, check=False).strip()

    compute_log = s.compose("logs", "--no-color", "--tail", "60", "compute", host=host, check=False)
    control_log = s.compose("logs", "--no-color", "--tail", "200", "control", host=host, check=False)
    control_log = "\n".join(line for line in control_log.splitlines() if "portal.sweep" not in line)
    inspect = ("celery", "-A", "compute.worker", "inspect")
    worker = ("-d", f"node@{s.node}", "--timeout", "10")
    _, events = s.http("GET", f"/api/v1/events/?object_id={iid}", token)
    listed = ("podman", "ps", "-a", "--filter", f"name=^{s.project}_", "--format", "{{.Names}}")
    names = s.run(*listed, check=False)
    fmt = "{{.Name}} {{.State.Status}} started {{.State.StartedAt}} restarts={{.RestartCount}}"
    containers = s.run("podman", "inspect", "--format", fmt, *names.split(), check=False) if names else ""
    parts = [
        ("containers", containers.strip()),
        ("celery inspect active", node(*inspect, "active", *worker)),
        ("celery inspect reserved", node(*inspect, "reserved", *worker)),
        ("virsh list --all", node("virsh", "-c", "qemu:///system", "list", "--all")),
        ("compute log (tail)", compute_log[-4000:]),
        ("processes on the node", node("ps", "-eo", "pid,ppid,stat,wchan:24,etime,args", "--cols", "160")),
        ("last seen", json.dumps(last)),
        ("events", json.dumps(events.get("results") if isinstance(events, dict) else events)[:3000]),
        ("control log (tail, without sweeps)", control_log[-3000:]),
    ]
    return "\n".join(f"--- {title}:\n{text}" for title, text in parts)


def _ping(s: ComposeStack, address: str) -> bool:
    def once() -> bool:
        cmd = ["ip", "netns", "exec", s.netns, "ping", "-c1", "-W1", address]
        return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0

    try:
        return bool(wait_for(f"ping {address}", once, timeout=90, every=1))
    except AssertionError:
        return False
