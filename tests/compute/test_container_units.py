"""Container driver pieces without crun: config.json, layer unpacking, cgroup counters."""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import tarfile
import uuid
from pathlib import Path

import pytest

from compute import cgroups
from compute.drivers.container import LEGACY_ID_BASE, id_base, stop_signal
from compute.layers import ImageError, LayerStore
from compute.oci import BundleSpec, runtime_config
from compute.spec import ImageFormat, ImageRef, InstanceSpec, Kind, SpecError
from tests.hostcaps import require_root


def bundle(**kw: object) -> BundleSpec:
    base: dict[str, object] = {
        "hostname": "h",
        "args": ("/bin/sh",),
        "env": (("PATH", "/bin"),),
        "uid": 0,
        "gid": 0,
        "id_base": (256 + 17) << 16,
        "cgroups_path": "/skyport/sky-x",
        "memory_bytes": 32 << 20,
        "cpu_quota_percent": 50,
        "pids_limit": 64,
    }
    base.update(kw)
    return BundleSpec(**base)  # type: ignore[arg-type]


def test_runtime_config_security_defaults() -> None:
    c = runtime_config(bundle(netns_path="/x/netns"))
    p = c["process"]
    assert p["user"]["uid"] == 0 and p["noNewPrivileges"] is True
    caps = p["capabilities"]
    assert set(caps) == {"bounding", "effective", "inheritable", "permitted", "ambient"}
    assert caps["inheritable"] == caps["ambient"] == []
    assert caps["bounding"] == caps["effective"] == caps["permitted"]
    assert {"CAP_CHOWN", "CAP_NET_BIND_SERVICE", "CAP_SETUID"} <= set(caps["bounding"])
    assert not {"CAP_NET_RAW", "CAP_MKNOD", "CAP_SYS_ADMIN", "CAP_NET_ADMIN"} & set(caps["bounding"])
    lin = c["linux"]
    assert {"type": "user"} in lin["namespaces"]
    mapping = [{"containerID": 0, "hostID": (256 + 17) << 16, "size": 65536}]
    assert lin["uidMappings"] == lin["gidMappings"] == mapping
    assert lin["resources"]["memory"] == {"limit": 32 << 20, "swap": 32 << 20}
    assert lin["resources"]["cpu"] == {"quota": 50_000, "period": 100_000}
    assert lin["resources"]["pids"] == {"limit": 64}
    assert lin["resources"]["devices"][0] == {"allow": False, "access": "rwm"}
    assert {"type": "network", "path": "/x/netns"} in lin["namespaces"]
    assert "/proc/kcore" in lin["maskedPaths"] and "/proc/sys" in lin["readonlyPaths"]
    denied = lin["seccomp"]["syscalls"][0]["names"]
    assert {"mount", "unshare", "setns", "bpf", "kexec_load", "ptrace"} <= set(denied)
    json.dumps(c)  # serialisable as is


def test_runtime_config_refuses_host_ids_and_empty_command() -> None:
    with pytest.raises(ValueError, match="unprivileged id range"):
        runtime_config(bundle(id_base=0))  # root inside would be host root
    with pytest.raises(ValueError, match="unprivileged id range"):
        runtime_config(bundle(id_base=1000))
    with pytest.raises(ValueError, match="outside the container's id range"):
        runtime_config(bundle(uid=65536))
    with pytest.raises(ValueError):
        runtime_config(bundle(args=()))


def test_a_non_root_user_starts_without_effective_capabilities() -> None:
    caps = runtime_config(bundle(uid=1000, gid=1000))["process"]["capabilities"]
    assert caps["effective"] == caps["permitted"] == [] and caps["bounding"]


def test_id_range_is_the_tenants_and_stable() -> None:
    spec = make_spec_for(tenant="acme", id_base=(256 + 5) << 16)
    assert id_base(spec) == (256 + 5) << 16
    # Specs stored before the portal sent a range: derived from the tenant, upper half.
    old = [make_spec_for(tenant=t, id_base=0) for t in ("acme", "acme", "globex")]
    bases = [id_base(s) for s in old]
    assert bases[0] == bases[1] != bases[2]
    assert all(b >= LEGACY_ID_BASE and b % 65536 == 0 and b + 65536 <= 2**32 for b in bases)


def make_spec_for(tenant: str, id_base: int) -> InstanceSpec:
    ref = ImageRef("x", "1", ImageFormat.OCI, "sha256:" + "0" * 64, "/x")
    return InstanceSpec(
        instance_id=str(uuid.uuid4()), name="a", hostname="a", tenant=tenant, kind=Kind.CONTAINER,
        vcpus=1, ram_mb=32, disk_gb=0, image=ref, id_base=id_base,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("env", (("A=B", "x"),), "must not contain '='"),
        ("env", (("A\x00", "x"),), "must not contain '='"),
        ("env", (("", "x"),), "needs a name"),
        ("env", (("A", "x\x00y"),), "NUL in its value"),
        ("id_base", 1000, "id_base must be"),
        ("id_base", ((256 + 5) << 16) + 1, "id_base must be"),
        ("workdir", "relative", "absolute path"),
    ],
)
def test_spec_refuses_bad_container_fields(field: str, value: object, words: str) -> None:
    ref = ImageRef("x", "1", ImageFormat.OCI, "sha256:" + "0" * 64, "/x")
    with pytest.raises(SpecError, match=words):
        InstanceSpec(
            instance_id=str(uuid.uuid4()), name="a", hostname="a", tenant="t", kind=Kind.CONTAINER,
            vcpus=1, ram_mb=32, disk_gb=0, image=ref, **{field: value},  # type: ignore[arg-type]
        )  # fmt: skip


