"""Choice of the QEMU accelerator (libvirt domain type) on this host.

libvirt lists ``kvm`` whenever /dev/kvm opens, also under PVM (``kvm_pvm``),
where stock guest kernels hang; so the choice is made from the CPU flags and
the loaded KVM flavour, never from libvirt capabilities alone.
"""

from __future__ import annotations

import re
from pathlib import Path

_HW_VIRT = re.compile(r"^flags\s*:.*\b(vmx|svm)\b", re.MULTILINE)


def choose_domain_type(
    setting: str,
    cpuinfo: Path = Path("/proc/cpuinfo"),
    pvm_module: Path = Path("/sys/module/kvm_pvm"),
) -> str:
    """libvirt domain type for ``setting`` (``auto``, ``kvm`` or ``qemu``).

    ``auto`` picks ``kvm`` only when the CPU has vmx/svm and KVM is not the
    PVM flavour; otherwise ``qemu`` (TCG).  An explicit setting wins.
    """
    if setting in ("kvm", "qemu"):
        return setting
    if setting != "auto":
        raise ValueError(f"accelerator must be auto, kvm or qemu, got {setting!r}")
    try:
        flags = cpuinfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return "qemu"
    if _HW_VIRT.search(flags) and not pvm_module.exists():
        return "kvm"
    return "qemu"
