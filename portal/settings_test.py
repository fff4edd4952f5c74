"""Unit-test settings: the only place Celery runs eagerly."""

import os

from portal.settings import *  # noqa: F403
from portal.settings import DATABASES, VAR_DIR

CELERY_TASK_ALWAYS_EAGER = True
# Tests that need a real broker use their own Redis database, never the one `make run` uses.
CELERY_BROKER_URL = os.environ.get("SKYPORT_TEST_BROKER_URL", "redis://127.0.0.1:6379/5")
# Celery lets the CELERY_BROKER_URL environment variable win over settings (make exports one).
os.environ["CELERY_BROKER_URL"] = CELERY_BROKER_URL
# Tenant networks of tests never overlap those of `make run` on the same machine,
# which allocates from the start of 198.18.0.0/15.
SKYPORT_NETWORK_POOL = os.environ.get("SKYPORT_TEST_NETWORK_POOL", "198.19.224.0/19")
CELERY_TASK_EAGER_PROPAGATES = True
# Each test run has its own image store (removed at the end by tests/conftest.py).
SKYPORT_IMAGE_STORE = VAR_DIR / f"test-store-{os.getpid()}"
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

# A file, not :memory:, so tests with real threads share one database.
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / f"test-{os.getpid()}.sqlite3")}
