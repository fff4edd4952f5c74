"""Run every benchmark of the project and write docs/benchmarks.md and docs/benchmarks.png.

    .venv/bin/python bench/report.py            # the full set (about 7 minutes here)
    .venv/bin/python bench/report.py --quick    # fewer runs, 200 containers, a 256 MiB upload

Each benchmark runs as its own process (as a user would run it) with
``--json``; its table goes into the report as printed, and the JSON
feeds the summary and the chart.  Needs what the benchmarks need: root,
libvirtd, crun, redis-server and the sample images (`make run` or `make
test` set them up).  Nothing is kept running afterwards.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
KEPT = "<!-- sections below are kept by bench/report.py: long benchmarks run by hand -->"


def machine() -> dict[str, str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    sys.path.insert(0, str(REPO))
    from compute.drivers.accel import choose_domain_type

    accel = choose_domain_type("auto")
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": f"{mem_kib / 2**20:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "VM acceleration": "KVM" if accel == "kvm" else "TCG (software emulation)",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def run(name: str, args: list[str], out: Path) -> tuple[dict[str, Any], str, float]:
    """Run bench/<name> with --json; returns (json, stdout, seconds)."""
    path = out / f"{name}.json"
    start = time.perf_counter()
    print(f"== {name} {' '.join(args)}", file=sys.stderr, flush=True)
    proc = subprocess.run(
        [PY, str(REPO / "bench" / name), *args, "--json", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    took = time.perf_counter() - start
    if proc.returncode != 0 or not path.exists():
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{name} failed (exit {proc.returncode}); nothing written")
    return json.loads(path.read_text()), proc.stdout.strip(), took


def chart(rows: list[tuple[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values = zip(*rows, strict=True)
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(rows) + 1.4), dpi=110)
    bars = ax.barh(range(len(rows)), values, color=["#3b6ea8" if v <= 1.2 else "#c0703a" for v in values])
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel("time relative to the bare tool in the same run (1.0 = bare; lower is better)")
    for bar, v in zip(bars, values, strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:.2f}x", va="center")
    ax.set_xlim(0, max(values) * 1.18)
    ax.set_title("Skyport vs the bare runtime on this machine")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer runs and smaller sizes")
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    args = ap.parse_args()
    q = args.quick
    with tempfile.TemporaryDirectory(prefix="skyport-report-") as tmp:
        out = Path(tmp)
        plan = [
            ("container_start.py", ["--runs", "10" if q else "20"]),
            ("container_start.py", ["--density", "200" if q else "1000"]),
            ("vm_boot.py", ["--runs", "2" if q else "5"]),
            ("api_e2e.py", ["--runs", "2" if q else "5", "--burst", "100"]),
            ("api_latency.py", ["--instances", "1000", "--requests", "50" if q else "200"]),
            ("image_upload.py", ["--size-mib", "256" if q else "1024", "--runs", "1" if q else "3"]),
        ]
        results: list[tuple[str, dict[str, Any], str, float]] = []
        for i, (name, bargs) in enumerate(plan):
            (out / str(i)).mkdir()
            data, text, took = run(name, bargs, out / str(i))
            results.append((name, data, text, took))
    start, dens, vm, e2e, lat, up = (r[1] for r in results)
    info = machine()
    ratios = [
        ("container: driver spawn (no network)", start["driver_ms"] / start["bare_ms"]),
        ("container: driver spawn (veth)", start["driver_veth_ms"] / start["bare_ms"]),
        ("container: API POST → running", e2e["api_container_s"] / e2e["crun_s"]),
        ("VM: driver spawn → guest ready", vm["ratio"]),
        ("VM: API POST → guest ready (vs driver)", e2e["vm_api_s"] / e2e["vm_driver_s"]),
        ("image upload 1 file (vs cp + sha256sum)", up["upload_s"] / up["bare_s"]),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    chart(ratios, args.out / "benchmarks.png")
    burst = e2e["burst"]
    lines = [
        "# Benchmarks",
        "",
        f"Written by `bench/report.py{' --quick' if q else ''}` on {info['date']}; run it again to refresh. "
        "Every number compares Skyport with the bare tool measured in the same run on the same machine.",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in info.items()),
        "",
        "![ratios to the bare tools](benchmarks.png)",
        "",
        "## Summary",
        "",
        "| what | Skyport | bare tool | ratio |",
        "|---|---:|---:|---:|",
        f"| container start, driver, no network | {start['driver_ms']:.1f} ms | {start['bare_ms']:.1f} ms "
        f"(`crun run -d`) | {ratios[0][1]:.2f} |",
        f"| container start, driver, veth | {start['driver_veth_ms']:.1f} ms | {start['bare_ms']:.1f} ms "
        f"| {ratios[1][1]:.2f} |",
        f"| container, API POST → running | {e2e['api_container_s'] * 1000:.0f} ms "
        f"| {e2e['crun_s'] * 1000:.0f} ms | {ratios[2][1]:.2f} |",
        # each start after 0.1 s idle, as an API create is (docs/container-driver.md, "A start on a quiet")
        f"| container start, driver, no network, each after idle | {start['driver_ms_quiet']:.1f} ms "
        f"| {start['bare_ms_quiet']:.1f} ms | {start['driver_ms_quiet'] / start['bare_ms_quiet']:.2f} |",
        f"| container start, driver, veth, each after idle | {start['driver_veth_ms_quiet']:.1f} ms "
        f"| {start['bare_ms_quiet']:.1f} ms | {start['driver_veth_ms_quiet'] / start['bare_ms_quiet']:.2f} |",
        f"| container, API POST → running, against crun after idle | {e2e['api_container_s'] * 1000:.0f} ms "
        f"| {e2e['crun_quiet_s'] * 1000:.0f} ms | {e2e['api_container_s'] / e2e['crun_quiet_s']:.2f} |",
        f"| VM, driver spawn → guest ready | {vm['driver_s']:.2f} s | {vm['bare_s']:.2f} s (plain libvirt) "
        f"| {ratios[3][1]:.2f} |",
        f"| VM, API POST → guest ready | {e2e['vm_api_s']:.2f} s | {e2e['vm_driver_s']:.2f} s (the driver) "
        f"| {ratios[4][1]:.2f} |",
        f"| image upload, {up['size_mib']:.0f} MiB qcow2 | {up['upload_s']:.2f} s "
        f"({up['upload_mb_s']:.0f} MB/s), web peak RSS {up['peak_rss_mib']:.0f} MiB "
        f"| {up['bare_s']:.2f} s (`cp` + `sha256sum`) | {ratios[5][1]:.2f} |",
        f"| density | {dens['running']:.0f} of {dens['n']:.0f} containers running, "
        f"{dens['mib_each']:.2f} MiB each, started in {dens['started_s']:.0f} s | | |",
        f"| {burst['n']} concurrent creates (quota {burst['quota']}) | {burst['wall_s']:.2f} s, "
        f"{burst['accepted']} accepted, {burst['overshoot']} overshoot, "
        f"{burst['double_placement']} double placements | | |",
        "",
        f"## API latency at {lat['instances']} instances",
        "",
        "| request | p50 (ms) | p95 (ms) | SQL queries |",
        "|---|---:|---:|---:|",
        *(
            f"| {k} | {v['p50_ms']:.1f} | {v['p95_ms']:.1f} | {v['queries']:.0f} |"
            for k, v in lat["results"].items()
        ),
        "",
        "## Each benchmark as it printed",
        "",
    ]
    for name, _, text, took in results:
        lines += [f"### `bench/{name}` ({took:.0f} s)", "", "```", text, "```", ""]
    # the long-running benchmarks (bench/scale.py, bench/broker_failover.py) are run by hand and
    # their sections kept below this line, written with the commands that produced them
    old = args.out / "benchmarks.md"
    kept = old.read_text().partition(KEPT)[2] if old.exists() and KEPT in old.read_text() else ""
    if kept:
        lines += [KEPT + kept.rstrip("\n"), ""]
    old.write_text("\n".join(lines))
    print(f"wrote {args.out / 'benchmarks.md'} and {args.out / 'benchmarks.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
