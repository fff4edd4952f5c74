"""Celery tasks of metering: the periodic budget check and the resource tick.

Samples are taken by portal.cloud.tasks; volumes and published ports are
recorded where they change (portal.metering.resources) and extended to now by the tick.
"""

from __future__ import annotations

from celery import shared_task

from portal.metering import budgets, resources, sampling


@shared_task(name="portal.metering.budgets")
def check_budgets() -> list[tuple[str, int]]:
    return budgets.check()


@shared_task(name="portal.metering.tick")
def tick() -> int:
    """Extend the hour rows of every volume and published port that still exists up to now."""
    return resources.tick()


@shared_task(name="portal.metering.roll")
def roll() -> int:
    """Sum the instances' day and month rows of the hours that closed since the last roll."""
    return sampling.roll()


@shared_task(name="portal.metering.prune")
def prune() -> int:
    """Delete the raw usage samples older than ``SKYPORT_METERING_SAMPLE_DAYS`` (their hours are final)."""
    return sampling.prune()
