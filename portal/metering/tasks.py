"""Celery tasks of metering: the periodic budget check (samples are taken by portal.cloud.tasks)."""

from __future__ import annotations

from celery import shared_task

from portal.metering import budgets


@shared_task(name="portal.metering.budgets")
def check_budgets() -> list[tuple[str, int]]:
    return budgets.check()
