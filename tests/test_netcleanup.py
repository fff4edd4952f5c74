"""A test session first removes what a killed run left in its network pool, and only that.

In a network namespace the test makes: a dead run's tenant bridge (with a port) and a fixture's
bridge in the pool, the dead node's tables naming the bridge; the sweep removes them and the
tables.  A bridge that a live node's table (``skyport``) names, or a link that is not Skyport's,
stops the run with a message instead.  Only a session alone on its pool may sweep.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import netcleanup
from tests.hostcaps import require_binary, require_root

pytestmark = [pytest.mark.host]

ROOT = Path(__file__).resolve().parent.parent
POOL = "198.18.200.0/22"


def _run(ns: str, *args: str) -> None:
    r = subprocess.run(["ip", "netns", "exec", ns, *args], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, f"{' '.join(args)}: {r.stderr}"


def _sweep(ns: str) -> dict[str, object]:
    code = (
        "import json; from tests import netcleanup\n"
        "try:\n"
        f"    print(json.dumps({{'removed': netcleanup.sweep_stale({POOL!r})}}))\n"
        "except netcleanup.PoolTaken as exc:\n"
        "    print(json.dumps({'taken': str(exc)}))\n"
    )
    r = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def _links(ns: str) -> set[str]:
    out = subprocess.run(["ip", "-n", ns, "-j", "link", "show"], capture_output=True, text=True, check=True)
    return {link["ifname"] for link in json.loads(out.stdout)}


def _tables(ns: str) -> set[str]:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "list", "tables"], capture_output=True, text=True, check=True
    )
    return {line.split()[-1] for line in out.stdout.splitlines() if line.startswith("table")}


def _table_naming(ns: str, table: str, bridge: str) -> None:
    _run(ns, "nft", "add", "table", "inet", table)
    _run(ns, "nft", "add", "set", "inet", table, "bridges", "{ type ifname; }")
    _run(ns, "nft", "add", "element", "inet", table, "bridges", f"{{ {bridge} }}")
    _run(ns, "nft", "add", "table", "bridge", table)


def _bridge(ns: str, name: str, address: str) -> None:
    _run(ns, "ip", "link", "add", name, "type", "bridge")
    _run(ns, "ip", "addr", "add", address, "dev", name)
    _run(ns, "ip", "link", "set", name, "up")


@pytest.fixture
def ns() -> Iterator[str]:
    require_root()
    require_binary("nft")
    name = f"skclean-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def test_a_killed_runs_bridges_and_tables_are_removed_and_nothing_else(ns: str) -> None:
    _bridge(ns, "skn-dead0001", "198.18.200.1/24")
    _run(ns, "ip", "link", "add", "skv-port1", "type", "veth", "peer", "name", "skv-port2")
    _run(ns, "ip", "link", "set", "skv-port1", "master", "skn-dead0001")
    _table_naming(ns, "t_deadnode", "skn-dead0001")
    _bridge(ns, "skw0badf00d", "198.18.201.1/24")  # a workload fixture's, no table
    _bridge(ns, "skn-other001", "198.18.210.1/24")  # outside the pool: not looked at
    _table_naming(ns, "t_othernode", "skn-other001")

    got = _sweep(ns)

    assert sorted(got["removed"]) == [  # type: ignore[call-overload]
        "link skn-dead0001 (ports skv-port1)",
        "link skw0badf00d",
        "nftables tables t_deadnode",
    ], got
    left = _links(ns)
    assert not {"skn-dead0001", "skv-port1", "skv-port2", "skw0badf00d"} & left
    assert "skn-other001" in left
    assert _tables(ns) == {"t_othernode"}
    assert _sweep(ns) == {"removed": []}


def test_a_live_nodes_bridge_or_a_foreign_link_in_the_pool_stops_the_run(ns: str) -> None:
    _bridge(ns, "skn-live0001", "198.18.202.1/24")
    _table_naming(ns, "skyport", "skn-live0001")  # the `make run` node's table: alive
    got = _sweep(ns)
    assert "skn-live0001 holds 198.18.202.1/24 inside the test network pool" in str(got.get("taken")), got
    assert "named by nftables table skyport" in str(got["taken"])
    assert "skn-live0001" in _links(ns)

    _run(ns, "nft", "delete", "table", "inet", "skyport")
    _run(ns, "ip", "link", "set", "skn-live0001", "name", "br-lab")  # not Skyport's
    got = _sweep(ns)
    assert "br-lab holds 198.18.202.1/24" in str(got.get("taken")), got
    assert "br-lab" in _links(ns)


def test_only_a_lone_session_may_sweep() -> None:
    pool = f"198.18.{secrets.randbelow(200)}.0/24 {secrets.token_hex(3)}"  # a name no session uses
    code = f"from tests import netcleanup; m, alone = netcleanup.claim_test_pool({pool!r}); print(alone)"
    first, alone = netcleanup.claim_test_pool(pool)
    assert alone
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert other.stdout.strip() == "False"  # a live session holds the pool: its bridges are not leftovers
    first.close()
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert other.stdout.strip() == "True"
