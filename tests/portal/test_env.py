"""Portal settings are parsed in one place: a bad value names its variable instead of a bare ValueError."""

from __future__ import annotations

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
