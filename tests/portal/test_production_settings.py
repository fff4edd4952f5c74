"""Production settings (SKYPORT_ENV=production): what `make check` runs, and the values behind it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DUMP = (
    "import json, django; django.setup(); from django.conf import settings as s; print(json.dumps({k: "
    "getattr(s, k, None) for k in ('SESSION_COOKIE_SECURE', 'CSRF_COOKIE_SECURE', 'SESSION_COOKIE_HTTPONLY', "
    "'SESSION_COOKIE_SAMESITE', 'SESSION_COOKIE_AGE', 'CSRF_TRUSTED_ORIGINS', 'SECURE_PROXY_SSL_HEADER', "
    "'SECURE_HSTS_SECONDS', 'SECURE_SSL_REDIRECT', 'ALLOWED_HOSTS', 'CACHES', 'AUTHENTICATION_BACKENDS')}))"
)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKYPORT_", "DJANGO_", "CELERY_"))}
    env.update(
        DJANGO_SETTINGS_MODULE="portal.settings",
        SKYPORT_ENV="production",
        SKYPORT_SECRET_KEY="x" * 20 + "production-test-key-with-enough-entropy-0123456789",
        SKYPORT_VAR_DIR=str(tmp_path),
        **extra,
    )
    return env


def _settings(tmp_path: Path, **extra: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", DUMP], env=_env(tmp_path, **extra), cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    loaded: dict[str, Any] = json.loads(out.stdout)
    return loaded


def test_check_deploy_is_clean_in_production(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        env=_env(tmp_path),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no issues" in out.stdout


def test_production_cookies_hsts_and_origins(tmp_path: Path) -> None:
    s = _settings(
        tmp_path,
        SKYPORT_CSRF_TRUSTED_ORIGINS="https://cloud.example.org,https://cloud2.example.org",
        SKYPORT_ALLOWED_HOSTS="cloud.example.org",
    )
    assert s["SESSION_COOKIE_SECURE"] is True and s["CSRF_COOKIE_SECURE"] is True
    assert s["SESSION_COOKIE_HTTPONLY"] is True and s["SESSION_COOKIE_SAMESITE"] == "Lax"
    assert 0 < s["SESSION_COOKIE_AGE"] <= 24 * 3600
    assert s["CSRF_TRUSTED_ORIGINS"] == ["https://cloud.example.org", "https://cloud2.example.org"]
    assert s["ALLOWED_HOSTS"] == ["cloud.example.org"]
    assert s["SECURE_HSTS_SECONDS"] >= 31536000 and s["SECURE_SSL_REDIRECT"] is True
    # the proxy's X-Forwarded-Proto is trusted only when the operator says a proxy is in front
    assert s["SECURE_PROXY_SSL_HEADER"] is None
    behind = _settings(tmp_path, SKYPORT_BEHIND_PROXY="1")
    assert behind["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]


def test_login_counts_are_shared_through_redis(tmp_path: Path) -> None:
    """locmem would be per gunicorn worker: each worker would allow its own N failures."""
    s = _settings(tmp_path, CELERY_BROKER_URL="redis://redis:6379/0")
    cache = s["CACHES"]["default"]
    assert cache["BACKEND"] == "django.core.cache.backends.redis.RedisCache"
    assert cache["LOCATION"] == "redis://redis:6379/0" and cache["KEY_PREFIX"]
    own = _settings(
        tmp_path, CELERY_BROKER_URL="redis://redis:6379/0", SKYPORT_CACHE_URL="redis://cache:6379/3"
    )
    assert own["CACHES"]["default"]["LOCATION"] == "redis://cache:6379/3"
    assert s["AUTHENTICATION_BACKENDS"] == ["portal.tenancy.login.RateLimitedModelBackend"]


def test_healthz_answers_plain_http_probes_under_production_settings(db: None) -> None:
    """The container health check speaks HTTP to 127.0.0.1: no HTTPS redirect, no host check."""
    from django.test import Client, override_settings

    with override_settings(SECURE_SSL_REDIRECT=True, ALLOWED_HOSTS=["cloud.example.org"]):
        r = Client().get("/healthz", HTTP_HOST="127.0.0.1:8000")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        # everything else still gets both
        assert Client().get("/api/v1/", HTTP_HOST="127.0.0.1:8000").status_code == 400
        assert Client().get("/api/v1/", HTTP_HOST="cloud.example.org").status_code == 301
