"""What a broker failover costs Skyport's Celery messages: Redis Sentinel versus RabbitMQ quorum queues.

    .venv/bin/python bench/broker_failover.py [--runs 3] [--messages 3000] [--rate 200]
        [--brokers redis-sentinel,rabbitmq-quorum] [--visibility 10] [--json out.json]

Each run starts its own servers on loopback (tests/brokerservers.py: own ports from --base-port,
own data directories in a temporary directory, removed afterwards), a Celery worker (prefork,
concurrency 2) consuming queue ``bench`` and, in this process, a producer that calls
``send_task`` at ``--rate`` messages a second.  The task appends its sequence number to a ledger
file, so every run of every message is counted.  The brokers:

- ``redis-sentinel``: a primary, one replica and three sentinels (quorum 2,
  ``down-after-milliseconds 1000``); Celery's ``sentinel://`` URL list with ``master_name``.
- ``rabbitmq-quorum``: three RabbitMQ nodes clustered on loopback (own epmd port, own node
  names); ``bench`` is a quorum queue (Raft on all three), publishes wait for confirms; the
  ``amqp://`` URL list of all three.

Scenarios, partway through the stream (``--kill-at``):

- ``none`` (run 0): nothing fails: the baseline, so any loss there is the harness's;
- ``kill``: the primary (Redis) or the queue's leader node (RabbitMQ) gets SIGKILL;
- ``lagging``: a replica falls behind first (SIGSTOP one second before the kill, SIGCONT half a
  second after it), as a replica does behind a slow or broken link; then the primary or leader
  is killed.  On loopback a healthy replica is never more than a few microseconds behind, so
  this is how the replication lag of a real network shows here.

The Celery settings are Skyport's own (compute/celeryconf.py: acks_late, reject_on_worker_lost,
prefetch 1, the publish retry policy, the broker options, quorum queues), with the visibility
timeout shortened to ``--visibility`` so that Redis's redeliveries show within the run.  After
the stream the bench waits until every accepted message has run, or nothing new ran for
visibility + 20 s.  Columns: ``accepted``: ``send_task`` returned (the sender believes the
message is queued); ``refused``: it raised after its retries (the sender knows); ``lost``:
accepted but never run; ``dup``: extra runs of a message; ``gap``: the longest time with no
delivery from the failure on (seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from compute.celeryconf import AMQP_CLASS, broker_settings, reliability_settings  # noqa: E402
from tests.brokerservers import (  # noqa: E402
    MASTER,
    RABBIT_BIN,
    Servers,
    port_free,
    quorum_leader,
    rabbitmq_cluster,
    redis_sentinel,
)

QUEUE = "bench"


def make_app(url: str, visibility: float) -> Any:
    from celery import Celery

    app = Celery("skyport-bench", fixups=[], amqp=AMQP_CLASS)
    app.conf.update(
        **broker_settings(url, visibility, master_name=MASTER),
        **reliability_settings(),
        task_ignore_result=True,
        worker_hijack_root_logger=False,
    )

    @app.task(name="bench.record")
    def record(seq: int) -> None:
        time.sleep(0.01)  # a little work, so some messages are in flight when the broker dies
        fd = os.open(os.environ["BENCH_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{seq} {time.time():.3f}\n".encode())
        finally:
            os.close(fd)

    return app


def worker_main(url: str, visibility: float) -> None:
    app = make_app(url, visibility)
    name = f"bench@{socket.gethostname()}"
    app.worker_main(["worker", "-Q", QUEUE, "-c", "2", "-P", "prefork", "--loglevel", "WARNING", "-n", name])


def _deliveries(path: Path) -> list[tuple[int, float]]:
    """(sequence number, wall-clock time) of every run of the task, from the ledger."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        seq, _, at = line.partition(" ")
        if at:  # a line still being written has no time yet
            out.append((int(seq), float(at)))
    return out


def _ledger(path: Path) -> Counter[int]:
    return Counter(seq for seq, _ in _deliveries(path))


