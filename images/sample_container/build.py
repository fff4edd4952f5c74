"""Write two OCI image archives (OCI layout in a tar) from /bin/busybox.

``busybox-<ver>``: one layer with busybox and its applet links.
``busybox-web-<ver>``: the same base layer plus a layer with an httpd page.
No registry, no umoci: the layout is small enough to write directly, which
keeps the bytes (and digests) reproducible.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
MTIME = 1700000000
APPLETS = [
    "sh",
    "cat",
    "echo",
    "ls",
    "ps",
    "hostname",
    "sleep",
    "id",
    "httpd",
    "ping",
    "ip",
    "ifconfig",
    "mkdir",
    "rm",
    "cp",
    "mv",
    "grep",
    "head",
    "tail",
    "wc",
    "seq",
    "true",
    "false",
    "kill",
    "dd",
    "env",
    "uname",
    "touch",
    "chmod",
    "free",
    "top",
    "nc",
    "wget",
    "date",
]


def busybox_version() -> str:
    out = subprocess.run([str(BUSYBOX)], capture_output=True, text=True, check=False).stdout
    m = re.search(r"BusyBox v(\d+\.\d+\.\d+)", out)
    if not m:
        raise SystemExit("cannot read the busybox version")
    return m.group(1)


def _info(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.size = size
    ti.linkname = link
    ti.mtime = MTIME
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    return ti


def make_layer(entries: list[tuple[str, bytes, int, bytes | str | None]]) -> tuple[bytes, str]:
    """Return (gzip blob, diff_id) of a tar of ``entries`` (name, type, mode, data)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, mode, data in entries:
            if kind == tarfile.REGTYPE:
                assert isinstance(data, bytes)
                tf.addfile(_info(name, kind, mode, len(data)), io.BytesIO(data))
            elif kind == tarfile.SYMTYPE:
                assert isinstance(data, str)
                tf.addfile(_info(name, kind, mode, link=data))
            else:
                tf.addfile(_info(name, kind, mode))
    diff_id = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0, compresslevel=6) as g:
        g.write(raw.getvalue())
    return gz.getvalue(), diff_id


def base_layer() -> tuple[bytes, str]:
    d, r, s = tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.SYMTYPE
    entries: list[tuple[str, bytes, int, bytes | str | None]] = [
        (p, d, 0o755, None) for p in ("bin", "dev", "etc", "proc", "sys", "root", "var", "var/www")
    ]
    entries.append(("tmp", d, 0o1777, None))
    entries.append(("bin/busybox", r, 0o755, BUSYBOX.read_bytes()))
    entries += [(f"bin/{a}", s, 0o777, "busybox") for a in APPLETS]
    entries.append(
        ("etc/passwd", r, 0o644, b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
    )
    entries.append(("etc/group", r, 0o644, b"root:x:0:\nnogroup:x:65534:\n"))
    entries.append(("etc/hosts", r, 0o644, b"127.0.0.1 localhost\n"))
    return make_layer(entries)


def web_layer() -> tuple[bytes, str]:
    page = b"<html><body><h1>Skyport busybox-web</h1></body></html>\n"
    return make_layer(
        [
            ("var", tarfile.DIRTYPE, 0o755, None),
            ("var/www", tarfile.DIRTYPE, 0o755, None),
            ("var/www/index.html", tarfile.REGTYPE, 0o644, page),
        ]
    )


def write_archive(
    out: Path, ref: str, layers: list[tuple[bytes, str]], config_extra: dict[str, object]
) -> None:
    blobs: dict[str, bytes] = {}

    def add(data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return digest

    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2023-11-14T22:13:20Z",
        "config": {"Env": ["PATH=/bin"], "WorkingDir": "/", **config_extra},
        "rootfs": {"type": "layers", "diff_ids": [diff for _, diff in layers]},
    }
    cfg = json.dumps(config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": add(cfg),
            "size": len(cfg),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": add(blob),
                "size": len(blob),
            }
            for blob, _ in layers
        ],
    }
    man = json.dumps(manifest, sort_keys=True).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": add(man),
                "size": len(man),
                "annotations": {"org.opencontainers.image.ref.name": ref},
            }
        ],
    }
    files = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(index, sort_keys=True).encode(),
    }
    for digest, data in blobs.items():
        files["blobs/sha256/" + digest.split(":", 1)[1]] = data
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        for dname in ("blobs", "blobs/sha256"):
            tf.addfile(_info(dname, tarfile.DIRTYPE, 0o755))
        for name in sorted(files):
            data = files[name]
            tf.addfile(_info(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    os.replace(tmp, out)
    sha = out.with_name(out.name + ".sha256")
    sha_tmp = sha.with_name(sha.name + ".tmp")
    sha_tmp.write_text(f"{digest}  {out.name}\n")
    os.replace(sha_tmp, sha)


def up_to_date(out: Path) -> bool:
    sha = out.with_name(out.name + ".sha256")
    if not (out.exists() and sha.exists()):
        return False
    return sha.read_text().split()[0] == hashlib.sha256(out.read_bytes()).hexdigest()


def main() -> None:
    outdir = Path(sys.argv[1])
    outdir.mkdir(parents=True, exist_ok=True)
    ver = busybox_version()
    base = base_layer()
    targets: list[tuple[Path, str, list[tuple[bytes, str]], dict[str, object]]] = [
        (
            outdir / f"busybox-{ver}.oci.tar",
            f"busybox:{ver}",
            [base],
            {"Cmd": ["/bin/sh", "-c", 'echo "hostname=$(hostname) pid=$$"; exec sleep 2147483647']},
        ),
        (
            outdir / f"busybox-web-{ver}.oci.tar",
            f"busybox-web:{ver}",
            [base, web_layer()],
            {
                "Entrypoint": ["/bin/httpd", "-f", "-p", "8080", "-h", "/var/www"],
                "ExposedPorts": {"8080/tcp": {}},
            },
        ),
    ]
    for out, ref, layers, extra in targets:
        if up_to_date(out):
            print(f"up to date: {out}")
            continue
        write_archive(out, ref, layers, extra)
        print(f"built: {out}")


if __name__ == "__main__":
    main()
