"""Broker settings shared by the portal and the nodes (compute/celeryconf.py), and quorum queues for real."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from compute import celeryconf
from tests.brokerservers import RABBIT_BIN, Servers, port_free, rabbit_queues, rabbitmq_cluster
from tests.hostcaps import require, require_binary

ROOT = Path(__file__).resolve().parents[2]
AMQP = "amqp://u:p@10.0.0.1:5672/sky;amqp://u:p@10.0.0.2:5672/sky;amqp://u:p@10.0.0.3:5672/sky"
SENTINELS = "sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26379;sentinel://10.0.0.3:26379"


def test_one_redis_keeps_the_visibility_timeout() -> None:
    got = celeryconf.broker_settings("redis://:pw@h:6379/0", 300.0)
    assert got == {
        "broker_url": "redis://:pw@h:6379/0",
        "broker_transport_options": {"visibility_timeout": 300.0},
    }


def test_sentinel_urls_need_the_master_name() -> None:
    with pytest.raises(celeryconf.BrokerConfigError, match="SKYPORT_BROKER_MASTER"):
        celeryconf.broker_settings(SENTINELS, 300.0)
    got = celeryconf.broker_settings(SENTINELS, 120.0, master_name="skyport")
    assert got["broker_transport_options"] == {"visibility_timeout": 120.0, "master_name": "skyport"}
    assert got["broker_url"] == SENTINELS


def test_amqp_urls_make_quorum_queues_with_publisher_confirms() -> None:
    got = celeryconf.broker_settings(AMQP, 300.0)
    assert got["broker_url"] == AMQP
    assert got["broker_transport_options"] == {"confirm_publish": True}
    assert got["task_default_queue_type"] == "quorum"
    assert got["worker_detect_quorum_queues"] is True


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://h/0;amqp://h//", "one scheme"),
        ("kafka://h:9092", "unsupported scheme kafka://"),
        ("h:6379", "one scheme"),
        ("", "one scheme"),
    ],
)
def test_bad_broker_urls_are_refused_with_the_variable_named(url: str, message: str) -> None:
    with pytest.raises(celeryconf.BrokerConfigError, match="CELERY_BROKER_URL") as err:
        celeryconf.broker_settings(url, 300.0)
    assert message in str(err.value)


def test_the_cache_needs_a_redis_of_its_own_unless_the_broker_is_one() -> None:
    assert celeryconf.cache_url("redis://h:6379/0", None) == "redis://h:6379/0"
    assert celeryconf.cache_url(AMQP, "redis://c:6379/1") == "redis://c:6379/1"
    for broker in (AMQP, SENTINELS):
        with pytest.raises(celeryconf.BrokerConfigError, match="SKYPORT_CACHE_URL"):
            celeryconf.cache_url(broker, None)


def _app(url: str, default_queue: str, amqp: str | None = celeryconf.AMQP_CLASS) -> Celery:
    app = Celery("t", fixups=[], amqp=amqp)
    app.conf.update(
        **celeryconf.reliability_settings(),
        **celeryconf.broker_settings(url, 300.0, master_name="m"),
        task_default_queue=default_queue,
    )
    return app


def test_every_queue_is_a_quorum_queue_on_rabbitmq() -> None:
    """Celery alone makes only its default queue quorum: the portal would declare a node's queue
    classic while the node declares it quorum, and RabbitMQ refuses the second declaration."""
    portal = _app(AMQP, "control")
    for name in ("control", "node.n1"):
        assert portal.amqp.queues[name].queue_arguments == {"x-queue-type": "quorum"}, name
    plain = _app(AMQP, "control", amqp=None)
    assert plain.amqp.queues["node.n1"].queue_arguments is None  # what Celery 5.5 does by itself
    redis = _app("redis://h:6379/0", "control")
    assert redis.amqp.queues["node.n1"].queue_arguments is None


def _settings(env: dict[str, str], tmp: Path) -> subprocess.CompletedProcess[str]:
    code = (
        "import django; from django.conf import settings; django.setup(); "
        "print(settings.CELERY_BROKER_TRANSPORT_OPTIONS, settings.CELERY_TASK_DEFAULT_QUEUE_TYPE, "
        "settings.CACHES['default']['LOCATION'])"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SKYPORT_", "DJANGO_", "CELERY_"))}
    full = {**clean, "DJANGO_SETTINGS_MODULE": "portal.settings", "SKYPORT_VAR_DIR": str(tmp), **env}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full, capture_output=True, text=True)


def test_portal_settings_take_the_broker_options_and_name_what_is_missing(tmp_path: Path) -> None:
    ok = _settings({"CELERY_BROKER_URL": AMQP, "SKYPORT_CACHE_URL": "redis://c:6379/1"}, tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split() == ["{'confirm_publish':", "True}", "quorum", "redis://c:6379/1"]
    bad = _settings({"CELERY_BROKER_URL": SENTINELS, "SKYPORT_CACHE_URL": "redis://c:6379/1"}, tmp_path)
    assert bad.returncode != 0
    assert "ImproperlyConfigured: a sentinel:// CELERY_BROKER_URL needs SKYPORT_BROKER_MASTER" in bad.stderr
    bad = _settings({"CELERY_BROKER_URL": AMQP}, tmp_path)
    assert "ImproperlyConfigured: SKYPORT_CACHE_URL must name a Redis" in bad.stderr


BASE_PORT = 17500


@pytest.fixture
def rabbitmq(monkeypatch: pytest.MonkeyPatch) -> Any:
    require((RABBIT_BIN / "rabbitmq-server").exists(), "rabbitmq-server (installed by `make test`)")
    require_binary("epmd")
    ports = [BASE_PORT + 21, BASE_PORT + 30, BASE_PORT + 41]
    require(all(port_free(p) for p in ports), f"ports {ports} free on 127.0.0.1")
    # Celery prefers CELERY_BROKER_URL from the environment to broker_url (settings_test sets it):
    # without this the apps below would talk to the tests' Redis, not to this RabbitMQ
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    servers = Servers(Path(tempfile.mkdtemp(prefix="skyport-test-rabbitmq-")))
    try:
        with rabbitmq_cluster(servers, BASE_PORT, nodes=1) as url:
            yield servers, url
    finally:
        servers.stop_all()
        shutil.rmtree(servers.tmp, ignore_errors=True)


@pytest.mark.host
@pytest.mark.slow
def test_portal_and_node_share_quorum_queues_on_a_real_rabbitmq(rabbitmq: tuple[Servers, str]) -> None:
    servers, url = rabbitmq
    portal, node = _app(url, "control"), _app(url, "node.t1")
    portal.send_task("compute.instance.create", args=[{"id": "x"}], queue="node.t1")
    node.send_task("portal.observe", args=[{"id": "x"}], queue="control")
    with node.connection_for_read() as conn:
        # the node declares its own queue as its worker would; a classic declaration would be refused
        queue = node.amqp.queues["node.t1"](conn.default_channel)
        queue.declare()
        message = queue.get(no_ack=True)
        assert message is not None and message.headers["task"] == "compute.instance.create"
    queues = rabbit_queues(servers)
    assert queues["node.t1"]["type"] == queues["control"]["type"] == "quorum"
    # Celery by itself declares the node's queue classic: RabbitMQ refuses it (the defect fixed)
    plain = _app(url, "control", amqp=None)
    with (
        plain.connection_for_write() as conn,
        pytest.raises(Exception, match="inequivalent arg 'x-queue-type'"),
    ):
        plain.amqp.queues["node.t1"](conn.default_channel).declare()


def test_node_config_checks_the_broker_as_the_portal_does(monkeypatch: pytest.MonkeyPatch) -> None:
    from compute.config import ConfigError, NodeConfig

    monkeypatch.setenv("SKYPORT_NODE_NAME", "n1")
    monkeypatch.setenv("CELERY_BROKER_URL", SENTINELS)
    monkeypatch.delenv("SKYPORT_BROKER_MASTER", raising=False)
    with pytest.raises(ConfigError, match="needs SKYPORT_BROKER_MASTER"):
        NodeConfig.from_env()
    monkeypatch.setenv("SKYPORT_BROKER_MASTER", "skyport")
    assert NodeConfig.from_env().broker_master == "skyport"
    monkeypatch.setenv("CELERY_BROKER_URL", "kafka://h:9092")
    with pytest.raises(ConfigError, match="unsupported scheme kafka://"):
        NodeConfig.from_env()