class Failure:
    """The scenario's steps, each at a sequence number of the stream."""

    def __init__(
        self, servers: Servers, broker: str, base: int, scenario: str, kill_at: int, rate: float
    ) -> None:
        self.servers, self.broker, self.base = servers, broker, base
        self.steps: dict[int, Callable[[], None]] = {}
        self.victim = self.laggard = "-"
        self.failed_at: float | None = None
        if scenario == "kill":
            self.steps[kill_at] = self.kill
        elif scenario == "lagging":
            self.steps[max(0, kill_at - int(rate))] = self.pause
            self.steps[kill_at] = self.kill
            self.steps[kill_at + int(rate / 2)] = self.resume

    def _roles(self) -> tuple[str, str]:
        """(primary, a replica) now: the Redis primary and replica, or the queue's leader and a follower."""
        if self.broker == "redis-sentinel":
            return f"redis-{self.base}", f"redis-{self.base + 1}"
        leader = quorum_leader(self.servers, QUEUE)
        follower = next(f"rabbit{n}" for n in (1, 2, 3) if f"rabbit{n}" != leader)
        return leader, follower

    def pause(self) -> None:
        # roles first: rabbitmqctl asks node 1, which may be the one paused next
        self.victim, self.laggard = self._roles()
        self.failed_at = time.time()
        self.servers.pause(self.laggard)

    def kill(self) -> None:
        if self.victim == "-":
            self.victim, _ = self._roles()
        self.failed_at = self.failed_at or time.time()
        self.servers.kill(self.victim)

    def resume(self) -> None:
        self.servers.pause(self.laggard, resume=True)

    def at(self, seq: int) -> None:
        step = self.steps.get(seq)
        if step:
            step()


def one_run(broker: str, run: int, scenario: str, args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix=f"skyport-bench-broker-{broker}-"))
    servers = Servers(tmp)
    ledger = tmp / "ledger"
    result: dict[str, Any] = {"broker": broker, "run": run, "scenario": scenario}
    try:
        if broker == "redis-sentinel":
            cluster: Any = redis_sentinel(servers, args.base_port)
        else:
            cluster = rabbitmq_cluster(servers, args.base_port, nodes=3)
        with cluster as started:
            url = started[0] if isinstance(started, tuple) else started
            env = {**os.environ, "BENCH_LEDGER": str(ledger)}
            cmd = [sys.executable, __file__, "--worker", "--url", url, "--visibility", str(args.visibility)]
            servers.start("worker", cmd, env=env)
            app = make_app(url, args.visibility)
            failure = Failure(
                servers, broker, args.base_port, scenario, int(args.messages * args.kill_at), args.rate
            )
            accepted, refused = _stream(app, failure, args, result)
            _settle(ledger, accepted, args.visibility)
            seen = _ledger(ledger)
            with contextlib.suppress(Exception):
                app.close()
            result.update(
                victim=failure.victim,
                laggard=failure.laggard,
                accepted=len(accepted),
                refused=refused,
                lost=sum(1 for s in accepted if not seen[s]),
                dup=sum(c - 1 for c in seen.values() if c > 1),
                ran=sum(seen.values()),
                gap=_longest_gap(ledger, failure.failed_at) if failure.failed_at else 0.0,
            )
    finally:
        servers.stop_all()
        if args.keep_logs:
            print(f"logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def _stream(
    app: Any, failure: Failure, args: argparse.Namespace, result: dict[str, Any]
) -> tuple[list[int], int]:
    """Send the stream at the rate, running the failure's steps on the way."""
    accepted: list[int] = []
    refused = 0
    t0 = time.monotonic()
    for seq in range(args.messages):
        failure.at(seq)
        try:
            app.send_task("bench.record", args=[seq], queue=QUEUE)
            accepted.append(seq)
        except Exception as exc:  # the publish gave up after Skyport's retry policy
            refused += 1
            result.setdefault("refusal", f"{type(exc).__name__}: {exc}"[:200])
        delay = t0 + (seq + 1) / args.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    result["send_seconds"] = round(time.monotonic() - t0, 1)
    return accepted, refused


