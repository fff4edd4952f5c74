"""Keystroke round trip through the console path against the bare tools, in one run (root, repo root).

    .venv/bin/python bench/console_latency.py --keys 200 --broker redis://127.0.0.1:6379/12

One keystroke = send one character, wait for the terminal to echo it.

* container, bare: ``crun exec --tty`` of ``/bin/sh`` (its pty master, as the hub opens it)
* container, portal: ticket → relay WebSocket (uvicorn, in this process) → Redis → hub → same shell
* VM, bare: the tiny guest's serial pty opened directly (the device ``virsh console`` reads
  through libvirtd; driving ``virsh console`` itself from here hung and is not measured yet)
* VM, portal: the same console through relay and hub

Then a flood: ``yes`` in the container shell for 5 s with a client that reads nothing;
the hub's RSS and the Redis stream's memory are sampled every 0.1 s.

The portal runs on a throw-away SQLite database with one tenant, member and node;
only Celery is skipped (messages go straight to the node's ``NodeService``).
Everything made is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import secrets
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def note(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def measure(keys: int, send: Callable[[bytes], None], wait_echo: Callable[[bytes], None]) -> list[float]:
    out = []
    for i in range(keys):
        ch = bytes([ord("a") + i % 26])
        t0 = time.perf_counter()
        send(ch)
        wait_echo(ch)
        out.append((time.perf_counter() - t0) * 1000)
    send(b"\x15")  # Ctrl-U: drop the typed line
    return out


def fd_terminal(fd: int) -> tuple[Callable[[bytes], None], Callable[[bytes], None]]:
    def send(data: bytes) -> None:
        os.write(fd, data)

    def wait(ch: bytes) -> None:
        buf = b""
        deadline = time.monotonic() + 10
        while ch not in buf:
            r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not r:
                raise TimeoutError(f"no echo of {ch!r}")
            buf += os.read(fd, 65536)

    return send, wait


def drain_fd(fd: int, quiet: float = 0.3) -> None:
    while select.select([fd], [], [], quiet)[0]:
        try:
            os.read(fd, 65536)
        except OSError:
            return


def ws_terminal(ws: Any) -> tuple[Callable[[bytes], None], Callable[[bytes], None]]:
    def wait(ch: bytes) -> None:
        buf = b""
        while ch not in buf:
            msg = ws.recv(timeout=10)
            if isinstance(msg, bytes):
                buf += msg

    return ws.send, wait


def drain_ws(ws: Any, quiet: float = 0.3) -> None:
    while True:
        try:
            ws.recv(timeout=quiet)
        except TimeoutError:
            return


def setup_portal(tmp: Path, broker: str) -> None:
    os.environ.update(
        DJANGO_SETTINGS_MODULE="portal.settings",
        DATABASE_URL=f"sqlite:///{tmp}/bench.sqlite3",
        CELERY_BROKER_URL=broker,
        SKYPORT_VAR_DIR=str(tmp),
        SKYPORT_NETWORK_POOL="198.19.240.0/20",
    )
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=200)
    ap.add_argument("--broker", default="redis://127.0.0.1:6379/12")
    ap.add_argument("--no-vm", action="store_true")
    args = ap.parse_args()
    # a timeout's SIGTERM still runs the clean-up below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="skyport-console-bench-"))
    vm_root = Path("/var/lib/skyport") / f"bench-console-{secrets.token_hex(3)}"
    vm_root.mkdir(parents=True)
    vm_root.chmod(0o755)
    setup_portal(tmp, args.broker)

    import redis
    import uvicorn
    from websockets.sync.client import connect

    from compute.config import NodeConfig
    from compute.console.streams import HubKeys
    from compute.console.terminal import open_exec, open_serial
    from compute.drivers.container import ContainerDriver
    from compute.drivers.vm import LibvirtDriver
    from compute.spec import ConsoleMode, ImageFormat, ImageRef, InstanceSpec, Kind, NetworkAttachment
    from compute.spec import NetworkSegment as Segment
    from compute.tasks import NodeService
    from portal.cloud import dispatch, networks
    from portal.cloud.models import ComputeNode, Flavor, Instance
    from portal.console import services
    from portal.tenancy.models import Membership, Tenant
    from portal.tenancy.querysets import Actor

    rows: list[tuple[str, list[float]]] = []
    cleanups: list[Callable[[], None]] = []
    try:
        # -------------------------------------------------------------- the node and the portal
        cfg = NodeConfig("bench", tmp / "node", "qemu:///system", "qemu", "crun", args.broker)
        vcfg = NodeConfig("bench", vm_root, "qemu:///system", "qemu", "crun", args.broker)
        cdrv, vdrv = ContainerDriver(cfg), LibvirtDriver(vcfg)
        svcs = {Kind.CONTAINER: NodeService(cfg, lambda t, p: None, {Kind.CONTAINER: cdrv}),
                Kind.VM: NodeService(vcfg, lambda t, p: None, {Kind.VM: vdrv})}  # fmt: skip
        dispatch._send = lambda q, task, a: svcs[Kind(a[0]["kind"])].handle(task, a[0])  # type: ignore[assignment]
        from django.contrib.auth import get_user_model

        tenant = Tenant.objects.create(slug="bench", name="Bench")
        user = get_user_model().objects.create_user("bench", password="x" * 20)
        Membership.objects.create(user=user, tenant=tenant, role="member")
        caps = {"ok": True, "capabilities": ["terminal", "exec", "console"]}
        node = ComputeNode.objects.create(name="bench", queue="node.bench", status="up", vcpus=8, ram_mb=8192,
                                          disk_gb=100, drivers={"vm": caps, "container": caps})  # fmt: skip
        flavor = Flavor.objects.create(name="b1", vcpus=1, ram_mb=128, disk_gb=1)
        actor = Actor(user.pk, "bench", False, {tenant.pk: "member"})

        def row(spec: InstanceSpec, kind: str) -> Instance:
            return Instance.objects.create(
                id=spec.instance_id, tenant=tenant, name=kind, kind=kind, isolation_reason="bench",
                flavor=flavor, network=networks.default_network(tenant), vcpus=1, ram_mb=128, disk_gb=1,
                vm_state="active", power_state="running", node=node,
            )  # fmt: skip

        port = 18000 + secrets.randbelow(2000)
        server = uvicorn.Server(uvicorn.Config("portal.asgi:application", host="127.0.0.1", port=port,
                                               log_level="warning"))  # fmt: skip
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.02)
        cleanups.append(lambda: setattr(server, "should_exit", True))

        def portal_ws(instance: Instance, mode: ConsoleMode, command: tuple[str, ...] = ()) -> Any:
            session, ticket = services.mint(actor, user, instance, mode, command)
            ws = connect(f"ws://127.0.0.1:{port}/ws/console/{ticket}/", open_timeout=10)
            while True:
                msg = ws.recv(timeout=30)
                if isinstance(msg, str) and '"ready"' in msg:
                    return ws, session

        # -------------------------------------------------------------- container
        sys.path.insert(0, str(REPO / "tests"))
        from tests.compute.container_fixtures import make_spec

        subprocess.run([str(REPO / "images/sample_container/build.sh"), str(tmp / "oci")], check=True,
                       capture_output=True)  # fmt: skip
        tar = next((tmp / "oci").glob("busybox-[0-9]*.oci.tar"))
        digest = (tmp / "oci" / (tar.name + ".sha256")).read_text().split()[0]
        image = ImageRef("busybox", "1", ImageFormat.OCI, f"sha256:{digest}", str(tar))
        cspec = make_spec(image, command=("sleep", "36000"), hostname="bench-box")
        cdrv.spawn(cspec)
        cleanups.append(lambda: cdrv.destroy(cspec.instance_id))
        note("container running")
        term = open_exec(cdrv.exec_argv(cspec.instance_id, ("/bin/sh",), tty=True))
        drain_fd(term.fd)
        rows.append(("container: bare crun exec --tty", measure(args.keys, *fd_terminal(term.fd))))
        term.close()
        cinst = row(cspec, "container")
        ws, _ = portal_ws(cinst, ConsoleMode.EXEC, ("/bin/sh",))
        drain_ws(ws)
        rows.append(("container: portal (relay + Redis + hub)", measure(args.keys, *ws_terminal(ws))))

        note("container measured; flood")
        ws.send(b"yes flood-flood-flood-flood\n")
        r = redis.Redis.from_url(args.broker)
        hub_pid = max(p.pid for p in svcs[Kind.CONTAINER]._hubs if p.poll() is None)
        keys = HubKeys(str(_.pk))
        rss, stream = [], []
        end = time.monotonic() + 5
        while time.monotonic() < end:
            with open(f"/proc/{hub_pid}/status") as fh:
                rss.append(next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024)
            stream.append((r.memory_usage(keys.out) or 0) / 2**20)
            time.sleep(0.1)
        ws.close()

        # -------------------------------------------------------------- VM
        if not args.no_vm:
            from tests.compute.vm_fixtures import build_sample_image, image_ref, random_mac, vm_spec

            bname, n = f"skb{secrets.token_hex(3)}", 200 + secrets.randbelow(50)
            net = NetworkAttachment(Segment("bench", bname, host_address=f"198.18.{n}.1/24"),
                                    f"198.18.{n}.10/24", random_mac())  # fmt: skip
            vspec = vm_spec(image_ref(build_sample_image()), (net,), hostname="bench-vm")
            vdrv.spawn(vspec)
            from compute.network import bridge

            cleanups.append(lambda: bridge.delete_bridge(bname))
            cleanups.append(lambda: vdrv.destroy(vspec.instance_id))
            note("VM spawned")
            deadline = time.monotonic() + 120
            while "SKYPORT-READY" not in vdrv.console_log(vspec.instance_id, 1 << 20):
                assert time.monotonic() < deadline, "VM did not boot"
                time.sleep(0.2)
            note("VM ready; its serial pty directly")
            sterm = open_serial(vdrv.serial_pty(vspec.instance_id))
            os.write(sterm.fd, b"\n")
            drain_fd(sterm.fd, 1.0)
            rows.append(
                ("VM: bare serial pty (what virsh console reads)", measure(args.keys, *fd_terminal(sterm.fd)))
            )
            sterm.close()
            note("VM portal")
            vinst = row(vspec, "vm")
            vws, _ = portal_ws(vinst, ConsoleMode.WRITE)
            vws.send(b"\n")
            drain_ws(vws, 1.0)
            rows.append(("VM: portal (relay + Redis + hub)", measure(args.keys, *ws_terminal(vws))))
            vws.close()
    finally:
        for undo in reversed(cleanups):
            try:
                undo()
            except Exception as exc:  # keep cleaning
                print(f"cleanup: {exc}", file=sys.stderr)
        time.sleep(1)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(vm_root, ignore_errors=True)

    print(f"\nKeystroke round trip (send one character, wait for its echo), {args.keys} keys each\n")
    print("| path | p50 ms | p95 ms | max ms |\n|---|---:|---:|---:|")
    for name, values in rows:
        print(f"| {name} | {statistics.median(values):.2f} | {pct(values, 95):.2f} | {max(values):.2f} |")
    print("\nFlood: `yes` in the container shell for 5 s, the client reading nothing\n")
    print("| what | first | max | last |\n|---|---:|---:|---:|")
    print(f"| hub RSS MiB | {rss[0]:.1f} | {max(rss):.1f} | {rss[-1]:.1f} |")
    print(f"| Redis :out stream MiB | {stream[0]:.2f} | {max(stream):.2f} | {stream[-1]:.2f} |")


if __name__ == "__main__":
    main()
