"""Rule loads through libnftables (compute/network/nft.py): same result and errors as ``nft``.

Each case runs in a fresh interpreter in a network namespace of its own (``unshare --net``),
which is then that process's own namespace: where the node loads its rules through the library.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.hostcaps import require, require_binary, require_root

ROOT = Path(__file__).resolve().parents[2]

BODY = """
import json, subprocess, threading, time
from compute.network import nft

table = nft.Table("inet", "sklib", chains=(nft.Chain("fwd", hook="forward"),),
                  rules=tuple(nft.Rule("fwd", (nft.ACCEPT,)) for _ in range(40)))
out = {"loaded_by_library": nft._LIBNFT.load() and nft._in_own_namespace()}
t0 = time.perf_counter()
nft.apply([table])
out["apply_ms"] = (time.perf_counter() - t0) * 1000
listed = subprocess.run(["nft", "-j", "list", "table", "inet", "sklib"], capture_output=True, text=True)
out["rules"] = sum(1 for item in json.loads(listed.stdout)["nftables"] if "rule" in item)
before = nft.fingerprint("inet", "sklib")
broken = nft.Table("inet", "sklib", rules=(nft.Rule("nochain", (nft.ACCEPT,)),))
try:
    nft.apply([broken])
    out["refused"] = ""
except nft.NftError as exc:
    out["refused"] = str(exc)
out["unchanged"] = nft.fingerprint("inet", "sklib") == before
nft.apply([table])  # a fresh context after the refusal
out["after"] = nft.fingerprint("inet", "sklib") == before

import os
nft._LIBNFT.lock.acquire()  # as if another thread were loading rules when the process forked
pid = os.fork()
if pid == 0:  # the child (a worker's pool process or heartbeat) loads with a context of its own
    try:
        nft.apply([table])
        os._exit(0)
    except BaseException:
        os._exit(1)
nft._LIBNFT.lock.release()
_, status = os.waitpid(pid, 0)
out["forked_child_loaded"] = os.waitstatus_to_exitcode(status) == 0

def in_thread():  # a thread elsewhere (here: a new namespace) uses the nft program
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.unshare(0x40000000) == 0  # CLONE_NEWNET, this thread only
    out["thread_own"] = nft._in_own_namespace()
    nft.apply([table])

t = threading.Thread(target=in_thread)
t.start()
t.join()
nft.delete([table])
print(json.dumps(out))
"""


def test_the_library_loads_rules_and_refuses_as_nft_does() -> None:
    require_root()
    require_binary("nft")
    require_binary("unshare")
    proc = subprocess.Popen(
        ["unshare", "--net", sys.executable, "-c", textwrap.dedent(BODY)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # a forked child stuck on the lock, if any
        proc.wait(5)
    assert proc.returncode == 0, stderr
    out = json.loads(stdout.strip().splitlines()[-1])
    require(out["loaded_by_library"], "libnftables.so.1 (Debian's libnftables1, which nft itself uses)")
    assert out["rules"] == 40
    assert "nochain" in out["refused"] or "No such file or directory" in out["refused"], out["refused"]
    assert out["unchanged"] and out["after"]
    assert out["forked_child_loaded"]  # not blocked by a lock its parent's thread held at the fork
    assert out["thread_own"] is False  # loaded by the nft program there (see nft.run)
    print(f"40 rules loaded through libnftables in {out['apply_ms']:.1f} ms")
