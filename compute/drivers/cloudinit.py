"""NoCloud seed ISO (volume label ``cidata``) for a VM spec, laid out as clouds do it.

The tenant's SSH keys travel in meta-data ``public-keys`` (as on OpenStack,
EC2 and GCE), never in user-data, so a user's own user-data (a script, a
``#cloud-config`` or a multi-part MIME document) keeps them and is written to
the seed byte for byte.  Without user-data the seed carries a minimal
``#cloud-config`` (hostname only).  The operator's defaults go in
``vendor-data``, which cloud-init applies before user-data and which a
user's ``#cloud-config`` may override.

The generated files are JSON, which is valid YAML for cloud-init and easy
for the tiny sample guest to read line by line; nothing is formatted from
user strings.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from compute.spec import InstanceSpec


class SeedError(Exception):
    """The seed ISO could not be built."""


def meta_data(spec: InstanceSpec) -> str:
    """instance-id, local-hostname and the SSH keys (``public-keys``, whatever the user-data)."""
    md: dict[str, Any] = {"instance-id": spec.instance_id, "local-hostname": spec.hostname}
    if spec.ssh_keys:
        md["public-keys"] = list(spec.ssh_keys)
    return json.dumps(md, indent=2) + "\n"


def network_config(spec: InstanceSpec) -> str:
    """network-config version 2: one ethernet per NIC (matched by MAC, named eth0, eth1, ... in the
    spec's order) with its static address and resolver; the default route only on the first NIC that
    has a gateway (two default routes would fight)."""
    ethernets: dict[str, Any] = {}
    routed = False
    for i, net in enumerate(spec.networks):
        eth: dict[str, Any] = {
            "match": {"macaddress": net.mac},
            "set-name": f"eth{i}",
            "addresses": [net.address],
            "mtu": net.mtu,
        }
        if net.gateway and not routed:
            routed = True
            # "0.0.0.0/0", not "default": cloud-init before 23.1 (Debian 12 ships 22.4) rejects the
            # keyword ("Address default is not a valid ip network"), fails its init-local stage
            # and leaves the NIC down.
            eth["routes"] = [{"to": "0.0.0.0/0", "via": net.gateway}]
        if net.dns:
            eth["nameservers"] = {"addresses": list(net.dns)}
        ethernets[f"eth{i}"] = eth
    return json.dumps({"version": 2, "ethernets": ethernets}, indent=2) + "\n"


def user_data(spec: InstanceSpec) -> str:
    """The user's own user-data untouched, else a ``#cloud-config`` with the hostname.

    The keys are not here: they are in meta-data, so they do not depend on
    which of the two this is.
    """
    if spec.user_data is not None:
        return spec.user_data
    return "#cloud-config\n" + json.dumps({"hostname": spec.hostname}, indent=2) + "\n"


def seed_files(spec: InstanceSpec) -> dict[str, bytes]:
    """Every file of the seed by name, as the bytes written to the ISO."""
    files = {
        "meta-data": meta_data(spec),
        "network-config": network_config(spec),
        "user-data": user_data(spec),
    }
    if spec.vendor_data is not None:
        files["vendor-data"] = spec.vendor_data
    return {name: text.encode("utf-8") for name, text in files.items()}


def build_seed(spec: InstanceSpec, path: Path) -> Path:
    """Write the seed ISO for ``spec`` to ``path`` (replaced if present)."""
    files = seed_files(spec)
    with tempfile.TemporaryDirectory(prefix=".seed-", dir=path.parent) as tmp:
        for fname, content in files.items():
            (Path(tmp) / fname).write_bytes(content)
        partial = path.with_name(path.name + ".partial")
        cmd = ["genisoimage", "-quiet", "-output", str(partial), "-volid", "cidata", "-joliet", "-rock"]
        args = [*cmd, *(str(Path(tmp) / f) for f in files)]
        proc = subprocess.run(args, check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            partial.unlink(missing_ok=True)
            raise SeedError(f"genisoimage failed: {proc.stderr.strip()[-300:]}")
    partial.chmod(0o644)
    partial.replace(path)
    return path
