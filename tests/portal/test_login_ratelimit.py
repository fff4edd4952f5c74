"""Login rate limiting: per username and per client address, on every login form."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth import authenticate
from django.core.cache import cache
from django.test import Client, RequestFactory, override_settings

from portal.audit.models import Event, Outcome
from tests.portal.conftest import World

LOCKED = "Too many failed logins"
WRONG = "correct username and password"  # both forms say it, slightly differently


@pytest.fixture(autouse=True)
def fresh_counts() -> Iterator[None]:
    cache.clear()
    yield
    cache.clear()


def _login(url: str, username: str, password: str, ip: str = "192.0.2.10", **extra: Any) -> Any:
    c = Client(REMOTE_ADDR=ip, **extra)
    r = c.post(url, {"username": username, "password": password})
    r.logged_in = "_auth_user_id" in c.session
    return r


def _password(who: str) -> str:
    return "pw-" + who * 2  # as tests.portal.conftest.make_user sets it


def test_defaults() -> None:
    assert settings.SKYPORT_LOGIN_MAX_FAILURES == 5
    assert settings.SKYPORT_LOGIN_WINDOW_SECONDS == 300
    assert settings.AUTHENTICATION_BACKENDS == ["portal.tenancy.login.RateLimitedModelBackend"]


@pytest.mark.parametrize(("url", "who"), [("/admin/login/", "operator"), ("/api/auth/login/", "a_member")])
def test_locked_after_n_failures_even_with_the_right_password(world: World, url: str, who: str) -> None:
    for _ in range(settings.SKYPORT_LOGIN_MAX_FAILURES):
        r = _login(url, who, "wrong-password")
        assert r.status_code == 200 and WRONG in r.content.decode() and not r.logged_in
    assert not Event.objects.filter(action="auth.login_refused").exists()

    r = _login(url, who, _password(who))
    assert r.status_code == 200 and not r.logged_in
    assert LOCKED in r.content.decode(), "the form says why"
    event = Event.objects.get(action="auth.login_refused")
    assert event.outcome == Outcome.DENIED
    assert event.actor_name == who and event.source_ip == "192.0.2.10"
    assert event.path == url and event.method == "POST" and LOCKED in event.message

    # each further refusal is recorded too
    _login(url, who, _password(who))
    assert Event.objects.filter(action="auth.login_refused").count() == 2


def test_the_browser_login_page_is_limited_and_says_why(world: World) -> None:
    for _ in range(settings.SKYPORT_LOGIN_MAX_FAILURES):
        r = _login("/login/", "a_member", "wrong-password")
        assert r.status_code == 400 and not r.logged_in
    r = _login("/login/", "a_member", _password("a_member"))
    assert r.status_code == 400 and not r.logged_in
    assert LOCKED in r.content.decode(), "the page says why"
    assert Event.objects.filter(action="auth.login_refused", path="/login/").count() == 1


@override_settings(SKYPORT_LOGIN_MAX_FAILURES=2, SKYPORT_LOGIN_WINDOW_SECONDS=1)
def test_accepted_again_after_the_window(world: World) -> None:
    for _ in range(2):
        assert not _login("/api/auth/login/", "a_member", "nope").logged_in
    assert not _login("/api/auth/login/", "a_member", _password("a_member")).logged_in
    time.sleep(1.1)
    r = _login("/api/auth/login/", "a_member", _password("a_member"))
    assert r.status_code == 302 and r.logged_in


@override_settings(SKYPORT_LOGIN_MAX_FAILURES=3)
def test_per_address_across_usernames(world: World) -> None:
    for name in ("nobody", "a_viewer", "b_admin"):
        assert not _login("/api/auth/login/", name, "nope", ip="198.51.100.7").logged_in
    # another account from the same address: refused
    r = _login("/api/auth/login/", "a_member", _password("a_member"), ip="198.51.100.7")
    assert not r.logged_in and LOCKED in r.content.decode()
    # the same account from elsewhere: fine, the accounts themselves failed only once each
    assert _login("/api/auth/login/", "a_member", _password("a_member"), ip="198.51.100.8").logged_in


@override_settings(SKYPORT_LOGIN_MAX_FAILURES=3)
def test_per_username_across_addresses(world: World) -> None:
    for i in range(3):
        assert not _login("/api/auth/login/", "a_member", "nope", ip=f"203.0.113.{i}").logged_in
    r = _login("/api/auth/login/", "a_member", _password("a_member"), ip="203.0.113.99")
    assert not r.logged_in and LOCKED in r.content.decode()
    # usernames differing only in case share the count
    assert LOCKED in _login("/api/auth/login/", "A_Member", "x", ip="203.0.113.98").content.decode()
    # other accounts from a fresh address are not affected
    assert _login("/api/auth/login/", "a_viewer", _password("a_viewer"), ip="203.0.113.97").logged_in


@override_settings(SKYPORT_LOGIN_MAX_FAILURES=3)
def test_success_clears_the_account_count_not_the_address_count(world: World) -> None:
    for i in range(2):
        _login("/api/auth/login/", "a_member", "nope", ip=f"203.0.113.{i}")
    assert _login("/api/auth/login/", "a_member", _password("a_member"), ip="203.0.113.50").logged_in
    for i in range(2):
        _login("/api/auth/login/", "a_member", "nope", ip=f"203.0.113.{10 + i}")
    assert _login("/api/auth/login/", "a_member", _password("a_member"), ip="203.0.113.51").logged_in
    # the address that failed twice and then succeeded keeps its failures
    for _ in range(3):
        _login("/api/auth/login/", "nobody", "nope", ip="203.0.113.60")
    assert not _login("/api/auth/login/", "a_member", _password("a_member"), ip="203.0.113.60").logged_in


@override_settings(SKYPORT_LOGIN_MAX_FAILURES=2)
def test_any_caller_of_authenticate_is_refused_without_an_exception(world: World) -> None:
    """A login page built on plain AuthenticationForm, or code calling authenticate(), is covered too."""
    rf = RequestFactory(REMOTE_ADDR="192.0.2.77")
    for _ in range(2):
        assert authenticate(rf.post("/login/"), username="a_member", password="nope") is None
    request = rf.post("/login/")
    assert authenticate(request, username="a_member", password=_password("a_member")) is None
    assert LOCKED in request.login_refused
    assert Event.objects.get(action="auth.login_refused").path == "/login/"


@override_settings(SKYPORT_LOGIN_MAX_FAILURES=2)
def test_client_address_behind_a_proxy(world: World) -> None:
    # without SKYPORT_BEHIND_PROXY a client cannot pick its address with X-Forwarded-For
    for i in range(2):
        _login("/api/auth/login/", "nobody", "x", ip="192.0.2.1", HTTP_X_FORWARDED_FOR=f"10.9.9.{i}")
    assert not _login("/api/auth/login/", "a_member", _password("a_member"), ip="192.0.2.1").logged_in
    cache.clear()
    with override_settings(SKYPORT_BEHIND_PROXY=True):
        # behind the proxy, the address it appended counts, not the proxy's own
        for _ in range(2):
            _login(
                "/api/auth/login/", "nobody", "x", ip="192.0.2.1", HTTP_X_FORWARDED_FOR="1.2.3.4, 10.0.0.5"
            )
        r = _login("/api/auth/login/", "b_member", "x", ip="192.0.2.1", HTTP_X_FORWARDED_FOR="10.0.0.5")
        assert LOCKED in r.content.decode()
        assert Event.objects.filter(action="auth.login_refused").latest("id").source_ip == "10.0.0.5"
        ok = _login(
            "/api/auth/login/",
            "a_member",
            _password("a_member"),
            ip="192.0.2.1",
            HTTP_X_FORWARDED_FOR="10.0.0.6",
        )
        assert ok.logged_in
