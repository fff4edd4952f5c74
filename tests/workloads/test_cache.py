"""The test-image cache (images/debian/testimages.py): built once per key, shared, rebuilt on change.

These use a stand-in build function (the real one takes minutes; tests/workloads/test_*
prove what it makes); the locking, key, reuse and pruning are the real code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from images.debian import testimages

REPO = Path(__file__).resolve().parents[2]


def fake_build(work: Path, debs: Path) -> None:
    out = work / "out"
    out.mkdir()
    (out / "disk").write_text("x")
    (out / testimages.MANIFEST).write_text(json.dumps({"files": {}}))


def test_key_follows_the_builder_sources(tmp_path: Path) -> None:
    src = tmp_path / "debian"
    shutil.copytree(REPO / "images" / "debian", src, ignore=shutil.ignore_patterns("__pycache__"))
    k = testimages.key(src)
    assert k == testimages.key(REPO / "images" / "debian")  # same sources, same key on any clone
    (src / "__pycache__").mkdir(exist_ok=True)
    (src / "__pycache__" / "x.pyc").write_bytes(b"noise")
    assert testimages.key(src) == k
    with (src / "cloud.sh").open("a") as fh:
        fh.write("# changed\n")
    assert testimages.key(src) != k


def test_built_once_then_reused(tmp_path: Path) -> None:
    calls: list[Path] = []

    def build(work: Path, debs: Path) -> None:
        calls.append(work)
        fake_build(work, debs)

    entry = testimages.ensure(tmp_path, "k1", build)
    assert entry == tmp_path / "k1" and (entry / "disk").read_text() == "x"
    assert testimages.cached(tmp_path, "k1") == entry
    assert testimages.ensure(tmp_path, "k1", build) == entry
    assert len(calls) == 1
    assert not list(tmp_path.glob(".work-*"))  # the work dir went


def test_a_failed_build_leaves_its_log_and_no_entry(tmp_path: Path) -> None:
    def broken(work: Path, debs: Path) -> None:
        (work / "build.log").write_text("debootstrap: E: no mirror\n")
        raise RuntimeError("debootstrap failed")

    with pytest.raises(RuntimeError, match="debootstrap failed"):
        testimages.ensure(tmp_path, "k1", broken)
    assert testimages.cached(tmp_path, "k1") is None
    assert "no mirror" in (tmp_path / "failed-k1.log").read_text()
    assert not (tmp_path / "k1").exists() and not list(tmp_path.glob(".work-*"))
    testimages.ensure(tmp_path, "k1", fake_build)  # the next try builds, and drops the old log
    assert not (tmp_path / "failed-k1.log").exists()


def test_only_the_most_recently_used_entries_stay(tmp_path: Path) -> None:
    for i, k in enumerate(("a", "b", "c")):
        testimages.ensure(tmp_path, k, fake_build)
        os.utime(tmp_path / k / ".used", (1000 + i, 1000 + i))
    testimages.ensure(tmp_path, "a", fake_build)  # used again: newest
    testimages.ensure(tmp_path, "d", fake_build)
    kept = sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and p.name != "debs")
    assert kept == ["a", "c", "d"]  # b was the least recently used


def test_two_clones_building_at_once_wait_for_one_build(tmp_path: Path) -> None:
    """Two processes (as two clones' `make test` would) ask for the same key: one build, both get it."""
    script = textwrap.dedent(
        f"""
        import sys, time, json
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from images.debian import testimages
        def build(work, debs):
            with open({str(tmp_path / "builds")!r}, "a") as fh:
                fh.write("build\\n")
            time.sleep(1.0)
            out = work / "out"; out.mkdir()
            (out / testimages.MANIFEST).write_text(json.dumps({{"files": {{}}}}))
        print(testimages.ensure(Path({str(tmp_path / "cache")!r}), "k1", build))
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=30)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == [str(tmp_path / "cache" / "k1")] * 2
    # one build: the second process waited on the lock, then found the first one's entry
    assert (tmp_path / "builds").read_text() == "build\n"


def test_cli_prints_the_cached_entry_or_says_what_is_missing(tmp_path: Path) -> None:
    env = {**os.environ, "SKYPORT_TEST_IMAGE_CACHE": str(tmp_path)}
    sh = REPO / "images" / "debian" / "build.sh"
    missing = subprocess.run([sh, "--cached"], env=env, capture_output=True, text=True)
    assert missing.returncode == 1 and "no test images for key" in missing.stderr
    k = subprocess.run([sh, "--key"], env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert k == testimages.key()
    testimages.ensure(tmp_path, k, fake_build)
    found = subprocess.run([sh, "--cached"], env=env, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == str(tmp_path / k)
    warm = subprocess.run([sh, "--cache"], env=env, capture_output=True, text=True, check=True)
    assert warm.stdout.strip() == str(tmp_path / k)
    assert warm.stderr == ""  # found, not built
    assert (tmp_path / k / "disk").read_text() == "x"