class FakeFS:
    def __init__(self, files: dict[tuple[str, str], str]) -> None:
        self.files = files

    def read(self, controller: str, path: str, name: str) -> str | None:
        return self.files.get((controller, name))

    def write(self, controller: str, path: str, name: str, value: str) -> None:
        self.files[(controller, name)] = value


def test_cgroup_stats_from_v1_files() -> None:
    fs = FakeFS(
        {
            ("memory", "memory.usage_in_bytes"): "1000\n",
            ("memory", "memory.max_usage_in_bytes"): "4000\n",
            ("memory", "memory.limit_in_bytes"): "9223372036854771712\n",
            ("memory", "memory.oom_control"): "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
            ("memory", "memory.failcnt"): "7\n",
            ("cpuacct", "cpuacct.usage"): "123456\n",
            ("pids", "pids.current"): "3\n",
            ("pids", "pids.max"): "max\n",
        }
    )
    s = cgroups.read_stats(fs, "/x")
    assert s is not None
    assert (s.memory_bytes, s.memory_peak_bytes, s.memory_limit_bytes) == (1000, 4000, None)
    assert (s.cpu_time_ns, s.pids, s.pids_max, s.oom_kills, s.memory_failcnt) == (123456, 3, None, 2, 7)
    assert cgroups.oom_killed(fs, "/x") is True
    assert cgroups.read_stats(FakeFS({}), "/x") is None
    assert cgroups.oom_killed(FakeFS({}), "/x") is None
    cgroups.freeze(fs, "/x", True)
    assert cgroups.frozen(fs, "/x")


# ------------------------------------------------------------------ layers


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for ti, data in members:
            if data is not None:
                ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.mode = 0o644
    return ti, data


def _entry(name: str, kind: bytes, link: str = "") -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = link
    ti.mode = 0o755
    return ti, None


def _archive(path: Path, layers: list[bytes]) -> str:
    """Write an OCI layout archive with ``layers``; return its sha256 digest."""
    import hashlib

    blobs: dict[str, bytes] = {}

    def add(data: bytes) -> str:
        d = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[d] = data
        return d

    cfg = add(json.dumps({"config": {"Cmd": ["/bin/sh"]}}).encode())
    man = add(
        json.dumps(
            {
                "schemaVersion": 2,
                "config": {"digest": cfg, "size": 1},
                "layers": [{"digest": add(layer), "size": len(layer)} for layer in layers],
            }
        ).encode()
    )
    files = {"oci-layout": b"{}", "index.json": json.dumps({"manifests": [{"digest": man}]}).encode()}
    files.update({f"blobs/sha256/{d[7:]}": v for d, v in blobs.items()})
    path.write_bytes(_tar([_file(n, v) for n, v in files.items()]))
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "member",
    [
        _file("/etc/passwd"),
        _file("../escape"),
        _file("a/../../escape"),
        _entry("dev/sda", tarfile.BLKTYPE),
        _entry("dev/null", tarfile.CHRTYPE),
        _entry("fifo", tarfile.FIFOTYPE),
        _entry("hard", tarfile.LNKTYPE, "../outside"),
    ],
    ids=["absolute", "dotdot", "nested-dotdot", "blockdev", "chardev", "fifo", "hardlink-out"],
)
def test_unsafe_layer_members_are_refused(
    tmp_path: Path, member: tuple[tarfile.TarInfo, bytes | None]
) -> None:
    archive = tmp_path / "img.tar"
    digest = _archive(archive, [_tar([member])])
    store = LayerStore(tmp_path / "state")
    with pytest.raises(ImageError):
        store.unpack(archive, digest)
    assert store.layers() == []
    assert [
        p.name for p in (tmp_path / "state" / "layers").iterdir() if not p.name.startswith(".images")
    ] == []


def test_no_write_through_a_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    layer = _tar([_entry("etc", tarfile.SYMTYPE, str(outside)), _file("etc/evil", b"pwned")])
    archive = tmp_path / "img.tar"
    digest = _archive(archive, [layer])
    with pytest.raises(ImageError):
        LayerStore(tmp_path / "state").unpack(archive, digest)
    assert list(outside.iterdir()) == []


