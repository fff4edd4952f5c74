"""docker-compose.yml under podman for one test: every resource it makes is its own and is removed.

Why it is built this way (docs/deploy.md, "Podman"):

- **docker-compose 1.29 against podman's Docker-compatible socket**, not podman-compose 1.0.3:
  podman-compose ignores ``depends_on`` conditions (migrate would race web), which
  docker-compose honours.
- **A network namespace of the test's own** (``skyct-<tag>``) holds the podman service that runs
  the stack: netavark turns ``net.ipv4.ip_forward`` on and writes NAT rules when it makes a bridge
  network, and both are per network namespace, so they stay in ours; the machine's own
  sysctls and rules are never touched.  The compute service's ``network_mode: host`` is that
  namespace too, so tenant bridges, taps and veths live and die with it.  A veth pair links it to
  the host (addresses from ``SKYPORT_TEST_NETWORK_POOL``): the test and the compute node reach the
  published web and Redis ports on the namespace's end.
- **Builds run on a second podman service in the host's namespace** with ``network: host``
  (pip and apt reach their registries as any host process does; no bridge, no NAT).
- Health checks are run by ``deploy/podman-healthchecks.py`` (no systemd here for podman's timers).
- The images are the cache: ``skyport-{portal,compute}:ct-<key>`` where the key hashes the build
  context and the local bases' key; a run whose key is present builds nothing.  Two keys are kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "compose"
KEEP_IMAGE_KEYS = 2
IMAGE_REPOS = ("docker.io/library/skyport-portal", "docker.io/library/skyport-compute")
# what the images are built from (.dockerignore leaves out the rest)
CONTEXT = [
    "pyproject.toml",
    "manage.py",
    "portal",
    "compute",
    "images",
    "frontend",
    "deploy",
    ".dockerignore",
]


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def image_key(bases_key: str) -> str:
    """Hash of everything the skyport images are built from."""
    h = hashlib.sha256(bases_key.encode())
    for top in CONTEXT:
        paths = [ROOT / top] if (ROOT / top).is_file() else sorted((ROOT / top).rglob("*"))
        for p in paths:
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc":
                h.update(p.relative_to(ROOT).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


class Addresses:
    """The test's subnets, cut from the end of its network pool (tests' own nets come from the start)."""

    def __init__(self, pool: str) -> None:
        nets = list(ipaddress.ip_network(pool).subnets(new_prefix=24))
        link = next(iter(nets[-1].subnets(new_prefix=30)))
        self.link_prefix = link.prefixlen
        self.host, self.ns = (str(a) for a in list(link.hosts())[:2])
        self.podman_default = str(nets[-2])  # podman's own "podman" network, never used
        self.podman_pool = str(nets[-3])  # the compose project's network
        self.tenant_pool = str(ipaddress.ip_network(f"{nets[-8].network_address}/22"))


class ComposeStack:
    """One compose project under podman, torn down completely by :meth:`close`."""

    WEB_PORT = 18080
    REDIS_PORT = 16379

    def __init__(self, pool: str) -> None:
        self.tag = secrets.token_hex(3)
        self.project = f"skyportct{self.tag}"
        self.node = f"ct{self.tag}"
        self.netns = f"skyct-{self.tag}"
        self.veth_host, self.veth_ns = f"skyct{self.tag}h", f"skyct{self.tag}n"
        self.addr = Addresses(pool)
        self.base = Path("/var/lib/skyport") / f"compose-{self.tag}"
        self.work = self.base / "test"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.timings: dict[str, float] = {}
        self.redis_password = secrets.token_urlsafe(16)
        self.pg_password = secrets.token_urlsafe(16)
        self.env: dict[str, str] = {}
        self._netns_made = False

    # ------------------------------------------------------------------ set-up
    def prepare(self) -> None:
        for d in ("images", "libvirt", "log", "test"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)
        conf = (ROOT / "deploy/podman-containers.conf").read_text()
        conf += (
            f'default_subnet = "{self.addr.podman_default}"\n'
            f'default_subnet_pools = [{{"base" = "{self.addr.podman_pool}", "size" = 24}}]\n'
        )
        (self.work / "containers.conf").write_text(conf)
        (self.work / "empty.env").write_text("")  # never a developer's .env
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("SKYPORT_", "CELERY_", "DJANGO_"))},
            "CONTAINERS_CONF": str(self.work / "containers.conf"),
            "COMPOSE_PROJECT_NAME": self.project,
            "SKYPORT_IMAGE_TAG": "",  # set by build()
            "SKYPORT_BUILD_NETWORK": "host",
            "SKYPORT_SECRET_KEY": secrets.token_urlsafe(50),
            "SKYPORT_ALLOWED_HOSTS": f"{self.addr.ns},127.0.0.1,localhost",
            "SKYPORT_SSL_REDIRECT": "0",  # plain HTTP on the namespace's address, no proxy
            "SKYPORT_BEHIND_PROXY": "0",
            "SKYPORT_PORTAL_URL": f"http://{self.addr.ns}:{self.WEB_PORT}",
            "SKYPORT_NETWORK_POOL": self.addr.tenant_pool,
            "SKYPORT_HEARTBEAT_SECONDS": "2",
            "SKYPORT_SWEEP_SECONDS": "5",
            "POSTGRES_PASSWORD": self.pg_password,
            "DATABASE_URL": f"postgres://skyport:{self.pg_password}@postgres:5432/skyport",
            "REDIS_PASSWORD": self.redis_password,
            "CELERY_BROKER_URL": f"redis://:{self.redis_password}@redis:6379/0",
            "COMPUTE_BROKER_URL": f"redis://:{self.redis_password}@{self.addr.ns}:{self.REDIS_PORT}/0",
            "REDIS_PUBLISH": self.addr.ns,
            "REDIS_PORT": str(self.REDIS_PORT),
            "WEB_PUBLISH": self.addr.ns,
            "WEB_PORT": str(self.WEB_PORT),
            "WEB_WORKERS": "2",
            "CONTROL_CONCURRENCY": "2",
            "SKYPORT_HOST_DIR": str(self.base),
            "LIBVIRT_HOST_DIR": str(self.base / "libvirt"),
            "SKYPORT_LOG_DIR": str(self.base / "log"),
            "SKYPORT_NODE_NAME": self.node,
            "SKYPORT_ACCEL": "qemu",  # TCG: KVM here is PVM (HOST_NOTES)
        }

    @contextlib.contextmanager
    def timed(self, what: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.timings[what] = round(time.monotonic() - start, 1)

    def run(
        self, *cmd: str, timeout: float = 600, check: bool = True, env: dict[str, str] | None = None
    ) -> str:
        out = subprocess.run(
            cmd, env=env or self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and out.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
            )
        return out.stdout

    def start(self, name: str, *cmd: str, netns: bool = False, **env: str) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 -- kept open for the child's lifetime
        argv = ["nsenter", f"--net=/run/netns/{self.netns}", *cmd] if netns else list(cmd)
        proc = subprocess.Popen(
            argv,
            env={**self.env, **env},
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def podman_service(self, name: str, netns: bool) -> str:
        sock = self.work / f"{name}.sock"
        self.start(name, "podman", "system", "service", "--time", "0", f"unix://{sock}", netns=netns)
        wait_for(f"podman service {name}", sock.exists, timeout=30, every=0.2)
        return f"unix://{sock}"

    def local_bases(self) -> None:
        with self.timed("local bases"):
            out = self.run(str(ROOT / "deploy/build-local-bases.sh"), timeout=1200)
        for line in out.splitlines():
            key, _, value = line.partition("=")
            self.env[key] = value
        self.bases_key = self.run(str(ROOT / "deploy/build-local-bases.sh"), "--key").strip()

    def compose(self, *args: str, host: str, timeout: float = 900, check: bool = True) -> str:
        return self.run(
            "docker-compose",
            "-f",
            str(ROOT / "docker-compose.yml"),
            "--project-directory",
            str(ROOT),
            "--env-file",
            str(self.work / "empty.env"),
            *args,
            timeout=timeout,
            check=check,
            env={**self.env, "DOCKER_HOST": host},
        )

    def run_env(self, host: str) -> dict[str, str]:
        return {**self.env, "DOCKER_HOST": host}

    def build(self) -> None:
        """``docker-compose build`` unless this build context's images are cached."""
        key = image_key(self.bases_key)
        self.env["SKYPORT_IMAGE_TAG"] = f"ct-{key}"
        # built through the Docker-compatible API, the short names are docker.io/library/...
        wanted = [f"{repo}:ct-{key}" for repo in IMAGE_REPOS]
        if all(self._image_exists(i) for i in wanted):
            self.timings["images"] = 0.0
            return
        host = self.podman_service("build-service", netns=False)
        with self.timed("images"):
            # one portal service builds the portal image; the others reuse the tag
            self.compose("build", "migrate", "compute", host=host, timeout=1800)
        self._stop(self.procs.pop())  # the build service: not needed any more
        self._prune_images(key)

    def _image_exists(self, ref: str) -> bool:
        return subprocess.run(["podman", "image", "exists", ref], env=self.env).returncode == 0

    def _prune_images(self, key: str) -> None:
        """Keep the newest ``KEEP_IMAGE_KEYS`` keys' images (their layers are the build cache)."""
        for repo in IMAGE_REPOS:
            listed = self.run("podman", "images", "--format", "json", "--filter", f"reference={repo}")
            tags = sorted(
                (img["Created"], name)
                for img in json.loads(listed or "[]")
                for name in img.get("Names") or []
                if name.startswith(f"{repo}:ct-")
            )
            for _, name in tags[:-KEEP_IMAGE_KEYS]:
                if not name.endswith(key):
                    self.run("podman", "rmi", name, check=False)

    def make_netns(self) -> None:
        cmds = [
            ["ip", "netns", "add", self.netns],
            [
                "ip",
                "link",
                "add",
                self.veth_host,
                "type",
                "veth",
                "peer",
                "name",
                self.veth_ns,
                "netns",
                self.netns,
            ],
            ["ip", "addr", "add", f"{self.addr.host}/{self.addr.link_prefix}", "dev", self.veth_host],
            ["ip", "link", "set", self.veth_host, "up"],
            [
                "ip",
                "-n",
                self.netns,
                "addr",
                "add",
                f"{self.addr.ns}/{self.addr.link_prefix}",
                "dev",
                self.veth_ns,
            ],
            ["ip", "-n", self.netns, "link", "set", self.veth_ns, "up"],
            ["ip", "-n", self.netns, "link", "set", "lo", "up"],
        ]
        self._netns_made = True
        for cmd in cmds:
            self.run(*cmd)

    # ------------------------------------------------------------------ use
    def http(self, method: str, path: str, token: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(
            f"http://{self.addr.ns}:{self.WEB_PORT}{path}",
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, raw.decode(errors="replace")

    def healthz(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.addr.ns}:{self.WEB_PORT}/healthz", timeout=3) as r:
                return r.status == 200
        except OSError:
            return False

    # ------------------------------------------------------------------ tear-down
    def logs(self, host: str | None) -> None:
        """Keep the run's logs in test-artifacts/compose/<project>/ (compose services and our daemons)."""
        keep = ARTIFACTS / self.project
        keep.mkdir(parents=True, exist_ok=True)
        if host:
            out = subprocess.run(
                [
                    "docker-compose",
                    "-f",
                    str(ROOT / "docker-compose.yml"),
                    "--project-directory",
                    str(ROOT),
                    "--env-file",
                    str(self.work / "empty.env"),
                    "logs",
                    "--no-color",
                    "--tail",
                    "400",
                ],
                env=self.run_env(host),
                capture_output=True,
                text=True,
                timeout=120,
            )
            (keep / "services.log").write_text(out.stdout + out.stderr)
        for f in self.work.glob("*.log"):
            shutil.copy(f, keep / f.name)
        for f in (self.base / "log").glob("*.log"):
            shutil.copy(f, keep / f"libvirt-{f.name}")

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)

    def _in_netns_pids(self) -> list[int]:
        """Processes whose network namespace is ours (left by podman: aardvark-dns, conmon)."""
        try:
            ours = os.stat(f"/run/netns/{self.netns}").st_ino
        except FileNotFoundError:
            return []
        pids = []
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.stat(p / "ns/net").st_ino == ours:
                        pids.append(int(p.name))
        return pids

    def close(self, host: str | None) -> list[str]:
        """Remove everything this stack made; returns what was still found afterwards."""
        if host:
            self.compose("down", "--volumes", "--remove-orphans", "--timeout", "20", host=host, check=False)
        # containers, volumes and networks of the project, whichever service made them
        label = f"label=com.docker.compose.project={self.project}"
        for kind in ("container", "volume", "network"):
            listed = self._listed(kind, label)
            if listed:
                self.run("podman", kind, "rm", "-f", *listed, check=False)
        for proc in reversed(self.procs):
            self._stop(proc)
        for pid in self._in_netns_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if self._netns_made:
            wait_for("processes in the test's netns to end", lambda: not self._in_netns_pids(), timeout=20)
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
            subprocess.run(["ip", "link", "del", self.veth_host], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)
        return self.leftovers()

    def _listed(self, kind: str, label: str) -> list[str]:
        cmd = ["podman", kind, "ls", "-q", "--filter", label]
        if kind == "container":
            cmd.insert(3, "--all")
        return self.run(*cmd, check=False).split()

    def leftovers(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.project}"
        found = []
        for kind in ("container", "volume", "network"):
            found += [f"{kind} {i}" for i in self._listed(kind, label)]
        if Path(f"/run/netns/{self.netns}").exists():
            found.append(f"netns {self.netns}")
        if Path(f"/sys/class/net/{self.veth_host}").exists():
            found.append(f"link {self.veth_host}")
        if self.base.exists():
            found.append(str(self.base))
        return found
