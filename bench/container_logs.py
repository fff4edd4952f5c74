"""Container logs: what conmon's k8s-file costs against passthrough, and what a read costs.

    .venv/bin/python bench/container_logs.py            # as root, from the repo root
    .venv/bin/python bench/container_logs.py --runs 24

A/B in one run, alternating: the driver's ``spawn()`` and a container that
writes 20 MB to stdout (spawn to exit), with conmon's k8s-file log (what the
driver does) and with passthrough (what it did before; the command line is
rewritten on its way to conmon).  Then reads of a 4 MiB log (two 2 MiB files)
through ``compute.logs.read_selection``.  Everything is removed at the end.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from compute import logs  # noqa: E402
from compute.config import NodeConfig  # noqa: E402
from compute.drivers import conmon  # noqa: E402
from compute.drivers.container import ContainerDriver  # noqa: E402
from compute.spec import ImageFormat, ImageRef, InstanceSpec, Kind, PowerState  # noqa: E402

MODES = ("k8s-file", "passthrough")
CHATTY = "yes 0123456789012345678901234567890123456789012345678901234567890123456789 | head -c 20000000"


def _spec(image: ImageRef, command: str) -> InstanceSpec:
    import uuid

    return InstanceSpec(
        instance_id=str(uuid.uuid4()),
        name="bench",
        hostname="bench",
        tenant="bench",
        kind=Kind.CONTAINER,
        vcpus=1,
        ram_mb=64,
        disk_gb=0,
        image=image,
        command=("/bin/sh", "-c", command),
    )


def _with_mode(mode: dict[str, str]) -> Callable[..., Any]:
    real = subprocess.Popen

    def popen(cmd: Any, *args: Any, **kwargs: Any) -> Any:
        if mode["m"] == "passthrough" and isinstance(cmd, list) and cmd and cmd[0] == "conmon":
            i = cmd.index("-l")
            cmd = [*cmd[:i], "-l", "passthrough", *cmd[i + 4 :]]  # drops --log-size-max N too
        return real(cmd, *args, **kwargs)

    return popen


def ab(runs: int, image: ImageRef, state: Path) -> None:
    mode = {"m": MODES[0]}
    conmon.subprocess.Popen = _with_mode(mode)  # type: ignore[misc]
    cfg = NodeConfig(f"bench{secrets.token_hex(3)}", state, "test:///default", "qemu", "crun", "memory://")
    drv = ContainerDriver(cfg)
    spawn: dict[str, list[float]] = {m: [] for m in MODES}
    chatty: dict[str, list[float]] = {m: [] for m in MODES}
    try:
        for i in range(runs):
            mode["m"] = MODES[i % 2]
            spec = _spec(image, "echo hi; exec sleep 100")
            t = time.perf_counter()
            drv.spawn(spec)
            spawn[mode["m"]].append(time.perf_counter() - t)
            drv.destroy(spec.instance_id)
        for i in range(max(2, runs // 4)):
            mode["m"] = MODES[i % 2]
            spec = _spec(image, CHATTY)
            t = time.perf_counter()
            drv.spawn(spec)
            while drv.info(spec.instance_id).power_state == PowerState.RUNNING:
                time.sleep(0.005)
            chatty[mode["m"]].append(time.perf_counter() - t)
            drv.destroy(spec.instance_id)
    finally:
        conmon.subprocess.Popen = subprocess.Popen  # type: ignore[misc]
        for d in (state / "containers").glob("sky-*"):
            drv.destroy(d.name.removeprefix("sky-"))
    for m in MODES:
        print(
            f"{m:12} spawn median {statistics.median(spawn[m]) * 1000:6.1f} ms (n={len(spawn[m])}); "
            f"20 MB to stdout, spawn to exit: median {statistics.median(chatty[m]):.2f} s "
            f"(n={len(chatty[m])})"
        )


def reads(tmp: Path) -> None:
    log = tmp / "container.log"
    t0 = time.time_ns()
    data = b"".join(
        f"{logs.format_time(t0 + i * 1000)} {'stderr' if i % 3 == 0 else 'stdout'} F line {i} ".encode()
        + b"x" * 60
        + b"\n"
        for i in range(40000)
    )
    cap = 2 << 20
    log.with_name("container.log.1").write_bytes(data[:cap])
    log.write_bytes(data[cap : 2 * cap])
    newest = logs.read(log)
    cases = {
        "tail=100": logs.Selection(tail=100),
        "stream=stderr tail=100": logs.Selection(tail=100, stream="stderr"),
        "since= the newest ~150 lines": logs.Selection(since_ns=newest[-150].ns),
        "everything (1 MiB reply)": logs.Selection(),
    }
    full = []
    for _ in range(5):
        t = time.perf_counter()
        logs.select(logs.read(log), logs.Selection(tail=100))
        full.append(time.perf_counter() - t)
    print(
        f"4 MiB log, {len(newest)} lines; parsing it all for tail=100: "
        f"{statistics.median(full) * 1000:.1f} ms"
    )
    for name, sel in cases.items():
        took = []
        for _ in range(7):
            t = time.perf_counter()
            got, truncated = logs.read_selection(log, sel)
            took.append(time.perf_counter() - t)
        print(f"  {name:30} {len(got):5} lines{' (truncated)' if truncated else ''}: "
              f"median {statistics.median(took) * 1000:.1f} ms")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=24)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="skylogs"))
    try:
        subprocess.run(
            [str(REPO / "images/sample_container/build.sh"), str(tmp)], check=True, capture_output=True
        )
        archive = next(tmp.glob("busybox-[0-9]*.oci.tar"))
        digest = (archive.parent / (archive.name + ".sha256")).read_text().split()[0]
        image = ImageRef("busybox", "bench", ImageFormat.OCI, f"sha256:{digest}", str(archive))
        ab(args.runs, image, tmp / "node")
        reads(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