def test_wrong_digest_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "img.tar"
    _archive(archive, [_tar([_file("a")])])
    with pytest.raises(ImageError):
        LayerStore(tmp_path / "state").unpack(archive, "sha256:" + "0" * 64)


def test_whiteouts_become_overlay_form_and_layers_are_shared(tmp_path: Path) -> None:
    require_root()  # whiteouts are 0:0 device nodes and trusted.* xattrs
    base = _tar(
        [_entry("etc", tarfile.DIRTYPE), _file("etc/a"), _file("etc/b"), _entry("opt", tarfile.DIRTYPE)]
    )
    top = _tar([_file("etc/.wh.a", b""), _entry("opt", tarfile.DIRTYPE), _file("opt/.wh..wh..opq", b"")])
    one, two = tmp_path / "one.tar", tmp_path / "two.tar"
    d1 = _archive(one, [base])
    d2 = _archive(two, [base, top])
    store = LayerStore(tmp_path / "state")
    img1 = store.unpack(one, d1)
    img2 = store.unpack(two, d2)
    assert img2.layers[0] == img1.layers[0] and len(store.layers()) == 2
    wh = img2.layers[1] / "etc" / "a"
    st = os.lstat(wh)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
    assert os.getxattr(img2.layers[1] / "opt", "trusted.overlay.opaque") == b"y"
    assert img2.lowerdir == f"{img2.layers[1]}:{img2.layers[0]}"
    assert img2.config.cmd == ("/bin/sh",)
    # Unpacked once: a second image with the same base does not touch it again.
    inode = os.stat(img1.layers[0] / "etc" / "b").st_ino
    store.unpack(two, d2)
    assert os.stat(img1.layers[0] / "etc" / "b").st_ino == inode


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ([_file(".wh...", b"")], "would hide the directory above it"),
        ([_entry("sub", tarfile.DIRTYPE), _file("sub/.wh...", b"")], "would hide the directory above it"),
        ([_file(".wh..", b"")], "would hide the directory it is in"),
        ([_file("./.wh..", b"")], "would hide the directory it is in"),
        ([_file(".wh.", b"")], "names no entry"),
        ([_file(".wh..wh.plnk", b"")], "AUFS metadata"),
    ],
    ids=["parent", "nested-parent", "self", "dot-self", "empty", "aufs-meta"],
)
def test_whiteouts_never_reach_outside_the_layer(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], reason: str
) -> None:
    """A whiteout of '..' once made the unpacker rmtree <state>/layers, every other image's layers."""
    store = LayerStore(tmp_path / "state")
    keep = _archive(tmp_path / "keep.tar", [_tar([_file("etc/keep", b"other image")])])
    kept = store.unpack(tmp_path / "keep.tar", keep)
    sibling = kept.layers[0]
    evil = tmp_path / "evil.tar"
    digest = _archive(evil, [_tar([_file("ok", b"fine"), *members])])
    with pytest.raises(ImageError, match=reason):
        store.unpack(evil, digest)
    assert (sibling / "etc" / "keep").read_bytes() == b"other image"
    assert store.layers() == [f"sha256:{sibling.name}"]
    assert sorted(p.name for p in store.root.iterdir()) == sorted([".images", sibling.name])


def test_a_whiteout_hides_a_symlink_not_its_target(tmp_path: Path) -> None:
    require_root()  # the whiteout is a 0:0 device node
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    layer = _tar([_entry("link", tarfile.SYMTYPE, str(outside)), _file(".wh.link", b"")])
    archive = tmp_path / "img.tar"
    image = LayerStore(tmp_path / "state").unpack(archive, _archive(archive, [layer]))
    assert stat.S_ISCHR(os.lstat(image.layers[0] / "link").st_mode)
    assert (outside / "precious").read_text() == "keep"


def test_a_layer_published_meanwhile_by_another_process_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two pool processes unpack the same layer: the second rename finds the first one's directory."""
    from compute import layers

    archive = tmp_path / "img.tar"
    digest = _archive(archive, [_tar([_file("etc/hostname", b"mine")])])
    store = LayerStore(tmp_path / "state")
    real_rename = os.rename
    theirs: list[Path] = []

    def rename_after_the_other(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(src).name.startswith(".tmp-") and not theirs:  # the other process wins the race
            Path(dst).mkdir(parents=True)
            (Path(dst) / "etc").mkdir()
            (Path(dst) / "etc" / "hostname").write_bytes(b"mine")
            theirs.append(Path(dst))
        real_rename(src, dst)

    monkeypatch.setattr(layers.os, "rename", rename_after_the_other)
    image = store.unpack(archive, digest)
    assert theirs and image.layers[0] == theirs[0]
    assert (image.layers[0] / "etc" / "hostname").read_bytes() == b"mine"
    assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp-")], "the loser's copy is gone"


def test_stop_signal_names() -> None:
    assert stop_signal("SIGQUIT") == signal.SIGQUIT == stop_signal("quit") == stop_signal("3")
    assert stop_signal("") == signal.SIGTERM == stop_signal("SIGNOPE") == stop_signal("999")
