"""Network namespace + veth per container.

The namespace is created by a short-lived thread that ``unshare``s its own
network namespace (no fork: ``IPRoute(netns=…)`` forks a helper and costs
more), creates the veth *inside* it with the peer pushed to the host
namespace, sets the address, MAC, MTU, loopback and, only if the attachment
has a gateway, a default route (only the first such NIC: eth0, eth1, ... in
the spec's order, one default route).  The namespace is bind-mounted on
``netns_path`` so crun can join it; once crun has joined, the caller
unmounts it and the namespace lives exactly as long as the container.  When
it goes, the kernel deletes the veth pair: nothing to clean up on the host.
"""

from __future__ import annotations

import ipaddress
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from compute import nsenv
from compute.network.bridge import NetworkError, ensure_bridge
from compute.spec import NetworkAttachment

HOST_PREFIX = "skc"


def host_ifname(short_id: str, index: int) -> str:
    """Host-side veth name: ``skc`` + 8 hex of the instance id + NIC index."""
    return f"{HOST_PREFIX}{short_id}{index}"[:15]


def _wire_inside(ipr: IPRoute, nics: Sequence[NetworkAttachment], hosts: Sequence[str], host_fd: int) -> None:
    lo = ipr.link_lookup(ifname="lo")[0]
    ipr.link("set", index=lo, state="up")
    routed = False  # one default route: through the first NIC that has a gateway
    for i, (nic, host) in enumerate(zip(nics, hosts, strict=True)):
        name = f"eth{i}"
        ipr.link("add", ifname=name, kind="veth", peer={"ifname": host, "net_ns_fd": host_fd})
        idx = ipr.link_lookup(ifname=name)[0]
        iface = ipaddress.ip_interface(nic.address)
        ipr.link("set", index=idx, address=nic.mac, mtu=nic.mtu)
        ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        ipr.link("set", index=idx, state="up")
        if nic.gateway and not routed:
            ipr.route("add", dst="default", gateway=nic.gateway, oif=idx)
            routed = True


def create_netns(netns_path: Path, short_id: str, nics: Sequence[NetworkAttachment]) -> list[str]:
    """Create a wired network namespace bound on ``netns_path``; return host veth names.

    On failure nothing is left: no bind mount, no namespace, no veth.
    """
    netns_path.touch(mode=0o600)

    def enter() -> None:
        nsenv.unshare(nsenv.CLONE_NEWNET)
        nsenv.mount(
            f"/proc/{os.getpid()}/task/{threading.get_native_id()}/ns/net", netns_path, None, nsenv.MS_BIND
        )

    try:
        return _wire(enter, short_id, nics)
    except BaseException:
        release_netns(netns_path)
        raise


def wire_netns(netns: str, short_id: str, nics: Sequence[NetworkAttachment]) -> list[str]:
    """Wire the existing network namespace ``netns`` (e.g. ``/proc/<pid>/ns/net``); return host veths.

    The container driver lets crun make the namespace inside the container's
    user namespace (so the container can mount its own sysfs) and wires it
    here between ``crun create`` and start.  On failure no veth is left.
    """

    def enter() -> None:
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            nsenv.setns(fd, nsenv.CLONE_NEWNET)
        finally:
            os.close(fd)

    return _wire(enter, short_id, nics)


def _wire(enter: Callable[[], None], short_id: str, nics: Sequence[NetworkAttachment]) -> list[str]:
    hosts = [host_ifname(short_id, i) for i in range(len(nics))]
    for nic in nics:
        ensure_bridge_fast(nic.bridge, nic.mtu)
    error: list[BaseException] = []

    def inside() -> None:
        host_fd = os.open("/proc/self/ns/net", os.O_RDONLY)
        try:
            enter()
            _container_sysctls()
            with IPRoute() as ipr:
                _wire_inside(ipr, nics, hosts, host_fd)
        except BaseException as exc:
            error.append(exc)
        finally:
            os.close(host_fd)

    t = threading.Thread(target=inside, name=f"netns-{short_id}")
    t.start()
    t.join()
    try:
        if error:
            raise NetworkError(f"cannot wire the network namespace: {error[0]}") from error[0]
        with IPRoute() as ipr:
            for nic, host in zip(nics, hosts, strict=True):
                found = ipr.link_lookup(ifname=host)
                bridge = ipr.link_lookup(ifname=nic.bridge)
                if not found or not bridge:
                    raise NetworkError(f"veth {host} or bridge {nic.bridge} missing after creation")
                ipr.link("set", index=found[0], master=bridge[0], mtu=nic.mtu, state="up")
    except BaseException:
        delete_links(hosts)
        raise
    return hosts


# Per-netns sysctls of a container's namespace (this thread is inside it;
# /proc/sys/net is the calling thread's netns).  As Docker does: every port is
# unprivileged and ICMP echo sockets are allowed, so a non-root user inside can
# bind :80 or ping without NET_BIND_SERVICE or NET_RAW.
_NETNS_SYSCTLS = (
    ("net/ipv4/ip_unprivileged_port_start", "0"),
    ("net/ipv4/ping_group_range", "0 2147483647"),
)


def _container_sysctls() -> None:
    for key, value in _NETNS_SYSCTLS:
        with open(f"/proc/sys/{key}", "w") as fh:
            fh.write(value)


def ensure_bridge_fast(name: str, mtu: int) -> None:
    """Create the bridge only when it is missing (``ensure_bridge`` takes a lock)."""
    with IPRoute() as ipr:
        if ipr.link_lookup(ifname=name):
            return
    ensure_bridge(name, mtu=mtu)


def release_netns(netns_path: Path) -> None:
    """Drop the bind mount (the namespace stays while a container uses it)."""
    if nsenv.is_mountpoint(netns_path):
        nsenv.umount(netns_path)
    netns_path.unlink(missing_ok=True)


def delete_links(names: Sequence[str]) -> None:
    """Delete host-side veths that still exist (normally gone with their netns)."""
    with IPRoute() as ipr:
        for name in names:
            found = ipr.link_lookup(ifname=name)
            if found:
                try:
                    ipr.link("del", index=found[0])
                except NetlinkError as exc:
                    if exc.code not in (2, 19):
                        raise
