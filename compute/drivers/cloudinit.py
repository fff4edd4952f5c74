"""NoCloud seed ISO (volume label ``cidata``) for a VM spec.

The files are JSON, which is valid YAML for cloud-init and easy for the tiny
sample guest to read line by line; nothing is formatted from user strings.
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
    return json.dumps({"instance-id": spec.instance_id, "local-hostname": spec.hostname}, indent=2) + "\n"


def network_config(spec: InstanceSpec) -> str:
    """network-config version 2: static addresses, NICs matched by MAC, gateway route and resolvers."""
    ethernets: dict[str, Any] = {}
    for i, net in enumerate(spec.networks):
        eth: dict[str, Any] = {
            "match": {"macaddress": net.mac},
            "set-name": f"eth{i}",
            "addresses": [net.address],
            "mtu": net.mtu,
        }
        if net.gateway:
            # "0.0.0.0/0", not "default": cloud-init before 23.1 (Debian 12 ships 22.4) rejects the
            # keyword ("Address default is not a valid ip network"), fails its init-local stage
            # and leaves the NIC down.
            eth["routes"] = [{"to": "0.0.0.0/0", "via": net.gateway}]
        if net.dns:
            eth["nameservers"] = {"addresses": list(net.dns)}
        ethernets[f"eth{i}"] = eth
    return json.dumps({"version": 2, "ethernets": ethernets}, indent=2) + "\n"


def user_data(spec: InstanceSpec) -> str:
    """The user's own user-data, else a ``#cloud-config`` with hostname and SSH keys."""
    if spec.user_data is not None:
        return spec.user_data
    cfg = {"hostname": spec.hostname, "ssh_authorized_keys": list(spec.ssh_keys)}
    return "#cloud-config\n" + json.dumps(cfg, indent=2) + "\n"


def build_seed(spec: InstanceSpec, path: Path) -> Path:
    """Write the seed ISO for ``spec`` to ``path`` (replaced if present)."""
    files = {
        "meta-data": meta_data(spec),
        "network-config": network_config(spec),
        "user-data": user_data(spec),
    }
    with tempfile.TemporaryDirectory(prefix=".seed-", dir=path.parent) as tmp:
        for fname, content in files.items():
            (Path(tmp) / fname).write_text(content, encoding="utf-8")
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
