"""wss through a real TLS-terminating nginx (Debian's) in front of the portal and the relay.

The proxy routes ``/ws/`` to the relay (uvicorn) and everything else to the
portal, as docs/deploy.md shows.  With ``SKYPORT_BEHIND_PROXY=1`` the ticket
endpoint, reached over HTTPS through nginx with a bearer token, hands out a
``wss://`` URL on the proxy's own host, and a shell works through it.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from compute.spec import InstanceSpec
from portal.tenancy.models import APIToken, Membership
from tests.console.conftest import Nodes, Relay, free_port, instance_row
from tests.hostcaps import require
from tests.portal.conftest import World

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.host, pytest.mark.slow]

NGINX_CONF = """
user root;
worker_processes 1;
error_log {tmp}/error.log;
pid {tmp}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {tmp}/cert.pem;
        ssl_certificate_key {tmp}/key.pem;
        location /ws/ {{
            proxy_pass http://127.0.0.1:{relay};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 1h;
        }}
        location / {{
            proxy_pass http://127.0.0.1:{web};
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"""


class Nginx:
    def __init__(self, tmp: Path, relay_port: int, web_port: int) -> None:
        self.tmp = tmp
        self.port = free_port()
        cert = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
        files = ["-keyout", str(tmp / "key.pem"), "-out", str(tmp / "cert.pem")]
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", *cert, *files],
            check=True,
            capture_output=True,
        )
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=tmp, port=self.port, relay=relay_port, web=web_port))
        self.proc = subprocess.Popen(
            ["nginx", "-p", str(tmp), "-c", str(conf), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while not (tmp / "nginx.pid").exists():
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            assert time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.05)
        self.ssl = ssl.create_default_context(cafile=str(tmp / "cert.pem"))

    def stop(self) -> None:
        self.proc.terminate()  # our nginx master, by its PID: it stops its workers
        self.proc.wait(10)


@pytest.fixture
def nginx(tmp_path: Path, relay: Relay, live_server: Any) -> Iterator[Nginx]:
    require(shutil.which("nginx") is not None, "nginx (nginx-light in the Makefile's DEBS)")
    web_port = int(live_server.url.rsplit(":", 1)[1])
    proxy = Nginx(tmp_path, relay.port, web_port)
    yield proxy
    proxy.stop()


def test_wss_through_nginx_behind_proxy(
    world: World, nodes: Nodes, container: InstanceSpec, nginx: Nginx, settings: Any
) -> None:
    # what SKYPORT_BEHIND_PROXY=1 sets; the pages' WebSocket URL is the page's own host
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.SKYPORT_CONSOLE_WS_URL = ""
    instance_row(world, container, "container")
    token = APIToken(
        user=world.users["a_member"],
        membership=Membership.objects.get(user=world.users["a_member"]),
        name="proxy-test",
        expires_at="2999-01-01T00:00:00Z",
    )
    key = token.issue()
    token.save()
    base = f"https://127.0.0.1:{nginx.port}"
    req = urllib.request.Request(
        f"{base}/api/v1/instances/{container.instance_id}/console/sessions/",
        data=json.dumps({"mode": "exec"}).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, context=nginx.ssl, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["ws_url"] == f"wss://127.0.0.1:{nginx.port}/ws/console/{body['ticket']}/"
    with connect(body["ws_url"], ssl=nginx.ssl, origin=base, open_timeout=10) as ws:  # type: ignore[arg-type]
        ready = json.loads(ws.recv(timeout=20))
        assert ready["type"] == "ready"
        ws.send(b"echo via-$((1+1))-proxy\n")
        out = b""
        deadline = time.monotonic() + 20
        while b"via-2-proxy" not in out and time.monotonic() < deadline:
            msg = ws.recv(timeout=20)
            out += msg if isinstance(msg, bytes) else b""
        assert b"via-2-proxy" in out
    # nginx logs an upgraded request when its connection ends, a moment after the client closed it
    log = nginx.tmp / "access.log"
    deadline = time.monotonic() + 15
    while "GET /ws/console/" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    access = log.read_text()
    assert "GET /ws/console/" in access and " 101 " in access, access
