"""Real workloads for Skyport's tests, built offline from Debian packages and cached per machine.

    images/debian/build.sh --cache     build into the machine cache unless present; print its directory
    images/debian/build.sh --cached    print the cached directory, or exit 1 (never builds)
    images/debian/build.sh --key       print the cache key
    images/debian/build.sh OUTDIR      build into OUTDIR (no cache)

What it builds (``images.json`` in the directory lists every file with its sha256):

- ``debian-cloud.qcow2``: a Debian 12 cloud guest (systemd, cloud-init 22.4 with
  ``datasource_list: [ NoCloud, None ]``, openssh-server, ifupdown, python3,
  curl), serial getty on ttyS0 (rootfs.sh, cloud.sh);
- OCI archives sharing one Debian base layer (debootstrap minbase without docs,
  apt lists and /dev nodes): ``nginx.oci.tar``, ``pyhttp.oci.tar`` (``USER
  1000``, ``python3 -m http.server``), ``crashloop.oci.tar`` (prints a line,
  exits 3), ``pyhttp.docker.tar`` (the same image as ``docker save``), and
  ``debian-devnodes.oci.tar`` whose single layer keeps debootstrap's /dev device
  nodes (ocilayers.py).

The cache is ``/var/cache/skyport/test-images/<key>/`` (``SKYPORT_TEST_IMAGE_CACHE``
moves it), the key a hash of this directory's files: a change to any builder
rebuilds, anything else reuses.  Builds hold ``flock`` on ``.lock``, so two clones
building at once wait for one build; a complete entry is one whose
``images.json`` exists (written last), so readers need no lock.  Downloaded
.debs stay in ``debs/`` (only those the last build used), and the three most
recently used entries are kept.  Standard library only: the tests import it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = Path("/var/cache/skyport/test-images")
MANIFEST = "images.json"
KEEP_ENTRIES = 3
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

CLOUD_PACKAGES = (
    "linux-image-cloud-amd64",
    "systemd-sysv",
    "udev",
    "dbus",  # systemctl, hostnamectl and logind for non-root users, as on any Debian cloud image
    "cloud-init",
    "cloud-guest-utils",
    "openssh-server",
    "ifupdown",
    "iproute2",
    "netbase",
    "net-tools",  # cloud-init 22.4's ifupdown renderer sets routes with `route`
    "curl",
    "sudo",
)


def cache_root() -> Path:
    return Path(os.environ.get("SKYPORT_TEST_IMAGE_CACHE", str(DEFAULT_CACHE)))


def key(src: Path = HERE) -> str:
    """Hash of the builder sources: every file under ``src`` but caches."""
    h = hashlib.sha256()
    for p in sorted(src.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(p.relative_to(src).as_posix().encode() + b"\0")
            h.update(p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def cached(root: Path | None = None, k: str | None = None) -> Path | None:
    """The complete cache entry for the current sources, or None."""
    entry = (root or cache_root()) / (k or key())
    return entry if (entry / MANIFEST).is_file() else None


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _touch(entry: Path) -> None:
    (entry / ".used").touch()


def ensure(root: Path, k: str, build: Callable[[Path, Path], None]) -> Path:
    """The entry ``root/k``, made by ``build(workdir, debs)`` under the lock unless complete.

    ``build`` fills ``workdir/out`` and must write its manifest last; a failed
    build leaves nothing but its log (``root/failed-<k>.log``).
    """
    entry = root / k
    if (entry / MANIFEST).is_file():
        _touch(entry)
        return entry
    with _locked(root):
        if (entry / MANIFEST).is_file():  # another clone built it while we waited
            _touch(entry)
            return entry
        for stale in root.glob(".work-*"):  # left by a build that was killed; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        work = root / f".work-{k}"
        work.mkdir()
        try:
            build(work, root / "debs")
            out = work / "out"
            if not (out / MANIFEST).is_file():
                raise RuntimeError(f"the build wrote no {MANIFEST}")
            shutil.rmtree(entry, ignore_errors=True)
            out.chmod(0o755)
            os.replace(out, entry)
        finally:
            log = work / "build.log"
            if log.exists() and not (entry / MANIFEST).is_file():
                os.replace(log, root / f"failed-{k}.log")
            shutil.rmtree(work, ignore_errors=True)
        for old_log in root.glob("failed-*.log"):
            old_log.unlink()
        _touch(entry)
        _prune(root, keep=entry)
    return entry


def _prune(root: Path, keep: Path) -> None:
    """Keep the ``KEEP_ENTRIES`` most recently used entries (``keep`` always)."""
    entries = [p for p in root.iterdir() if p.is_dir() and (p / MANIFEST).is_file() and p != keep]
    entries.sort(key=lambda p: (p / ".used").stat().st_mtime if (p / ".used").exists() else 0, reverse=True)
    for old in entries[KEEP_ENTRIES - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------- build


class Builder:
    """One build: shell steps logged to ``build.log``, progress on stderr."""

    def __init__(self, work: Path, debs: Path, out: Path) -> None:
        self.work, self.debs, self.out = work, debs, out
        self.log_path = work / "build.log"
        self.steps: dict[str, float] = {}

    def sh(self, *args: str | Path) -> None:
        with self.log_path.open("a") as log:
            log.write(f"$ {' '.join(map(str, args))}\n")
            log.flush()
            proc = subprocess.run([str(a) for a in args], stdout=log, stderr=subprocess.STDOUT, check=False)
        if proc.returncode != 0:
            tail = self.log_path.read_text(errors="replace").splitlines()[-30:]
            raise RuntimeError(f"{Path(str(args[0])).name} failed ({proc.returncode}):\n" + "\n".join(tail))

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        print(f"test images: {name} …", file=sys.stderr, flush=True)
        yield
        self.steps[name] = round(time.monotonic() - t0, 1)

    def root(self, name: str) -> Path:
        return self.work / f"root-{name}"

    def derive(self, name: str, *packages: str) -> Path:
        root = self.root(name)
        self.sh(HERE / "rootfs.sh", "derive", self.debs, self.root("base"), root, *packages)
        return root

    def chroot(self, root: Path, *args: str) -> None:
        self.sh(HERE / "rootfs.sh", "run", root, *args)


def _write(path: Path, text: str, mode: int = 0o644, owner: tuple[int, int] = (0, 0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    os.chown(path, *owner)


def _symlink(path: Path, target: str) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to(target)


def dpkg_status(root: Path) -> list[dict[str, str]]:
    """The stanzas of the tree's dpkg status (Package, Version, Architecture, …)."""
    stanzas: list[dict[str, str]] = []
    for block in (root / "var/lib/dpkg/status").read_text().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and line[0] != " ")
        if "Package" in fields:
            stanzas.append(fields)
    return stanzas


