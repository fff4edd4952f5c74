"""Skyport portal settings, read from the environment only (parsed by :mod:`portal.env`).

``SKYPORT_ENV=production`` turns on the settings ``manage.py check --deploy``
asks for (HTTPS-only cookies, HSTS, SSL redirect).  The default is a local
install served on 127.0.0.1 over plain HTTP, still with ``DEBUG`` off.
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from compute import celeryconf
from portal import env, requestlog
from portal.localfiles import read_or_create_secret

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("SKYPORT_VAR_DIR", BASE_DIR / "var"))
VAR_DIR.mkdir(parents=True, exist_ok=True)

ENVIRONMENT = os.environ.get("SKYPORT_ENV", "local")
PRODUCTION = ENVIRONMENT == "production"


def _secret_key() -> str:
    """The key from ``SKYPORT_SECRET_KEY``, else one generated once into var/secret_key."""
    return os.environ.get("SKYPORT_SECRET_KEY") or read_or_create_secret(VAR_DIR / "secret_key", 64)


SECRET_KEY = _secret_key()
DEBUG = env.boolean("SKYPORT_DEBUG", False)
ALLOWED_HOSTS = os.environ.get("SKYPORT_ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]").split(",")
CSRF_TRUSTED_ORIGINS = [o for o in os.environ.get("SKYPORT_CSRF_TRUSTED_ORIGINS", "").split(",") if o]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "portal.tenancy",
    "portal.cloud",
    "portal.audit",
    "portal.images",
    "portal.storage",
    "portal.metering",
    "portal.web",
    "portal.console",
]

MIDDLEWARE = [
    "portal.health.HealthCheckMiddleware",  # first: probes are plain HTTP to 127.0.0.1
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "portal.audit.middleware.AuditMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",  # the browser's language (Accept-Language)
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "portal.urls"
WSGI_APPLICATION = "portal.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "frontend" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# SQLite (WAL, IMMEDIATE transactions so concurrent writers queue instead of
# failing) unless DATABASE_URL names another database.
_sqlite_path = VAR_DIR / "db.sqlite3"
DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{_sqlite_path}", conn_max_age=env.integer("DB_CONN_MAX_AGE", 0, minimum=0)
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=30000;",
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 10}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en"
#: the UI's languages; the catalogues are in locale/ and compiled by the Makefile (msgfmt)
LANGUAGES = [("en", "English"), ("de", "Deutsch")]
LOCALE_PATHS = [BASE_DIR / "locale"]
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)
STATICFILES_DIRS = [BASE_DIR / "frontend" / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}

LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"

# Logins: every form goes through this backend, which refuses further attempts after
# SKYPORT_LOGIN_MAX_FAILURES failures (per username and per client address) within
# SKYPORT_LOGIN_WINDOW_SECONDS.  The counts live in the cache below.
AUTHENTICATION_BACKENDS = ["portal.tenancy.login.RateLimitedModelBackend"]
SKYPORT_LOGIN_MAX_FAILURES = env.integer("SKYPORT_LOGIN_MAX_FAILURES", 5, minimum=1)
SKYPORT_LOGIN_WINDOW_SECONDS = env.integer("SKYPORT_LOGIN_WINDOW_SECONDS", 300, minimum=1)

# Security: the same in every environment where it costs nothing locally.
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
SESSION_COOKIE_AGE = env.integer("SKYPORT_SESSION_COOKIE_AGE", 12 * 3600, minimum=60)
CSRF_COOKIE_SAMESITE = "Lax"
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
# Behind a reverse proxy that terminates TLS: trust its X-Forwarded-Proto, and take the
# client's address from the X-Forwarded-For entry it appends.  Only set this when every
# request passes through such a proxy, or clients could claim HTTPS and any address.
SKYPORT_BEHIND_PROXY = env.boolean("SKYPORT_BEHIND_PROXY", False)
if SKYPORT_BEHIND_PROXY:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
if PRODUCTION:
    SECURE_SSL_REDIRECT = env.boolean("SKYPORT_SSL_REDIRECT", True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env.integer("SKYPORT_HSTS_SECONDS", 31536000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True

# Hostile input (README "Security notes"): a request body (JSON, forms) is read up to this many
# bytes (413 beyond; uploads have their own limit) and JSON nests at most this deep (400 beyond).
DATA_UPLOAD_MAX_MEMORY_SIZE = env.integer("SKYPORT_BODY_MAX_BYTES", 2621440, minimum=1)
SKYPORT_JSON_MAX_DEPTH = env.integer("SKYPORT_JSON_MAX_DEPTH", 32, minimum=1)
# A request refused before its body was read (401, 413, ...): up to this much of the body is read
# and dropped after the answer, so the connection stays usable; a larger rest closes it (the answer
# says Connection: close).  The dropping stops after SKYPORT_DRAIN_SECONDS (portal/unreadbody.py).
SKYPORT_DRAIN_MAX_BYTES = env.integer("SKYPORT_DRAIN_MAX_BYTES", 2**20, minimum=0)
SKYPORT_DRAIN_SECONDS = env.seconds("SKYPORT_DRAIN_SECONDS", 5)

REST_FRAMEWORK = {
    # JSON only (uploads stream their raw body through their own parser): one body format to check,
    # and the one the schema documents.
    "DEFAULT_PARSER_CLASSES": ["portal.api.parsers.JSONParser"],
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "portal.api.authentication.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "portal.api.pagination.Pagination",
    "DEFAULT_FILTER_BACKENDS": [
        "portal.api.filters.FilterBackend",
        "rest_framework.filters.SearchFilter",
        "rest_framework.filters.OrderingFilter",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "portal.api.exceptions.exception_handler",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"]
    + (["rest_framework.renderers.BrowsableAPIRenderer"] if DEBUG else []),
    "DEFAULT_THROTTLE_RATES": {"anon": "60/minute"},
    "PAGE_SIZE": 50,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Skyport API",
    "DESCRIPTION": "Self-service private cloud: tenants, flavors, nodes, instances (VMs and containers).",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # several models have a "status" field with their own choices: each enum gets its own name
    "ENUM_NAME_OVERRIDES": {
        "BackupStatusEnum": "portal.storage.choices.BackupStatus",
        "SnapshotStatusEnum": "portal.storage.choices.SnapshotStatus",
        "VolumeStatusEnum": "portal.storage.choices.VolumeStatus",
        "NodeStatusEnum": "portal.cloud.choices.NodeStatus",
        "ImageStatusEnum": "portal.images.choices.ImageStatus",
    },
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "portal.api.schema.add_error_responses",
    ],
}

# Celery: JSON only, at-least-once delivery, one message in flight per worker; the same rules and
# broker options as the compute nodes (compute/celeryconf.py).
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
CELERY_RESULT_BACKEND = None
CELERY_TASK_DEFAULT_QUEUE = "control"
CELERY_TASK_ROUTES = {"portal.*": {"queue": "control"}}
CELERY_TASK_ALWAYS_EAGER = False
# A message a worker took but never acknowledged (the worker died, or the task is still running)
# is delivered again after this long; every task is idempotent, so a task delivered twice is
# harmless (an image import claims its image first: a second delivery does nothing).  The
# sweeper's task deadlines are derived from it (portal/cloud/deadlines.py, checked at startup).
# Compute nodes read the same variable: give every service the same value.  (RabbitMQ delivers
# such a message again as soon as the dead worker's connection closes, sooner than this.)
SKYPORT_BROKER_VISIBILITY_SECONDS = env.seconds("SKYPORT_BROKER_VISIBILITY_SECONDS", 300)
try:
    _celery = {
        **celeryconf.reliability_settings(),
        **celeryconf.broker_settings(
            CELERY_BROKER_URL,
            SKYPORT_BROKER_VISIBILITY_SECONDS,
            env.text("SKYPORT_BROKER_MASTER", "") or None,
        ),
    }
    _cache_location = celeryconf.cache_url(CELERY_BROKER_URL, env.text("SKYPORT_CACHE_URL", "") or None)
except celeryconf.BrokerConfigError as exc:
    raise ImproperlyConfigured(str(exc)) from None
# CELERY_TASK_ACKS_LATE, CELERY_BROKER_TRANSPORT_OPTIONS, CELERY_TASK_PUBLISH_RETRY_POLICY, …
globals().update({f"CELERY_{key.upper()}": value for key, value in _celery.items()})
CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = _celery["broker_transport_options"]

# The cache (login failure counts, instance stats, console tails) must be shared by all web
# workers: Redis, by default the broker's when that is one Redis, with its own key prefix.
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": _cache_location,
        "KEY_PREFIX": "skyport-cache",
    }
}

# Tenant defaults.
SKYPORT_DEFAULT_QUOTA = {
    "instances": 10,
    "vcpus": 20,
    "ram_mb": 40960,
    "disk_gb": 200,
    "containers": 10,
    "vms": 10,
    "volumes": 10,
    "volume_gb": 100,
    "networks": 5,
}
SKYPORT_TOKEN_MAX_DAYS = env.integer("SKYPORT_TOKEN_MAX_DAYS", 365, minimum=1)
SKYPORT_SCHEDULER_WEIGHER = env.choice("SKYPORT_SCHEDULER_WEIGHER", "spread", ("spread", "pack"))
SKYPORT_NETWORK_POOL = os.environ.get("SKYPORT_NETWORK_POOL", "198.18.0.0/15")
SKYPORT_NETWORK_PREFIX = env.integer("SKYPORT_NETWORK_PREFIX", 24, minimum=8, maximum=29)
#: cloud-init vendor-data for every VM (the operator's defaults; a tenant's #cloud-config overrides them)
SKYPORT_VENDOR_DATA = env.file_text("SKYPORT_VENDOR_DATA_FILE")
#: nodes send a heartbeat this often; three missed beats mark a node down
# Images: the content-addressed store (blobs/sha256/<hex>) and upload limits.
SKYPORT_IMAGE_STORE = Path(os.environ.get("SKYPORT_IMAGE_STORE", VAR_DIR / "store"))
SKYPORT_UPLOAD_MAX_BYTES = env.integer("SKYPORT_UPLOAD_MAX_BYTES", 20 * 2**30, minimum=1)
SKYPORT_IMAGE_MAX_VIRTUAL_BYTES = env.integer("SKYPORT_IMAGE_MAX_VIRTUAL_BYTES", 512 * 2**30, minimum=1)
# What an image may unpack to (portal/images/limits.py): all layers of a container image together
# (unset or 0: the largest flavor or node disk, whichever is smaller), each file (unset or 0: the
# same), and how many entries; a VM disk's virtual size is also bounded by the largest flavor disk.
SKYPORT_IMAGE_MAX_UNPACKED_BYTES = env.integer("SKYPORT_IMAGE_MAX_UNPACKED_BYTES", 0, minimum=0) or None
SKYPORT_IMAGE_MAX_FILE_BYTES = env.integer("SKYPORT_IMAGE_MAX_FILE_BYTES", 0, minimum=0) or None
SKYPORT_IMAGE_MAX_FILES = env.integer("SKYPORT_IMAGE_MAX_FILES", 1000000, minimum=1)
# Each qemu-img run that checks a disk (info, then check) is stopped after this long; both runs
# together stay below the broker's visibility timeout.
SKYPORT_QEMU_IMG_TIMEOUT_SECONDS = env.seconds(
    "SKYPORT_QEMU_IMG_TIMEOUT_SECONDS", SKYPORT_BROKER_VISIBILITY_SECONDS / 3
)
if not 0 < 2 * SKYPORT_QEMU_IMG_TIMEOUT_SECONDS < SKYPORT_BROKER_VISIBILITY_SECONDS:
    raise ImproperlyConfigured(
        f"SKYPORT_QEMU_IMG_TIMEOUT_SECONDS ({SKYPORT_QEMU_IMG_TIMEOUT_SECONDS:g}) must be above 0 and less "
        f"than half of SKYPORT_BROKER_VISIBILITY_SECONDS ({SKYPORT_BROKER_VISIBILITY_SECONDS:g})"
    )
# An import that shows no progress for this long is failed by the images sweep, and its files
# removed.  Progress is marked at least every minute while a file arrives, when it is queued and
# when a worker starts on it; the longest quiet stretches are the wait in the queue (a message whose
# worker died comes back after the visibility timeout) and the validation (two qemu-img runs).
SKYPORT_IMAGE_IMPORT_DEADLINE_SECONDS = env.seconds(
    "SKYPORT_IMAGE_IMPORT_DEADLINE_SECONDS",
    max(3600.0, 2 * (SKYPORT_BROKER_VISIBILITY_SECONDS + 2 * SKYPORT_QEMU_IMG_TIMEOUT_SECONDS)),
)
# Stored blobs that no database row references are removed once they are this old: longer than
# any import may run, so a blob an import is about to reuse is never collected under it.
SKYPORT_IMAGE_BLOB_GRACE_SECONDS = env.seconds(
    "SKYPORT_IMAGE_BLOB_GRACE_SECONDS", 2 * SKYPORT_IMAGE_IMPORT_DEADLINE_SECONDS
)
if SKYPORT_IMAGE_BLOB_GRACE_SECONDS < SKYPORT_IMAGE_IMPORT_DEADLINE_SECONDS:
    raise ImproperlyConfigured(
        "SKYPORT_IMAGE_BLOB_GRACE_SECONDS must be at least SKYPORT_IMAGE_IMPORT_DEADLINE_SECONDS"
    )
# How compute nodes reach this portal (blob downloads, snapshot uploads).
SKYPORT_PORTAL_URL = os.environ.get("SKYPORT_PORTAL_URL", "http://127.0.0.1:8000").rstrip("/")
SKYPORT_HEARTBEAT_SECONDS = env.seconds("SKYPORT_HEARTBEAT_SECONDS", 5)
# A create or delete a node has not taken this long after it was sent, its queue empty, is sent
# again (portal/cloud/resend.py: the broker lost it).  Several beats, so a beat's lag is no loss.
SKYPORT_RESEND_AFTER_SECONDS = env.seconds(
    "SKYPORT_RESEND_AFTER_SECONDS", max(60, 3 * SKYPORT_HEARTBEAT_SECONDS)
)
if SKYPORT_RESEND_AFTER_SECONDS < 3 * SKYPORT_HEARTBEAT_SECONDS:
    raise ImproperlyConfigured(
        f"SKYPORT_RESEND_AFTER_SECONDS ({SKYPORT_RESEND_AFTER_SECONDS:g}) must be at least three "
        f"heartbeats (SKYPORT_HEARTBEAT_SECONDS={SKYPORT_HEARTBEAT_SECONDS:g})"
    )
# Consoles (docs/console.md): a ticket is redeemed once within this many seconds; a session with
# no keystroke (and, for viewers, no output) for the idle time is closed; the WebSocket URL the
# pages hand out ("" = the page's own host: a proxy routes /ws/ to the ASGI relay).
SKYPORT_CONSOLE_TICKET_SECONDS = env.seconds("SKYPORT_CONSOLE_TICKET_SECONDS", 30)
SKYPORT_CONSOLE_IDLE_SECONDS = env.seconds("SKYPORT_CONSOLE_IDLE_SECONDS", 900)
SKYPORT_CONSOLE_WS_URL = os.environ.get("SKYPORT_CONSOLE_WS_URL", "").rstrip("/")
SKYPORT_EXEC_MAX_SECONDS = env.seconds("SKYPORT_EXEC_MAX_SECONDS", 120)
# Container logs (docs/container-driver.md, Logs): a deleted container's logs stay readable this
# many hours (the nodes read the same variable and sweep them after it; 0: deleted with it); a
# follow (?follow=1) streams for at most this many seconds, then ends (the client asks again).
SKYPORT_LOG_RETENTION_HOURS = env.integer("SKYPORT_LOG_RETENTION_HOURS", 72, minimum=0, maximum=24 * 366)
SKYPORT_LOG_FOLLOW_SECONDS = env.integer("SKYPORT_LOG_FOLLOW_SECONDS", 60, minimum=1, maximum=3600)
# Metering (docs/metering.md): a node's heartbeats are sampled every this many seconds (and at
# once when the set of running instances changes; 0: every beat); samples farther apart than
# that period plus this many heartbeats leave a gap.
SKYPORT_METERING_BEAT_SECONDS = env.integer("SKYPORT_METERING_BEAT_SECONDS", 60, minimum=0, maximum=3600)
SKYPORT_METERING_GAP_BEATS = env.integer("SKYPORT_METERING_GAP_BEATS", 3, minimum=1)
# Raw usage samples (one per instance per heartbeat) are kept this many days, then pruned; the
# hour, day and month rows they were summed into are kept for ever (docs/metering.md).
SKYPORT_METERING_SAMPLE_DAYS = env.integer("SKYPORT_METERING_SAMPLE_DAYS", 40, minimum=1, maximum=3660)
# While the control queue holds more messages than there are nodes up (the portal is behind on
# reading beats), the sweeper marks down only nodes silent longer than this (portal/cloud/tasks.py).
SKYPORT_NODE_DOWN_BACKLOG_SECONDS = env.seconds("SKYPORT_NODE_DOWN_BACKLOG_SECONDS", 300)
CELERY_BEAT_SCHEDULE = {
    "sweep": {"task": "portal.sweep", "schedule": env.seconds("SKYPORT_SWEEP_SECONDS", 5)},
    # stuck imports, upload leftovers, unreferenced blobs
    "images": {
        "task": "portal.images.sweep",
        "schedule": env.seconds("SKYPORT_IMAGE_SWEEP_SECONDS", 300),
    },
    # budget warnings at 80 % and 100 % of each tenant's monthly budget
    "budgets": {"task": "portal.metering.budgets", "schedule": env.seconds("SKYPORT_BUDGET_SECONDS", 600)},
    # volumes and published ports that still exist: their usage rows extended up to now
    "metering": {
        "task": "portal.metering.tick",
        "schedule": env.seconds("SKYPORT_METERING_TICK_SECONDS", 300),
    },
    # the instances' day and month rows summed from the hours that closed (RollupMark)
    "metering-roll": {
        "task": "portal.metering.roll",
        "schedule": env.seconds("SKYPORT_METERING_ROLL_SECONDS", 300),
    },
    # raw usage samples older than SKYPORT_METERING_SAMPLE_DAYS deleted (their hours are final)
    "metering-prune": {
        "task": "portal.metering.prune",
        "schedule": env.seconds("SKYPORT_METERING_PRUNE_SECONDS", 3600),
    },
    # volume backups whose policy's interval has passed (docs/storage.md)
    "backups": {
        "task": "portal.storage.backups",
        "schedule": env.seconds("SKYPORT_BACKUP_TICK_SECONDS", 300),
    },
}
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
# Beat marks every task it sends in <schedule>.sent; the file's age says whether it still sends
# the sweeper: the beat service's health check (portal/beat_health.py).
CELERY_BEAT_SCHEDULER = "portal.beat:Scheduler"

# Every record names its request (portal/requestlog.py): the traceback of a 500 is found in the
# server's log by the X-Request-ID the client was given.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "portal.requestlog.RequestIdFilter"}},
    "formatters": {"request": {"format": requestlog.FORMAT}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "filters": ["request_id"], "formatter": "request"}
    },
    "root": {"handlers": ["console"], "level": os.environ.get("SKYPORT_LOG_LEVEL", "INFO")},
}