def _settle(ledger: Path, accepted: list[int], visibility: float) -> None:
    """Until everything accepted has run, or nothing new ran for visibility + 20 s; then late duplicates."""
    last_count, last_change = -1, time.monotonic()
    while True:
        seen = _ledger(ledger)
        if all(seen[s] for s in accepted):
            break
        total = sum(seen.values())
        if total != last_count:
            last_count, last_change = total, time.monotonic()
        elif time.monotonic() - last_change > visibility + 20:
            break
        time.sleep(0.5)
    time.sleep(2)


def _longest_gap(ledger: Path, since: float) -> float:
    """The longest stretch without a delivery from the failure on (seconds): the outage workers saw."""
    times = sorted(at for _, at in _deliveries(ledger) if at >= since)
    points = [since, *times]
    return round(max((b - a for a, b in itertools.pairwise(points)), default=0.0), 1)


def _table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"\n{args.messages} messages at {args.rate:g}/s per run; failure after {args.kill_at:.0%} of them; "
        f"Redis visibility timeout {args.visibility:g} s\n"
    )
    header = (
        f"{'broker':<17}{'scenario':<9}{'run':>4}{'accepted':>10}{'refused':>9}{'lost':>6}{'dup':>6}"
        f"{'gap s':>7}  killed / paused"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['broker']:<17}{r['scenario']:<9}{r['run']:>4}{r['accepted']:>10}{r['refused']:>9}{r['lost']:>6}"
            f"{r['dup']:>6}{r['gap']:>7.1f}  {r['victim']} / {r['laggard']}"
        )
    print("\ntotals per broker and scenario (lost, dup over accepted):")
    for (broker, scenario), group in itertools.groupby(rows, key=lambda r: (r["broker"], r["scenario"])):
        g = list(group)
        print(
            f"  {broker:<17}{scenario:<9} lost {sum(r['lost'] for r in g)}, dup {sum(r['dup'] for r in g)} "
            f"of {sum(r['accepted'] for r in g)}; refused {sum(r['refused'] for r in g)}; "
            f"gap {min(r['gap'] for r in g):.1f}-{max(r['gap'] for r in g):.1f} s"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per failure scenario and broker")
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=200.0, help="messages sent per second")
    parser.add_argument(
        "--kill-at", type=float, default=0.4, help="fraction of the stream sent before the failure"
    )
    parser.add_argument("--visibility", type=float, default=10.0, help="Redis visibility timeout (s)")
    parser.add_argument("--brokers", default="redis-sentinel,rabbitmq-quorum")
    parser.add_argument("--scenarios", default="kill,lagging")
    parser.add_argument("--base-port", type=int, default=17300)
    parser.add_argument("--json", help="write the rows here too")
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # Celery prefers CELERY_BROKER_URL from the environment (make exports it) to broker_url
    os.environ.pop("CELERY_BROKER_URL", None)
    if args.worker:
        worker_main(args.url, args.visibility)
        return 0
    ports = [args.base_port + o for o in (0, 1, 10, 11, 12, 21, 22, 23, 30, 41, 42, 43)]
    busy = [p for p in ports if not port_free(p)]
    if busy:
        print(f"ports in use: {busy}; pick another --base-port", file=sys.stderr)
        return 2
    brokers = args.brokers.split(",")
    if "rabbitmq-quorum" in brokers and not (RABBIT_BIN / "rabbitmq-server").exists():
        print("rabbitmq-server is not installed (apt-get install rabbitmq-server)", file=sys.stderr)
        return 2
    rows = []
    for broker in brokers:
        plan = [("none", 0)] + [(s, n) for s in args.scenarios.split(",") for n in range(1, args.runs + 1)]
        for scenario, run in plan:
            row = one_run(broker, run, scenario, args)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    _table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