def dpkg_versions(root: Path) -> dict[str, str]:
    """Installed package → version."""
    return {p["Package"]: p.get("Version", "") for p in dpkg_status(root)}


def _prune_debs(debs: Path, roots: list[Path]) -> None:
    """Keep only the .debs of packages installed in ``roots`` (the cache stays bounded)."""
    wanted = {
        f"{p['Package']}_{p.get('Version', '').replace(':', '%3a')}_{p.get('Architecture', '')}.deb"
        for root in roots
        for p in dpkg_status(root)
    }
    for deb in debs.glob("*.deb"):
        if deb.name not in wanted:
            deb.unlink()


def _nginx(b: Builder) -> Path:
    root = b.derive("nginx", "nginx")
    _write(root / "var/www/html/index.html", "<!doctype html><title>skyport</title><h1>Skyport nginx</h1>\n")
    # As the usual nginx images: logs to the container's stdout/stderr.
    _symlink(root / "var/log/nginx/access.log", "/dev/stdout")
    _symlink(root / "var/log/nginx/error.log", "/dev/stderr")
    return root


def _pyhttp(b: Builder) -> Path:
    root = b.derive("pyhttp", "python3")
    b.chroot(root, "groupadd", "--gid", "1000", "app")
    b.chroot(
        root, "useradd", "--uid", "1000", "--gid", "1000", "--home-dir", "/srv/www", "--no-create-home", "app"
    )
    www = root / "srv/www"
    www.mkdir(parents=True, exist_ok=True)
    os.chown(www, 1000, 1000)
    _write(
        www / "index.html",
        "<!doctype html><title>skyport</title><h1>Skyport pyhttp</h1>\n",
        owner=(1000, 1000),
    )
    return root


