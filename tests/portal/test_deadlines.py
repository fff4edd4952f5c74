"""Task deadlines outlast the broker's redelivery of a message a dead worker took (docs/faults.md)."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone

from portal.cloud import deadlines
from portal.cloud.choices import TaskState
from portal.cloud.models import Instance
from portal.cloud.tasks import sweep
from tests.portal.conftest import World

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("visibility", [1, 4, 300, 3600, 43200])
def test_every_deadline_outlasts_redelivery_plus_a_margin(visibility: float) -> None:
    derived = deadlines.derive(visibility)
    assert set(derived) == set(TaskState.values) - {TaskState.SCHEDULING}
    for task, seconds in derived.items():
        assert seconds > visibility + deadlines.RESTORE_CHECK_SECONDS + deadlines.MIN_MARGIN_SECONDS, task
        # the margin left for the work itself is the task's own budget, whatever the visibility
        assert seconds - deadlines.redelivery_seconds(visibility) == deadlines.WORK_SECONDS[task]
    deadlines.check(visibility, derived)


def test_the_default_spawning_deadline_is_not_the_visibility_timeout(settings: Any) -> None:
    """The bug this guards against: both were 300 s."""
    assert settings.CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"] == 300
    assert deadlines.deadline_seconds(TaskState.SPAWNING) == 300 + 100 + 300
    with pytest.raises(ImproperlyConfigured, match="SKYPORT_BROKER_VISIBILITY_SECONDS=300"):
        deadlines.check(300, {**deadlines.derive(300), TaskState.SPAWNING: 300})


def test_deadlines_follow_the_visibility_setting(settings: Any) -> None:
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600.0}
    assert deadlines.deadline_seconds(TaskState.SPAWNING) == 3600 + 100 + 300
    assert deadlines.deadline_seconds(TaskState.PAUSING) == 3600 + 100 + 60


def _create(world: World, name: str) -> Instance:
    body = {"tenant": "acme", "name": name, "image": "tiny:1", "flavor": world.flavor_public.pk, "kind": "vm"}
    r = world.client("a_member").post("/api/v1/instances/", body, format="json")
    assert r.status_code == 202, r.content
    return Instance.objects.get(pk=r.json()["id"])


def test_the_sweeper_waits_for_a_redelivered_create(world: World, settings: Any) -> None:
    """Claimed at t: a redelivery at t + visibility + restore check still finds the row spawning."""
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 300.0}
    before = timezone.now()
    inst = _create(world, "slow")
    assert inst.task_state == TaskState.SPAWNING and inst.task_deadline is not None
    redelivered = before + dt.timedelta(seconds=deadlines.redelivery_seconds(300))
    assert inst.task_deadline > redelivered + dt.timedelta(seconds=deadlines.MIN_MARGIN_SECONDS)
    # the node gets the message again and works on it: the sweeper leaves the row alone
    assert sweep(redelivered + dt.timedelta(seconds=deadlines.MIN_MARGIN_SECONDS))["stuck"] == 0
    inst.refresh_from_db()
    assert (inst.vm_state, inst.task_state) == ("building", TaskState.SPAWNING)
    # past the deadline it is stuck
    assert sweep(inst.task_deadline + dt.timedelta(seconds=1))["stuck"] == 1
    inst.refresh_from_db()
    assert inst.vm_state == "error" and "spawning timed out" in inst.status_reason


@pytest.mark.parametrize("bad", ["abc", "0", "-5", "inf", "nan"])
def test_a_bad_visibility_timeout_is_refused_at_startup(bad: str, tmp_path: Path) -> None:
    out = _django_setup(tmp_path, {"SKYPORT_BROKER_VISIBILITY_SECONDS": bad}, "portal.settings")
    assert out.returncode != 0
    assert "ImproperlyConfigured" in out.stderr
    assert f"SKYPORT_BROKER_VISIBILITY_SECONDS={bad!r}: expected a positive number of seconds" in out.stderr


def test_a_settings_module_whose_visibility_breaks_the_deadlines_is_refused_at_startup(
    tmp_path: Path,
) -> None:
    """A deployment's own settings that set the transport option directly are checked too."""
    (tmp_path / "site_settings.py").write_text(
        "from portal.settings import *  # noqa\n"
        'CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": "300"}\n'
    )
    out = _django_setup(tmp_path, {}, "site_settings")
    assert out.returncode != 0
    assert "ImproperlyConfigured: The broker visibility timeout must be a number of seconds" in out.stderr
    ok = _django_setup(tmp_path, {"SKYPORT_BROKER_VISIBILITY_SECONDS": "4"}, "portal.settings")
    assert ok.returncode == 0, ok.stderr


def _django_setup(tmp_path: Path, env: dict[str, str], module: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SKYPORT_", "DJANGO_", "DATABASE_"))}
    clean.update(
        env,
        DJANGO_SETTINGS_MODULE=module,
        SKYPORT_VAR_DIR=str(tmp_path / "var"),
        SKYPORT_SECRET_KEY="k" * 50,
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]),
    )
    return subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_names_what_is_wrong() -> None:
    with pytest.raises(ImproperlyConfigured, match="positive number of seconds"):
        deadlines.check(0, deadlines.derive(1))
    with pytest.raises(ImproperlyConfigured, match="No task deadline for spawning"):
        deadlines.check(300, {k: v for k, v in deadlines.derive(300).items() if k != TaskState.SPAWNING})
    short = {**deadlines.derive(300), TaskState.DELETING: 300 + 100 + 30}
    with pytest.raises(ImproperlyConfigured, match=r"deleting 430 s\) must be longer .* over 430 s"):
        deadlines.check(300, short)
