"""The rule fingerprint a heartbeat stores is never one listed across another rule load.

After a load the router writes a pending token; the next heartbeat lists the tables (outside the
lock: listing costs as much as loading) and stores their fingerprint.  If another load went in
while it listed, what it listed may be the tables before that load: stored, the beat after would
report the rules "changed outside Skyport" and load them whole for nothing.  No root needed: the
listing is replaced, the lock is a file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from compute.config import NodeConfig
from compute.network import router as router_mod
from compute.network.router import Router


def _router(tmp_path: Path) -> Router:
    cfg = NodeConfig("drift", tmp_path / "state", "", "qemu", "crun", "")
    return Router(dataclasses.replace(cfg, network_lock=tmp_path / "net.lock"))


def _loaded(r: Router) -> None:
    """What the end of a rule load writes (router._converge_locked)."""
    r.root.mkdir(parents=True, exist_ok=True)
    (r.root / "fingerprint").write_text(f"{router_mod.PENDING} {router_mod.secrets.token_hex(8)}")


def test_a_listing_across_another_load_is_not_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = _router(tmp_path)
    _loaded(r)
    tables = {"now": "before-second-load"}

    def listing_while_a_load_goes_in() -> str:
        seen = tables["now"]
        _loaded(r)  # another create's load, between the listing and the store
        tables["now"] = "after-second-load"
        return seen

    monkeypatch.setattr(r, "_fingerprint", listing_while_a_load_goes_in)
    assert r.drift() == ""
    assert (r.root / "fingerprint").read_text().startswith(router_mod.PENDING)  # not the stale listing

    monkeypatch.setattr(r, "_fingerprint", lambda: tables["now"])
    assert r.drift() == ""  # this beat stores the tables as they are
    assert (r.root / "fingerprint").read_text() == "after-second-load"
    assert r.drift() == ""  # and the next one finds them unchanged

    tables["now"] = "someone ran nft flush"
    assert "changed outside Skyport" in r.drift()


def test_a_fingerprint_file_of_the_older_form_is_still_pending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = _router(tmp_path)
    r.root.mkdir(parents=True)
    (r.root / "fingerprint").write_text(router_mod.PENDING)  # written by a node before this change
    monkeypatch.setattr(r, "_fingerprint", lambda: "tables")
    assert r.drift() == ""
    assert (r.root / "fingerprint").read_text() == "tables"