CRASHLOOP = """#!/bin/sh
# Skyport test workload: says who it is, then fails (restart-policy tests).
echo "crashloop: pid $$ uid $(id -u) exiting with ${CRASH_EXIT:-3}"
exit "${CRASH_EXIT:-3}"
"""


def _crashloop(b: Builder) -> Path:
    root = b.derive("crashloop")  # nothing to install: the layer is the script
    _write(root / "usr/local/bin/crashloop", CRASHLOOP, mode=0o755)
    return root


def _file_entry(path: Path, fmt: str, extra: dict[str, Any], sha: str | None = None) -> dict[str, Any]:
    if sha is None:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        sha = h.hexdigest()
    return {"file": path.name, "format": fmt, "sha256": sha, "size": path.stat().st_size, **extra}


def build(work: Path, debs: Path) -> None:
    """Every test image into ``work/out`` (manifest last)."""
    from images.debian import ocilayers as oci  # only a build needs it

    t0 = time.monotonic()
    out = work / "out"
    out.mkdir()
    b = Builder(work, debs, out)
    files: dict[str, dict[str, Any]] = {}
    with b.step("debootstrap minbase"):
        b.sh(HERE / "rootfs.sh", "base", debs, b.root("base"))
    base = b.root("base")
    with b.step("app roots (nginx, python3, crashloop)"):
        apps = {"nginx": _nginx(b), "pyhttp": _pyhttp(b), "crashloop": _crashloop(b)}
    with b.step("cloud root"):
        cloud = b.derive("cloud", *CLOUD_PACKAGES)
    versions = {
        "debian": (base / "etc/debian_version").read_text().strip(),
        **{p: v for p, v in dpkg_versions(cloud).items() if p in ("cloud-init", "openssh-server", "systemd")},
        "kernel": next(p for p in dpkg_versions(cloud) if p.startswith("linux-image-6")),
        "nginx": dpkg_versions(apps["nginx"])["nginx"],
        "python3": dpkg_versions(apps["pyhttp"])["python3"],
    }
    _prune_debs(debs, [base, cloud, *apps.values()])
    with b.step("OCI layers and archives"):
        layers = work / "layers"
        layers.mkdir()
        base_layer = oci.write_layer(base, layers, "base")
        common = {"Env": [PATH_ENV], "WorkingDir": "/"}
        images: dict[str, tuple[oci.Layer, dict[str, Any], str]] = {
            "nginx": (
                oci.write_layer(apps["nginx"], layers, "nginx", lower=base),
                {
                    **common,
                    "Env": [PATH_ENV, "NGINX_ENTRY=skyport"],
                    "Entrypoint": ["/usr/sbin/nginx"],
                    "Cmd": ["-g", "daemon off;"],
                    "ExposedPorts": {"80/tcp": {}},
                    "StopSignal": "SIGQUIT",
                    "WorkingDir": "/var/www/html",
                },
                "apt-get install nginx; index.html; logs to stdout/stderr",
            ),
            "pyhttp": (
                oci.write_layer(apps["pyhttp"], layers, "pyhttp", lower=base),
                {
                    **common,
                    "Cmd": ["python3", "-m", "http.server", "8000"],
                    "User": "1000",
                    "WorkingDir": "/srv/www",
                    "ExposedPorts": {"8000/tcp": {}},
                },
                "apt-get install python3; useradd app (1000); /srv/www",
            ),
            "crashloop": (
                oci.write_layer(apps["crashloop"], layers, "crashloop", lower=base),
                {**common, "Env": [PATH_ENV, "CRASH_EXIT=3"], "Entrypoint": ["/usr/local/bin/crashloop"]},
                "crashloop script",
            ),
        }
        for name, (layer, config, why) in images.items():
            cfg = oci.image_config([base_layer, layer], config, ["debootstrap bookworm minbase", why])
            path = out / f"{name}.oci.tar"
            sha = oci.write_oci_archive(path, f"skyport-test/{name}:1", [base_layer, layer], cfg)
            files[name] = _file_entry(path, "oci", {"layers": [base_layer.digest, layer.digest]}, sha)
            if name == "pyhttp":
                dpath = out / "pyhttp.docker.tar"
                dsha = oci.write_docker_archive(dpath, "skyport-test/pyhttp:1", [base_layer, layer], cfg)
                files["pyhttp-docker"] = _file_entry(
                    dpath, "docker", {"diff_ids": [base_layer.diff_id, layer.diff_id]}, dsha
                )
        dev_layer = oci.write_layer(base, layers, "devnodes", keep_dev=True)
        cfg = oci.image_config(
            [dev_layer],
            {**common, "Cmd": ["/bin/sh", "-c", "echo debian-devnodes; ls /dev; exec sleep 2147483647"]},
            ["debootstrap bookworm minbase, /dev device nodes kept"],
        )
        path = out / "debian-devnodes.oci.tar"
        sha = oci.write_oci_archive(path, "skyport-test/debian-devnodes:1", [dev_layer], cfg)
        files["debian-devnodes"] = _file_entry(path, "oci", {"devices": dev_layer.devices}, sha)
        shutil.rmtree(layers)
    for root in apps.values():
        shutil.rmtree(root)
    with b.step("cloud disk"):
        b.sh(HERE / "cloud.sh", cloud, out / "debian-cloud.qcow2")
        files["debian-cloud"] = _file_entry(out / "debian-cloud.qcow2", "qcow2", {})
    shutil.rmtree(cloud)
    shutil.rmtree(base)
    manifest = {
        "key": work.name.removeprefix(".work-"),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.monotonic() - t0, 1),
        "steps": b.steps,
        "versions": versions,
        "base_layer": base_layer.digest,
        "files": files,
    }
    if b.log_path.exists():
        shutil.copy(b.log_path, out / "build.log")
    for p in out.iterdir():
        p.chmod(0o644)
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.chmod(0o644)
    os.replace(tmp, out / MANIFEST)


