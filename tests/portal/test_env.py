"""Portal settings are parsed in one place: a bad value names its variable instead of a bare ValueError."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from portal import env


def test_typed_readers_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X_INT", "12")
    assert env.integer("X_INT", 1, minimum=1) == 12
    monkeypatch.setenv("X_INT", "twelve")
    with pytest.raises(ImproperlyConfigured, match="X_INT='twelve': expected a whole number"):
        env.integer("X_INT", 1)
    monkeypatch.setenv("X_INT", "40")
    with pytest.raises(ImproperlyConfigured, match=r"X_INT='40': expected a whole number within 8..29"):
        env.integer("X_INT", 24, minimum=8, maximum=29)
    monkeypatch.setenv("X_SECONDS", "-1")
    with pytest.raises(ImproperlyConfigured, match="X_SECONDS='-1': expected a positive number of seconds"):
        env.seconds("X_SECONDS", 5)
    monkeypatch.setenv("X_BOOL", "perhaps")
    with pytest.raises(ImproperlyConfigured, match="X_BOOL='perhaps'"):
        env.boolean("X_BOOL", False)
    monkeypatch.setenv("X_BOOL", "on")
    assert env.boolean("X_BOOL", False) is True
    monkeypatch.delenv("X_BOOL")
    assert env.boolean("X_BOOL", True) is True
    monkeypatch.setenv("X_CHOICE", "random")
    with pytest.raises(ImproperlyConfigured, match="X_CHOICE='random': expected one of spread, pack"):
        env.choice("X_CHOICE", "spread", ("spread", "pack"))


def test_settings_parse_numbers_only_through_the_readers() -> None:
    from pathlib import Path

    source = (Path(__file__).resolve().parents[2] / "portal" / "settings.py").read_text()
    assert "int(os.environ" not in source and "float(os.environ" not in source


def test_resend_after_follows_the_heartbeat_and_refuses_less_than_three_beats(tmp_path: Path) -> None:
    """SKYPORT_RESEND_AFTER_SECONDS (portal/cloud/resend.py): a lag of a beat or two is no loss."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    code = (
        "import django; django.setup(); from django.conf import settings as s; "
        "print(s.SKYPORT_RESEND_AFTER_SECONDS)"
    )

    def run(**extra: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SKYPORT_", "DJANGO_", "CELERY_"))}
        env.update(DJANGO_SETTINGS_MODULE="portal.settings", SKYPORT_VAR_DIR=str(tmp_path), **extra)
        return subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)

    assert float(run().stdout) == 60
    assert float(run(SKYPORT_HEARTBEAT_SECONDS="60").stdout) == 180  # three beats, when longer
    assert float(run(SKYPORT_RESEND_AFTER_SECONDS="20", SKYPORT_HEARTBEAT_SECONDS="5").stdout) == 20
    refused = run(SKYPORT_RESEND_AFTER_SECONDS="10", SKYPORT_HEARTBEAT_SECONDS="5")
    assert refused.returncode != 0
    assert "SKYPORT_RESEND_AFTER_SECONDS (10) must be at least three heartbeats" in refused.stderr
