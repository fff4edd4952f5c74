"""The OCI app images of images/debian are real: the portal imports them, and nginx serves HTTP.

- Every archive goes through the upload API (PUT /images/{id}/file/) and its import
  task, as a user's would, and becomes active; the three app images share one base
  layer, stored once.
- Their configs carry what the container work will honour (Entrypoint, Cmd, User,
  ExposedPorts, StopSignal, WorkingDir, Env).
- ``debian-devnodes`` keeps debootstrap's /dev device nodes (the case the container
  work must accept with those entries skipped); the other images carry none.
- nginx runs under plain crun in a user namespace (root inside = an unprivileged host
  range, rootfs shifted by umoci) in a network namespace this test made, and curl in
  that namespace fetches its page: the image works before the driver supports it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from portal.images.models import Artifact, Blob, Image
from portal.images.validation import check_layer_member
from portal.tenancy.choices import Role
from portal.tenancy.models import Membership, Tenant
from tests.hostcaps import require_binary, require_root
from tests.workloads import WorkloadImages

pytestmark = [pytest.mark.host]

APP_IMAGES = ("nginx", "pyhttp", "crashloop")
STATE_ROOT = Path("/var/lib/skyport")  # 0755 to the bottom: container root (a high host uid) must traverse
UID_BASE = 3_000_000  # above the container driver's 1,000,000-2,000,000 uids


# ------------------------------------------------------------------------------------- archive reads


def _blob(tf: tarfile.TarFile, digest: str) -> bytes:
    fh = tf.extractfile(f"blobs/sha256/{digest.removeprefix('sha256:')}")
    assert fh is not None
    return fh.read()


def oci_parts(archive: Path) -> tuple[dict[str, Any], list[str]]:
    """(image config, layer digests) of an OCI layout archive."""
    with tarfile.open(archive) as tf:
        index = json.loads(_blob_by_name(tf, "index.json"))
        manifest = json.loads(_blob(tf, index["manifests"][0]["digest"]))
        config = json.loads(_blob(tf, manifest["config"]["digest"]))
        return config, [layer["digest"] for layer in manifest["layers"]]


def _blob_by_name(tf: tarfile.TarFile, name: str) -> bytes:
    fh = tf.extractfile(name)
    assert fh is not None
    return fh.read()


def layer_members(archive: Path, digest: str) -> list[tarfile.TarInfo]:
    with tarfile.open(archive) as tf:
        blob = tf.extractfile(f"blobs/sha256/{digest.removeprefix('sha256:')}")
        assert blob is not None
        with tarfile.open(fileobj=blob, mode="r|gz") as layer:
            return list(layer)


# ------------------------------------------------------------------------------- portal import


@pytest.fixture
def member(db: Any, settings: Any, tmp_path: Path) -> APIClient:
    require_binary("qemu-img")
    settings.SKYPORT_IMAGE_STORE = tmp_path / "store"
    tenant = Tenant.objects.create(slug="acme", name="Acme")
    user = get_user_model().objects.create_user(username="dev", password="pw-dev-dev")
    Membership.objects.create(user=user, tenant=tenant, role=Role.MEMBER)
    client = APIClient()
    client.force_login(user)
    return client


def upload(client: APIClient, name: str, path: Path, fmt: str, sha256: str, capture: Any) -> Image:
    r = client.post("/api/v1/images/", {"name": name, "version": "1", "tenant": "acme"}, format="json")
    assert r.status_code == 201, r.content
    image_id = r.json()["id"]
    with capture(execute=True):
        r = client.put(
            f"/api/v1/images/{image_id}/file/?type={fmt}&sha256={sha256}",
            data=path.read_bytes(),
            content_type="application/octet-stream",
        )
    assert r.status_code == 202, r.content
    return Image.objects.get(pk=image_id)


def test_app_archives_import_through_the_upload_path_and_share_the_base_layer(
    member: APIClient, workload_images: WorkloadImages, django_capture_on_commit_callbacks: Any
) -> None:
    wi = workload_images
    base = wi.manifest["base_layer"]
    for name in APP_IMAGES:
        image = upload(
            member, name, wi.path(name), "oci", wi.sha256(name), django_capture_on_commit_callbacks
        )
        assert image.status == "active", f"{name}: {image.status_reason}"
        art = Artifact.objects.get(image=image)
        assert art.format == "oci"
        if name == "nginx":  # the runtime config is recorded for the API (overrides, ports)
            assert art.config["entrypoint"] == ["/usr/sbin/nginx"]
            assert art.config["cmd"] == ["-g", "daemon off;"]
            assert art.config["exposed_ports"] == ["80/tcp"] and art.config["stop_signal"] == "SIGQUIT"
            assert ["NGINX_ENTRY", "skyport"] in art.config["env"]
            assert art.config["working_dir"] == "/var/www/html"
        if name == "pyhttp":
            assert art.config["user"] == "1000" and art.config["exposed_ports"] == ["8000/tcp"]
        assert base in set(art.blobs.values_list("digest", flat=True))
    # one base layer blob, referenced by the three images, stored as one file
    assert Blob.objects.get(digest=base).artifacts.count() == 3
    docker = upload(
        member, "pyhttp-docker", wi.pyhttp_docker, "docker", wi.sha256("pyhttp-docker"),
        django_capture_on_commit_callbacks,
    )  # fmt: skip
    assert docker.status == "active", docker.status_reason
    assert "docker archive converted to OCI, 2 layers" in docker.status_reason
    stored = {b.digest for b in Artifact.objects.get(image=docker).blobs.all()}
    # the docker layers are stored under their diff_ids; the config is the OCI image's own
    assert set(wi.manifest["files"]["pyhttp-docker"]["diff_ids"]) <= stored
    assert oci_parts(wi.pyhttp)[0] == _docker_config(wi.pyhttp_docker)
    config = Artifact.objects.get(image=docker).config
    assert config["user"] == "1000" and config["cmd"] == ["python3", "-m", "http.server", "8000"]


def _docker_config(archive: Path) -> dict[str, Any]:
    with tarfile.open(archive) as tf:
        entry = json.loads(_blob_by_name(tf, "manifest.json"))[0]
        assert entry["RepoTags"] == ["skyport-test/pyhttp:1"]
        return dict(json.loads(_blob_by_name(tf, entry["Config"])))


def test_configs_carry_what_the_container_work_honours(workload_images: WorkloadImages) -> None:
    nginx, _ = oci_parts(workload_images.nginx)
    assert nginx["config"]["Entrypoint"] == ["/usr/sbin/nginx"]
    assert nginx["config"]["Cmd"] == ["-g", "daemon off;"]
    assert nginx["config"]["ExposedPorts"] == {"80/tcp": {}}
    assert nginx["config"]["StopSignal"] == "SIGQUIT"
    assert nginx["config"]["WorkingDir"] == "/var/www/html"
    assert "NGINX_ENTRY=skyport" in nginx["config"]["Env"]
    assert "User" not in nginx["config"]  # root inside, as nginx images are

    pyhttp, _ = oci_parts(workload_images.pyhttp)
    assert pyhttp["config"]["User"] == "1000"
    assert pyhttp["config"]["Cmd"] == ["python3", "-m", "http.server", "8000"]
    assert pyhttp["config"]["ExposedPorts"] == {"8000/tcp": {}}
    assert pyhttp["config"]["WorkingDir"] == "/srv/www"

    crash, _ = oci_parts(workload_images.crashloop)
    assert crash["config"]["Entrypoint"] == ["/usr/local/bin/crashloop"]
    assert "CRASH_EXIT=3" in crash["config"]["Env"]
    for config in (nginx, pyhttp, crash):
        assert config["os"] == "linux" and config["architecture"] == "amd64"
        assert len(config["rootfs"]["diff_ids"]) == 2  # the shared Debian base, then the app
    assert len({c["rootfs"]["diff_ids"][0] for c in (nginx, pyhttp, crash)}) == 1


def test_layers_are_slim_and_only_the_devnodes_variant_has_device_nodes(
    workload_images: WorkloadImages,
) -> None:
    wi = workload_images
    _, layers = oci_parts(wi.nginx)
    base = {m.name: m for m in layer_members(wi.nginx, layers[0])}
    assert "dev" in base and not [n for n in base if n.startswith("dev/")]
    assert not [m for m in base.values() if m.ischr() or m.isblk() or m.isfifo()]
    assert not [n for n in base if n.startswith("var/lib/apt/lists/") and base[n].isfile()]
    assert not [
        n
        for n in base
        if n.startswith("usr/share/doc/") and base[n].isfile() and not n.endswith("/copyright")
    ]
    assert "usr/share/doc/dpkg/copyright" in base  # licences stay
    for leaked in ("etc/resolv.conf", "etc/hostname", "usr/sbin/policy-rc.d"):
        assert leaked not in base, f"the build host's {leaked} leaked into the image"
    app = {m.name: m for m in layer_members(wi.nginx, layers[1])}
    assert "usr/sbin/nginx" in app and "bin/sh" not in app  # a layer of what apt added, not a copy
    assert (
        app["var/log/nginx/access.log"].issym() and app["var/log/nginx/access.log"].linkname == "/dev/stdout"
    )
    for member in [*base.values(), *app.values()]:
        check_layer_member(member, "nginx")  # the portal's own per-member rules

    _, (dev_layer,) = oci_parts(wi.devnodes)
    members = layer_members(wi.devnodes, dev_layer)
    devices = [m for m in members if m.ischr() or m.isblk()]
    assert {"dev/null", "dev/zero", "dev/random", "dev/urandom", "dev/tty"} <= {m.name for m in devices}
    assert len(devices) == wi.manifest["files"]["debian-devnodes"]["devices"]
    assert all(m.name.startswith("dev/") for m in devices)
    # apart from those nodes, the layer passes the portal's member rules like the others
    for member in members:
        if member not in devices:
            check_layer_member(member, "debian-devnodes")


# -------------------------------------------------------------------------- nginx under crun + userns


# crun 1.8.1 refuses hybrid cgroups: run it in a private mount namespace where the cgroup2 mount
# is covered by an empty tmpfs (HOST_NOTES); the cover vanishes with the process.
_HIDE_UNIFIED = (
    "if mountpoint -q /sys/fs/cgroup/unified; then"
    ' mount -t tmpfs skyport-nounified /sys/fs/cgroup/unified; fi; exec crun "$@"'
)


def crun_cmd(*args: str) -> list[str]:
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _HIDE_UNIFIED, "sh", *args]


def _crun(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(crun_cmd(*args), check=check, capture_output=True, text=True)


@pytest.fixture
def netns() -> Iterator[str]:
    require_root()
    require_binary("ip")
    name = f"skw{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def bundle_dir() -> Iterator[Path]:
    STATE_ROOT.mkdir(parents=True, exist_ok=True)
    STATE_ROOT.chmod(0o755)
    path = STATE_ROOT / f"test-wl-{secrets.token_hex(4)}"
    path.mkdir(mode=0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


DOCKER_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_NET_BIND_SERVICE",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_SETFCAP", "CAP_SYS_CHROOT", "CAP_AUDIT_WRITE",
]  # fmt: skip


def host_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def children(pid: int) -> list[int]:
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(d))
    return found


def test_nginx_serves_http_under_crun_in_a_user_namespace(
    workload_images: WorkloadImages, netns: str, bundle_dir: Path
) -> None:
    require_root()
    for tool in ("crun", "umoci", "curl", "unshare"):
        require_binary(tool)
    base = UID_BASE + secrets.randbelow(64) * 65536
    layout, bundle = bundle_dir / "layout", bundle_dir / "bundle"
    layout.mkdir()
    with tarfile.open(workload_images.nginx) as tf:
        tf.extractall(layout)  # our own archive; the import test checks every member
    # umoci (Debian's) unpacks the layers and shifts every owner into the host range: the rootfs
    # belongs to container root, which is uid `base` on the host.
    mapping = f"0:{base}:65536"
    subprocess.run(
        ["umoci", "unpack", "--uid-map", mapping, "--gid-map", mapping,
         "--image", f"{layout}:skyport-test/nginx:1", str(bundle)],
        check=True, capture_output=True,
    )  # fmt: skip
    bundle.chmod(0o755)
    assert (bundle / "rootfs" / "usr/sbin/nginx").stat().st_uid == base

    image, _ = oci_parts(workload_images.nginx)
    config = json.loads((bundle / "config.json").read_text())
    name = f"skw-nginx-{secrets.token_hex(4)}"
    process = config["process"]
    process.update(
        terminal=False,
        args=image["config"]["Entrypoint"] + image["config"]["Cmd"],
        env=image["config"]["Env"],
        cwd=image["config"]["WorkingDir"],
        user={"uid": 0, "gid": 0},
        noNewPrivileges=True,
    )
    process["capabilities"] = {k: DOCKER_CAPS for k in ("bounding", "effective", "permitted")}
    linux = config["linux"]
    assert linux["uidMappings"] == [{"containerID": 0, "hostID": base, "size": 65536}]
    assert {"type": "user"} in linux["namespaces"]
    linux["namespaces"] = [
        {"type": "network", "path": f"/run/netns/{netns}"} if ns["type"] == "network" else ns
        for ns in linux["namespaces"]
    ]
    linux["cgroupsPath"] = f"/{name}"
    (bundle / "config.json").write_text(json.dumps(config))
    # The netns belongs to the host's user namespace, so container root has no CAP_NET_BIND_SERVICE
    # over it: nginx's bind(:80) is EACCES unless the namespace lets every uid bind low ports (a
    # per-namespace sysctl, what Docker sets in each container's netns).
    subprocess.run(
        ["ip", "netns", "exec", netns, "sysctl", "-q", "-w", "net.ipv4.ip_unprivileged_port_start=0"],
        check=True,
    )

    log = (bundle_dir / "console.log").open("w")
    runner = subprocess.Popen(
        crun_cmd("run", "--bundle", str(bundle), name), stdout=log, stderr=subprocess.STDOUT
    )
    try:
        page = ""
        end = time.monotonic() + 20
        while time.monotonic() < end and runner.poll() is None:
            got = subprocess.run(
                ["ip", "netns", "exec", netns, "curl", "-fsS", "-m", "2", "http://127.0.0.1/"],
                capture_output=True, text=True,
            )  # fmt: skip
            if got.returncode == 0:
                page = got.stdout
                break
            time.sleep(0.1)
        assert "<h1>Skyport nginx</h1>" in page, (bundle_dir / "console.log").read_text()
        state = json.loads(_crun("state", name).stdout)
        master = int(state["pid"])
        workers = children(master)
        assert workers, "nginx started no worker"
        # root inside is the range's first uid on the host; workers dropped to www-data (33)
        assert host_uid(master) == base
        assert {host_uid(w) for w in workers} == {base + 33}
        assert Path(f"/proc/{master}/uid_map").read_text().split() == ["0", str(base), "65536"]
        # nginx logs requests to its stdout (the image links access.log to /dev/stdout)
        assert '"GET / HTTP/1.1" 200' in (bundle_dir / "console.log").read_text()
    finally:
        _crun("kill", name, "KILL", check=False)
        runner.wait(timeout=10)
        _crun("delete", "--force", name, check=False)
        log.close()
    for controller in ("memory", "pids", "cpu"):
        assert not (Path("/sys/fs/cgroup") / controller / name).exists()


def test_debootstrap_dev_nodes_are_skipped_and_noted_not_refused(
    member: APIClient,
    workload_images: WorkloadImages,
    django_capture_on_commit_callbacks: Any,
    tmp_path: Path,
) -> None:
    wi = workload_images
    image = upload(
        member,
        "devnodes",
        wi.devnodes,
        "oci",
        wi.sha256("debian-devnodes"),
        django_capture_on_commit_callbacks,
    )
    assert image.status == "active", image.status_reason
    assert "8 device nodes skipped" in image.status_reason and "dev/null" in image.status_reason
    # A node unpacks the same layer without them.
    from compute.layers import LayerStore

    unpacked = LayerStore(tmp_path / "node").unpack(wi.devnodes, f"sha256:{wi.sha256('debian-devnodes')}")
    (layer,) = unpacked.layers
    assert (layer / "dev").is_dir() and not (layer / "dev" / "null").exists()
    assert (layer / "bin" / "sh").exists() or (layer / "usr" / "bin" / "sh").exists()