def _build_into(outdir: Path) -> Path:
    """Build without the cache (a work dir beside ``outdir``); returns ``outdir``."""
    outdir.parent.mkdir(parents=True, exist_ok=True)
    work = outdir.parent / f".work-{os.getpid()}"
    work.mkdir()
    try:
        build(work, outdir.parent / ".debs")
        shutil.rmtree(outdir, ignore_errors=True)
        os.replace(work / "out", outdir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return outdir


def main(argv: list[str], stdout: IO[str] = sys.stdout) -> int:
    if os.geteuid() != 0 and argv[:1] != ["--key"] and argv[:1] != ["--cached"]:
        print("build.sh: needs root (debootstrap, chroot, device nodes)", file=sys.stderr)
        return 2
    if argv == ["--key"]:
        print(key(), file=stdout)
        return 0
    if argv == ["--cached"]:
        entry = cached()
        if entry is None:
            print(f"build.sh: no test images for key {key()} in {cache_root()}", file=sys.stderr)
            return 1
        print(entry, file=stdout)
        return 0
    if argv == ["--cache"]:
        t0 = time.monotonic()
        try:
            entry = ensure(cache_root(), key(), build)
        except (RuntimeError, OSError, ValueError) as exc:  # a step failed: one line and the log
            print(
                f"build.sh: {exc}\nbuild.sh: full log in {cache_root()}/failed-{key()}.log", file=sys.stderr
            )
            return 1
        took = time.monotonic() - t0
        if took > 5:
            print(f"test images: built in {took:.0f} s", file=sys.stderr)
        print(entry, file=stdout)
        return 0
    if len(argv) == 1 and not argv[0].startswith("-"):
        print(_build_into(Path(argv[0]).resolve()), file=stdout)
        return 0
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))  # run as a script: make `images.debian` importable
    sys.exit(main(sys.argv[1:]))
