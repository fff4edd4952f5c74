"""Broker servers on loopback for one test or bench run: Redis with Sentinel, a RabbitMQ cluster.

Every server is a child of the caller in its own process group, on ports counted from ``base``,
with its data in the caller's temporary directory; :meth:`Servers.stop_all` ends them by PID.
RabbitMQ gets an epmd of its own on ``base + 30`` (rabbitmq-server would otherwise start a
machine-wide daemon on 4369), its own node names ``bench<N>@localhost`` and its own Erlang cookie
(``HOME`` is the temporary directory).  Used by tests/compute/test_celeryconf.py and
bench/broker_failover.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MASTER = "skyport-bench"
RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def wait(what: str, ok: Any, timeout: float = 60.0, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(every)
    raise RuntimeError(f"timed out waiting for {what}")


class Servers:
    """Processes this run started (own process groups), stopped by PID."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.rabbit_env: dict[str, str] = {}  # for rabbitmqctl, once a cluster runs

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 -- the child's for its lifetime
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def pause(self, name: str, resume: bool = False) -> None:
        """Freeze (SIGSTOP) or thaw (SIGCONT) a server: a replica that falls behind, then catches up."""
        os.killpg(self.procs[name].pid, signal.SIGCONT if resume else signal.SIGSTOP)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGCONT)  # a paused server handles TERM only once thawed
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def _redis_ping(port: int) -> bool:
    r = subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True, timeout=5)
    return r.stdout.strip() == "PONG"


@contextlib.contextmanager
def redis_sentinel(servers: Servers, base: int) -> Iterator[tuple[str, str]]:
    """Primary ``base``, replica ``base+1``, sentinels ``base+10..12`` watching :data:`MASTER`;
    yields the ``sentinel://`` URL list and the primary's name in ``servers``."""
    primary, replica = base, base + 1
    sentinels = [base + 10, base + 11, base + 12]
    for port, extra in ((primary, []), (replica, ["--replicaof", "127.0.0.1", str(primary)])):
        d = servers.tmp / f"redis-{port}"
        d.mkdir()
        servers.start(
            f"redis-{port}",
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(d),
                "--save",
                "",
                "--appendonly",
                "yes",
                *extra,
            ],
        )
    for port in (primary, replica):
        wait(f"redis on {port}", lambda p=port: _redis_ping(p))
    for port in sentinels:
        conf = servers.tmp / f"sentinel-{port}.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {servers.tmp}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {primary} 2\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 10000\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
        )
        servers.start(f"sentinel-{port}", ["redis-server", str(conf), "--sentinel"])
    for port in sentinels:
        wait(f"sentinel on {port}", lambda p=port: _redis_ping(p))

    def replica_synced() -> bool:
        info = subprocess.run(
            ["redis-cli", "-p", str(replica), "info", "replication"], capture_output=True, text=True
        ).stdout
        return "master_link_status:up" in info

    wait("the replica to sync", replica_synced, timeout=30)
    yield ";".join(f"sentinel://127.0.0.1:{p}" for p in sentinels), f"redis-{primary}"


def _rabbit_env(tmp: Path, node: int, base: int) -> dict[str, str]:
    d = tmp / f"rabbit{node}"
    conf = d / "rabbitmq.conf"
    if not conf.exists():
        d.mkdir()
        conf.write_text(
            f"listeners.tcp.default = 127.0.0.1:{base + 20 + node}\n"
            "disk_free_limit.absolute = 50MB\n"
            "log.console = true\nlog.file = false\n"
        )
    return {
        **os.environ,
        "HOME": str(tmp),  # the Erlang cookie all nodes and rabbitmqctl share
        "ERL_EPMD_PORT": str(base + 30),
        "RABBITMQ_NODENAME": f"bench{node}@localhost",
        "RABBITMQ_DIST_PORT": str(base + 40 + node),
        "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
        "RABBITMQ_LOG_BASE": str(d / "log"),
        "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(tmp / "enabled_plugins"),
        "RABBITMQ_PID_FILE": str(d / "pid"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
    }


def _ctl(env: dict[str, str], node: int, *args: str, timeout: float = 120) -> str:
    out = subprocess.run(
        [str(RABBIT_BIN / "rabbitmqctl"), "-n", f"bench{node}@localhost", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if out.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} on bench{node}: {out.stdout}{out.stderr}")
    return out.stdout


def _ctl_ok(env: dict[str, str], node: int, *args: str) -> bool:
    try:
        _ctl(env, node, *args, timeout=60)
    except (RuntimeError, subprocess.TimeoutExpired):
        return False
    return True


@contextlib.contextmanager
def rabbitmq_cluster(servers: Servers, base: int, nodes: int = 3) -> Iterator[str]:
    """``nodes`` clustered RabbitMQ nodes (AMQP on ``base+21``…); yields the ``amqp://`` URL list."""
    (servers.tmp / "enabled_plugins").write_text("[].\n")
    cookie = servers.tmp / ".erlang.cookie"
    cookie.write_text("skyportbenchcookie")
    cookie.chmod(0o400)
    numbers = range(1, nodes + 1)
    envs = {n: _rabbit_env(servers.tmp, n, base) for n in numbers}
    for n in numbers:
        (servers.tmp / f"rabbit{n}" / "advanced.config").write_text("[].\n")
    # our own epmd in the foreground, so it ends with the run (rabbitmq would start a daemon)
    servers.start("epmd", ["epmd", "-port", str(base + 30), "-address", "127.0.0.1"])
    for n in numbers:
        servers.start(f"rabbit{n}", [str(RABBIT_BIN / "rabbitmq-server")], env=envs[n])
    for n in numbers:
        # await_startup fails at once while the node has not registered with epmd yet
        wait(f"rabbit{n} to start", lambda n=n: _ctl_ok(envs[n], n, "await_startup"), timeout=180, every=1)
    for n in numbers[1:]:
        _ctl(envs[n], n, "stop_app")
        _ctl(envs[n], n, "join_cluster", "bench1@localhost")
        _ctl(envs[n], n, "start_app")
    running = _ctl(envs[1], 1, "cluster_status", "--formatter", "json")
    if len(json.loads(running)["running_nodes"]) != nodes:
        raise RuntimeError(f"the cluster did not form: {running}")
    servers.rabbit_env = envs[1]
    yield ";".join(f"amqp://guest:guest@127.0.0.1:{base + 20 + n}//" for n in numbers)


def rabbit_queues(servers: Servers) -> dict[str, dict[str, Any]]:
    """Every queue of the cluster by name: its ``type`` (classic, quorum) and ``leader`` node."""
    out = _ctl(servers.rabbit_env, 1, "list_queues", "name", "type", "leader", "--formatter", "json")
    return {q["name"]: q for q in json.loads(out)}


def quorum_leader(servers: Servers, queue: str) -> str:
    """The name (in ``servers``) of the node leading quorum queue ``queue``, e.g. ``rabbit2``."""
    q = rabbit_queues(servers).get(queue, {})
    match = re.fullmatch(r"bench(\d)@localhost", str(q.get("leader")))
    if q.get("type") != "quorum" or not match:
        raise RuntimeError(f"queue {queue} is not a quorum queue with a known leader: {q}")
    return f"rabbit{match[1]}"
