"""Upload throughput of a VM disk through the API, and the web process's peak memory.

    .venv/bin/python bench/image_upload.py [--size-mib 1024] [--runs 3]

Makes a qcow2 with SIZE MiB of data (qemu-io writes a pattern), then per run:
- bare tool: `cp` of the file into the same file system, then `sha256sum`
  (what the portal must do at least: write it once, hash it once);
- API: `PUT /api/v1/images/{id}/file/?type=qcow2` with a Bearer token to a
  real gunicorn (gthread, as `make run` starts it), timed to the 202, and
  on to `active` (the control worker's validation: qemu-img info + check).
The web worker's peak resident memory (VmHWM) is read after the runs.

A scratch SQLite database and image store under /var/lib/skyport/bench-*,
Redis database 7 for the control worker; everything is removed at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BASE = Path("/var/lib/skyport") / f"bench-upload-{secrets.token_hex(4)}"
BROKER = "redis://127.0.0.1:6379/7"
ENV = {
    "DJANGO_SETTINGS_MODULE": "portal.settings",
    "SKYPORT_VAR_DIR": str(BASE / "var"),
    "CELERY_BROKER_URL": BROKER,
    "SKYPORT_SECRET_KEY": secrets.token_urlsafe(50),
    "SKYPORT_ALLOWED_HOSTS": "127.0.0.1",
}
os.environ.update(ENV)
os.environ.pop("DATABASE_URL", None)

import django  # noqa: E402

django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402

from portal.images.models import Image  # noqa: E402
from portal.tenancy.models import APIToken, Membership, Tenant  # noqa: E402

VENV_BIN = Path(sys.executable).parent
GTHREAD = ("-k", "gthread", "--threads", "4", "--timeout", "120")  # as `make run` starts it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_disk(path: Path, mib: int) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{2 * mib}M"], check=True)
    # one write per 64 MiB keeps qemu-io's buffer small; the pattern differs per chunk
    cmds = []
    for i in range(0, mib, 64):
        cmds += ["-c", f"write -P {i % 251 + 1} {i}M {min(64, mib - i)}M"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(path)], check=True, capture_output=True)


def bare(disk: Path, dest_dir: Path) -> float:
    dest = dest_dir / "copy.qcow2"
    start = time.perf_counter()
    subprocess.run(["cp", str(disk), str(dest)], check=True)
    subprocess.run(["sha256sum", str(dest)], check=True, capture_output=True)
    took = time.perf_counter() - start
    dest.unlink()
    return took


def put(port: int, token: str, image_id: int, disk: Path) -> tuple[int, float]:
    size = disk.stat().st_size
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.putrequest("PUT", f"/api/v1/images/{image_id}/file/?type=qcow2")
    conn.putheader("Authorization", f"Bearer {token}")
    conn.putheader("Content-Type", "application/octet-stream")
    conn.putheader("Content-Length", str(size))
    conn.endheaders()
    with disk.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            conn.send(chunk)
    resp = conn.getresponse()
    body = resp.read()
    took = time.perf_counter() - start
    conn.close()
    if resp.status != 202:
        raise SystemExit(f"upload answered {resp.status}: {body[:300]!r}")
    return resp.status, took


def wait_active(image_id: int, timeout: float = 600) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        image = Image.objects.get(pk=image_id)
        if image.status == "active":
            return time.perf_counter() - start
        if image.status == "failed":
            raise SystemExit(f"import failed: {image.status_reason}")
        time.sleep(0.05)
    raise SystemExit("import did not finish")


def rss_peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()
    BASE.mkdir(parents=True, mode=0o755, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        call_command("migrate", verbosity=0)
        tenant = Tenant.objects.create(slug="bench", name="Bench")
        user = get_user_model().objects.create_user("bench", password=secrets.token_urlsafe(12))
        membership = Membership.objects.create(user=user, tenant=tenant, role="member")
        token = APIToken(user=user, membership=membership, name="bench", expires_at="2999-01-01T00:00:00Z")
        key = token.issue()
        token.save()
        disk = BASE / "disk.qcow2"
        make_disk(disk, args.size_mib)
        size = disk.stat().st_size
        subprocess.run(["redis-cli", "-u", BROKER, "flushdb"], capture_output=True, timeout=10)
        env = {**os.environ, **ENV}
        port = free_port()
        log = (BASE / "bench.log").open("wb")
        procs.append(
            subprocess.Popen(
                [str(VENV_BIN / "celery"), "-A", "portal", "worker", "-Q", "control", "--concurrency", "1"],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        )
        web = subprocess.Popen(
            [str(VENV_BIN / "gunicorn"), "portal.wsgi", "-b", f"127.0.0.1:{port}", "-w", "1", *GTHREAD],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        procs.append(web)
        for _ in range(100):
            try:
                http.client.HTTPConnection("127.0.0.1", port, timeout=1).request("GET", "/healthz")
                break
            except OSError:
                time.sleep(0.1)
        # warm up: the first request loads the URLconf, DRF and the views
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/api/v1/images/", headers={"Authorization": f"Bearer {key}"})
        conn.getresponse().read()
        conn.close()
        workers = children(web.pid)
        idle_kib = sum(rss_peak_kib(p) for p in workers)
        rows: dict[str, list[float]] = {"bare": [], "upload": [], "import": []}
        for run in range(args.runs):
            rows["bare"].append(bare(disk, BASE))
            image = Image.objects.create(name="big", version=str(run), owner=tenant)
            _, took = put(port, key, image.pk, disk)
            rows["upload"].append(took)
            rows["import"].append(wait_active(image.pk))
        peak_kib = max(rss_peak_kib(p) for p in workers)
        mb = size / 1e6
        b, u, i = (statistics.median(rows[k]) for k in ("bare", "upload", "import"))
        print(
            f"\nfile: {size / 2**20:.0f} MiB qcow2 ({args.size_mib} MiB of data), {args.runs} runs, medians\n"
        )
        print("| path | seconds | MB/s | ratio to bare |")
        print("|---|---|---|---|")
        print(f"| bare: cp + sha256sum | {b:.2f} | {mb / b:.0f} | 1.00 |")
        print(f"| API PUT -> 202 (streamed, hashed) | {u:.2f} | {mb / u:.0f} | {u / b:.2f} |")
        print(f"| 202 -> active (qemu-img info + check, store) | {i:.2f} | - | - |")
        print(f"| PUT -> active | {u + i:.2f} | {mb / (u + i):.0f} | {(u + i) / b:.2f} |")
        print(
            f"\nweb worker peak RSS (VmHWM): {peak_kib / 1024:.0f} MiB "
            f"(after a warm-up request: {idle_kib / 1024:.0f} MiB, file: {size / 2**20:.0f} MiB)"
        )
        summary = {
            "size_mib": size / 2**20,
            "bare_s": b,
            "upload_s": u,
            "import_s": i,
            "upload_mb_s": mb / u,
            "peak_rss_mib": peak_kib / 1024,
            "idle_rss_mib": idle_kib / 1024,
        }
        print(json.dumps(summary))
        if args.json:
            args.json.write_text(json.dumps(summary))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(BASE, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
