"""VXLAN segments that stretch a tenant bridge across nodes (pyroute2).

Each tenant network has a VNI.  A node that carries the network and has a
tunnel (underlay) address gets one VXLAN device ``skx-<vni>`` enslaved to
the network's bridge: local address = the node's tunnel address, UDP port
4789, MAC learning on.  No multicast in the underlay: for each peer node an
all-zeros FDB entry on the device (``bridge fdb append 00:00:00:00:00:00
dev skx-<vni> dst <peer>``) makes the kernel copy broadcast and unknown
unicast frames to every peer (head-end replication); replies are then
learnt per MAC.  Frames of one VNI never reach another VNI's bridge.

The encapsulation costs 50 bytes (IPv4 outer header 20 + UDP 8 + VXLAN 8 +
inner Ethernet 14), so the tenant side (bridge, veths, taps) must use an
MTU at least 50 below the underlay's: :func:`ensure_vxlan` refuses a
larger one instead of dropping big frames silently.

Everything here is idempotent and works in the network namespace of the
calling thread.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from compute.network.bridge import EEXIST, ENODEV, ENOENT, NetworkError
from compute.network.hostlock import host_lock
from compute.spec import VNI_MAX

VXLAN_PORT = 4789
#: outer IPv4 (20) + UDP (8) + VXLAN (8) + the inner Ethernet header (14)
VXLAN_OVERHEAD = 50
PREFIX = "skx-"
ALL_ZEROS = "00:00:00:00:00:00"


def device_name(vni: int) -> str:
    """The VXLAN device of ``vni``: ``skx-`` + decimal VNI (at most 12 characters)."""
    _check_vni(vni)
    return f"{PREFIX}{vni}"


def _check_vni(vni: int) -> None:
    if isinstance(vni, bool) or not isinstance(vni, int) or not 1 <= vni <= VNI_MAX:
        raise NetworkError(f"VNI must be an integer within 1..{VNI_MAX}, got {vni!r}")


def _ipv4(what: str, value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise NetworkError(f"{what} must be an IPv4 address, got {value!r}") from None


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def _underlay(ipr: IPRoute, local: str) -> tuple[int, int]:
    """(ifindex, mtu) of the interface that holds the tunnel address."""
    for addr in ipr.get_addr(family=2):
        if addr.get_attr("IFA_ADDRESS") == local:
            idx = int(addr["index"])
            link = ipr.get_links(idx)[0]
            return idx, int(link.get_attr("IFLA_MTU"))
    raise NetworkError(
        f"tunnel address {local} is not configured on any interface of this node "
        "(check SKYPORT_TUNNEL_ADDRESS)"
    )


def _vxlan_info(link: Any) -> dict[str, Any] | None:
    info = link.get_attr("IFLA_LINKINFO")
    if info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan":
        return None
    data = info.get_attr("IFLA_INFO_DATA")
    if data is None:
        return {}
    return {
        "id": data.get_attr("IFLA_VXLAN_ID"),
        "local": data.get_attr("IFLA_VXLAN_LOCAL"),
        "port": data.get_attr("IFLA_VXLAN_PORT"),
        "learning": data.get_attr("IFLA_VXLAN_LEARNING"),
    }


def ensure_vxlan(vni: int, local: str, bridge: str, mtu: int) -> int:
    """Create or fix ``skx-<vni>`` and enslave it to ``bridge``; return its ifindex.

    Idempotent.  A device of that name with another VNI, local address or
    port is replaced.  The bridge must exist.  Raises :class:`NetworkError`
    when the tunnel address is not on this node or when ``mtu`` does not
    leave room for the VXLAN header in the underlay's MTU.
    """
    name = device_name(vni)
    local = _ipv4("tunnel address", local)
    with host_lock(), IPRoute() as ipr:
        under_idx, under_mtu = _underlay(ipr, local)
        if mtu + VXLAN_OVERHEAD > under_mtu:
            raise NetworkError(
                f"network MTU {mtu} is too large for VXLAN over an underlay MTU of {under_mtu}: "
                f"at most {under_mtu - VXLAN_OVERHEAD}"
            )
        br = _index(ipr, bridge)
        if br is None:
            raise NetworkError(f"bridge {bridge} does not exist; create it before its VXLAN device")
        idx = _index(ipr, name)
        if idx is not None:
            have = _vxlan_info(ipr.get_links(idx)[0])
            want = {"id": vni, "local": local, "port": VXLAN_PORT, "learning": 1}
            if have != want:
                ipr.link("del", index=idx)
                idx = None
        if idx is None:
            try:
                ipr.link(
                    "add",
                    ifname=name,
                    kind="vxlan",
                    vxlan_id=vni,
                    vxlan_local=local,
                    vxlan_port=VXLAN_PORT,
                    vxlan_learning=1,
                    vxlan_link=under_idx,
                )
            except NetlinkError as exc:
                if exc.code == EEXIST:
                    raise NetworkError(
                        f"cannot create {name}: another VXLAN device already uses VNI {vni} "
                        f"on UDP port {VXLAN_PORT} in this network namespace"
                    ) from exc
                raise NetworkError(f"cannot create VXLAN device {name}: {exc}") from exc
            idx = _index(ipr, name)
            if idx is None:
                raise NetworkError(f"VXLAN device {name} vanished after creation")
        ipr.link("set", index=idx, mtu=mtu, master=br, state="up")
        return idx


def peers(vni: int) -> list[str]:
    """Underlay addresses that get broadcast/unknown frames of ``vni`` ([] without a device)."""
    with IPRoute() as ipr:
        idx = _index(ipr, device_name(vni))
        if idx is None:
            return []
        return sorted(_flood_entries(ipr, idx))


def _flood_entries(ipr: IPRoute, idx: int) -> set[str]:
    found = set()
    for entry in ipr.fdb("dump", ifindex=idx):
        if entry["ifindex"] != idx or entry.get_attr("NDA_LLADDR") != ALL_ZEROS:
            continue
        dst = entry.get_attr("NDA_DST")
        if dst:
            found.add(str(dst))
    return found


def set_peers(vni: int, addresses: list[str] | tuple[str, ...], *, prune: bool) -> None:
    """Add the missing all-zeros FDB entries of ``addresses`` to ``skx-<vni>`` (idempotent).

    With ``prune`` the flood list becomes exactly ``addresses``: entries for
    other addresses are removed.  Learnt per-MAC entries are left to age out.
    """
    want = {_ipv4("peer address", a) for a in addresses}
    name = device_name(vni)
    with host_lock(), IPRoute() as ipr:
        idx = _index(ipr, name)
        if idx is None:
            raise NetworkError(f"VXLAN device {name} does not exist; ensure it before setting peers")
        have = _flood_entries(ipr, idx)
        for dst in sorted(want - have):
            try:
                ipr.fdb("append", ifindex=idx, lladdr=ALL_ZEROS, dst=dst)
            except NetlinkError as exc:
                if exc.code != EEXIST:
                    raise NetworkError(f"cannot add peer {dst} to {name}: {exc}") from exc
        for dst in sorted(have - want) if prune else ():
            try:
                ipr.fdb("del", ifindex=idx, lladdr=ALL_ZEROS, dst=dst)
            except NetlinkError as exc:
                if exc.code not in (ENOENT, ENODEV):
                    raise NetworkError(f"cannot remove peer {dst} from {name}: {exc}") from exc


def delete_vxlan(vni: int) -> None:
    """Delete ``skx-<vni>`` (its FDB goes with it); succeeds if it does not exist."""
    name = device_name(vni)
    with host_lock(), IPRoute() as ipr:
        idx = _index(ipr, name)
        if idx is None:
            return
        try:
            ipr.link("del", index=idx)
        except NetlinkError as exc:
            if exc.code not in (ENODEV, ENOENT):
                raise NetworkError(f"cannot delete VXLAN device {name}: {exc}") from exc
