"""Host capability checks for tests that run for real (root, libvirtd, crun).

Outside CI a missing capability skips the test with the reason.  With ``CI``
set it fails the test instead: CI must never pass by skipping real tests.
"""

from __future__ import annotations

import os
import shutil

import pytest


def require(ok: bool, what: str) -> None:
    """Skip (locally) or fail (in CI) unless ``ok``; ``what`` names the need."""
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"host capability missing in CI: {what}", pytrace=False)
    pytest.skip(f"host capability missing: {what}")


def require_root() -> None:
    require(os.geteuid() == 0, "root (run the suite as root, as `make test` does)")


def require_binary(name: str) -> None:
    require(shutil.which(name) is not None, f"{name} on PATH (installed by `make test`)")


def require_libvirtd(uri: str = "qemu:///system") -> None:
    require_root()
    try:
        import libvirt

        conn = libvirt.open(uri)
        conn.close()
        ok, why = True, ""
    except Exception as exc:  # libvirt raises libvirtError or ImportError
        ok, why = False, str(exc)
    require(ok, f"a running libvirtd at {uri} (`make test` starts one): {why}")
