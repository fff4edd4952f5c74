"""Tenant network bridges on a node (pyroute2).

One Linux bridge per tenant network.  Bridges never forward to each other
and get no uplink here; a host-side address is only set where a caller
asks for one (tests and the gateway of a network).
"""

from __future__ import annotations

import ipaddress

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from compute.network.hostlock import host_lock

ENOENT = 2
ENODEV = 19
EEXIST = 17


class NetworkError(Exception):
    """A host networking operation failed; the message says which and why."""


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def ensure_bridge(
    name: str,
    mtu: int = 1500,
    address: str | None = None,
    exclusive: bool = False,
    gateway: str | None = None,
) -> int:
    """Create bridge ``name`` if missing, bring it up, return its ifindex.

    Idempotent.  ``address`` (``198.18.0.1/24``) is added to the bridge if
    given and not present yet; with ``exclusive`` every other IPv4 address
    on the bridge is removed (the node's address on a network can change,
    e.g. from the shared ``.1`` of single-node days to its own).
    ``gateway`` (the network's anycast gateway) is kept as a second address,
    added after ``address`` so the node's own address stays primary (the
    source of the node's ARP requests, which must cross the tunnel).
    """
    with host_lock(), IPRoute() as ipr:
        idx = _index(ipr, name)
        if idx is None:
            try:
                ipr.link("add", ifname=name, kind="bridge", br_stp_state=0, br_forward_delay=0)
            except NetlinkError as exc:
                if exc.code != EEXIST:
                    raise NetworkError(f"cannot create bridge {name}: {exc}") from exc
            idx = _index(ipr, name)
            if idx is None:
                raise NetworkError(f"bridge {name} vanished after creation")
        ipr.link("set", index=idx, mtu=mtu, state="up")
        if address:
            have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=idx)}
            wanted = [_pair(a) for a in (address, gateway) if a]
            if exclusive:
                for ip, prefixlen in sorted(have - set(wanted)):
                    if ipaddress.ip_address(ip).version == 4:
                        ipr.addr("del", index=idx, address=ip, prefixlen=prefixlen)
                # deleting a primary address deletes its secondaries too (promote_secondaries=0)
                have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=idx)}
            for ip, prefixlen in wanted:
                if (ip, prefixlen) in have:
                    continue
                try:
                    ipr.addr("add", index=idx, address=ip, prefixlen=prefixlen)
                except NetlinkError as exc:
                    if exc.code != EEXIST:  # added meanwhile by someone outside our lock: as wanted
                        raise NetworkError(f"cannot add {ip}/{prefixlen} to bridge {name}: {exc}") from exc
        return idx


def _pair(address: str) -> tuple[str, int]:
    iface = ipaddress.ip_interface(address)
    return str(iface.ip), iface.network.prefixlen


def delete_bridge(name: str) -> None:
    """Delete bridge ``name``; succeeds if it does not exist."""
    with host_lock(), IPRoute() as ipr:
        idx = _index(ipr, name)
        if idx is None:
            return
        try:
            ipr.link("del", index=idx)
        except NetlinkError as exc:
            if exc.code not in (ENODEV, ENOENT):
                raise NetworkError(f"cannot delete bridge {name}: {exc}") from exc


def link_exists(name: str) -> bool:
    """Whether a network interface of that name exists in this namespace."""
    with IPRoute() as ipr:
        return _index(ipr, name) is not None


def bridge_ports(name: str) -> list[str]:
    """Names of the interfaces enslaved to bridge ``name`` ([] if no bridge)."""
    with IPRoute() as ipr:
        idx = _index(ipr, name)
        if idx is None:
            return []
        return [
            str(link.get_attr("IFLA_IFNAME"))
            for link in ipr.get_links()
            if link.get_attr("IFLA_MASTER") == idx
        ]
