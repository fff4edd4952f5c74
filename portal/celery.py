"""The control plane's Celery app (queue ``control``).

Node tasks run in ``compute.worker`` on ``node.<name>`` queues; the portal
only sends them by name, so it never imports driver code.
"""

from __future__ import annotations

import os

from celery import Celery

from compute import celeryconf

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

app = Celery("skyport", amqp=celeryconf.AMQP_CLASS)  # every queue quorum on RabbitMQ (celeryconf)
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["portal.cloud", "portal.images", "portal.metering", "portal.storage"])
