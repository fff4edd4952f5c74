"""docker-compose.yml, .env.example and the Dockerfiles under deploy/.

No Docker engine is needed: ``docker-compose config`` (Debian's docker-compose
1.29, in the Makefile's DEBS) validates and interpolates the file, and the
tests assert on its output.  Without docker-compose these tests skip locally
and fail when CI is set (tests/hostcaps.py).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.hostcaps import require

ROOT = Path(__file__).resolve().parents[2]
PORTAL_SERVICES = ("migrate", "web", "control", "beat")
READ_BY_LIBRARIES = {"DATABASE_URL"}  # dj_database_url.config() in portal/settings.py


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def _compose_config(tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    require(
        shutil.which("docker-compose") is not None,
        "docker-compose on PATH (Debian package docker-compose, installed by `make test`)",
    )
    args = ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "--project-directory", str(ROOT)]
    if env is not None:
        env_path = tmp_path / "test.env"
        env_path.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        args += ["--env-file", str(env_path)]
    else:
        args += ["--env-file", str(ROOT / ".env.example")]
    # A clean environment: variables of the caller (make exports CELERY_BROKER_URL) would win
    # over the env file.
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    return subprocess.run(
        [*args, "config"], capture_output=True, text=True, env=clean, cwd=tmp_path, timeout=60
    )


@pytest.fixture
def config(tmp_path: Path) -> dict[str, Any]:
    out = _compose_config(tmp_path)
    assert out.returncode == 0, out.stderr
    loaded: dict[str, Any] = yaml.safe_load(out.stdout)
    return loaded


def _volume_targets(service: dict[str, Any]) -> set[str]:
    """Mount points of a service (docker-compose 1.29 prints volumes as "source:target[:mode]")."""
    return {v["target"] if isinstance(v, dict) else v.split(":")[1] for v in service.get("volumes", [])}


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def test_services(config: dict[str, Any]) -> None:
    assert set(config["services"]) == {"postgres", "redis", "migrate", "web", "control", "beat", "compute"}
    assert config["services"]["postgres"]["image"].startswith("postgres:")
    assert config["services"]["redis"]["image"].startswith("redis:")
    assert "postgres-data" in config["volumes"] and "redis-data" in config["volumes"]
    assert "/var/lib/postgresql/data" in _volume_targets(config["services"]["postgres"])


def test_healthchecks(config: dict[str, Any]) -> None:
    s = config["services"]
    assert "pg_isready" in " ".join(s["postgres"]["healthcheck"]["test"])
    assert s["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    assert "http://127.0.0.1:8000/healthz" in " ".join(s["web"]["healthcheck"]["test"])
    assert "inspect ping" in " ".join(s["control"]["healthcheck"]["test"])
    assert "inspect ping" in " ".join(s["compute"]["healthcheck"]["test"])


def test_control_plane_waits_for_healthy_postgres_and_redis_and_for_migrations(
    config: dict[str, Any],
) -> None:
    for name in ("web", "control", "beat"):
        deps = config["services"][name]["depends_on"]
        assert deps["postgres"]["condition"] == "service_healthy", name
        assert deps["redis"]["condition"] == "service_healthy", name
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
    migrate = config["services"]["migrate"]
    assert migrate["restart"] == "no" and "manage.py migrate --noinput" in " ".join(_command(migrate))


def test_worker_commands_and_a_single_beat(config: dict[str, Any]) -> None:
    s = config["services"]
    web = _command(s["web"])
    assert web[:2] == ["gunicorn", "portal.wsgi"]
    control = _command(s["control"])
    assert control[:4] == ["celery", "-A", "portal.celery", "worker"]
    assert control[control.index("-Q") + 1] == "control"
    assert not {"-B", "--beat"} & set(control), "beat runs as its own service, never inside the worker"
    assert _command(s["beat"])[:4] == ["celery", "-A", "portal.celery", "beat"]
    assert "deploy" not in s["beat"] or s["beat"]["deploy"].get("replicas", 1) == 1


def test_compute_service(config: dict[str, Any]) -> None:
    c = config["services"]["compute"]
    assert c["privileged"] is True
    assert c["network_mode"] == "host"
    assert "/dev/kvm:/dev/kvm" in c["devices"]
    targets = _volume_targets(c)
    assert {"/var/lib/libvirt", "/var/lib/skyport", "/sys/fs/cgroup", "/etc/libvirt/qemu"} <= targets
    assert c["environment"]["SKYPORT_NODE_NAME"] == "node-1"
    # the queue is node.<SKYPORT_NODE_NAME>, consumed by compute.worker, in the image's entrypoint
    assert c["build"]["dockerfile"] == "deploy/Dockerfile.compute"
    entry = (ROOT / "deploy/compute-entrypoint.sh").read_text()
    assert 'celery -A compute.worker worker -Q "node.${SKYPORT_NODE_NAME}"' in entry
    assert "compute/host/start-libvirtd.sh" in entry
    assert "/app/deploy/compute-entrypoint.sh" in (ROOT / "deploy/Dockerfile.compute").read_text()
    assert os.access(ROOT / "deploy/compute-entrypoint.sh", os.X_OK)


def test_referenced_dockerfiles_exist(config: dict[str, Any]) -> None:
    built = {name: s["build"] for name, s in config["services"].items() if "build" in s}
    assert set(built) == {*PORTAL_SERVICES, "compute"}
    for name, build in built.items():
        assert Path(build["context"]) == ROOT, name
        assert (ROOT / build["dockerfile"]).is_file(), name
    assert (ROOT / ".dockerignore").is_file()


def test_commands_name_modules_that_import(config: dict[str, Any], tmp_path: Path) -> None:
    modules = set()
    for s in config["services"].values():
        cmd = _command(s)
        if cmd[:1] == ["celery"]:
            modules.add(cmd[cmd.index("-A") + 1])
        if cmd[:1] == ["gunicorn"]:
            modules.add(cmd[1])
    modules.add("compute.worker")  # the compute entrypoint's -A
    assert modules == {"portal.wsgi", "portal.celery", "compute.worker"}
    code = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    m = importlib.import_module(name)\n"
        "    assert hasattr(m, 'application' if name.endswith('wsgi') else 'app'), name\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKYPORT_", "DJANGO_", "CELERY_"))}
    env.update(SKYPORT_VAR_DIR=str(tmp_path), SKYPORT_NODE_NAME="node-1", SKYPORT_SECRET_KEY="k" * 50)
    out = subprocess.run(
        [sys.executable, "-c", code, *sorted(modules)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


def test_environment_names_are_the_ones_the_code_reads(config: dict[str, Any]) -> None:
    portal_source = "".join(p.read_text() for p in (ROOT / "portal").rglob("*.py"))
    compute_source = "".join(p.read_text() for p in (ROOT / "compute").rglob("*.py"))
    for name in PORTAL_SERVICES:
        for key in config["services"][name]["environment"]:
            assert f'"{key}"' in portal_source or key in READ_BY_LIBRARIES, (name, key)
    for key in config["services"]["compute"]["environment"]:
        assert f'"{key}"' in compute_source, key


def test_env_example_passwords_agree() -> None:
    env = _env_file(ROOT / ".env.example")
    assert urlsplit(env["DATABASE_URL"]).password == env["POSTGRES_PASSWORD"]
    assert urlsplit(env["CELERY_BROKER_URL"]).password == env["REDIS_PASSWORD"]
    assert urlsplit(env["COMPUTE_BROKER_URL"]).password == env["REDIS_PASSWORD"]
    assert env["SKYPORT_ENV"] == "production" and env["SKYPORT_BEHIND_PROXY"] == "1"
    assert len(env["SKYPORT_SECRET_KEY"]) >= 50


def test_a_compute_only_host_needs_no_control_plane_secrets(tmp_path: Path) -> None:
    out = _compose_config(
        tmp_path, {"SKYPORT_NODE_NAME": "node-2", "COMPUTE_BROKER_URL": "redis://:pw@10.0.0.1:6379/0"}
    )
    assert out.returncode == 0, out.stderr
    compute = yaml.safe_load(out.stdout)["services"]["compute"]
    assert compute["environment"]["SKYPORT_NODE_NAME"] == "node-2"
    assert compute["environment"]["CELERY_BROKER_URL"] == "redis://:pw@10.0.0.1:6379/0"


def test_migrate_refuses_to_start_without_its_settings(config: dict[str, Any]) -> None:
    """The control plane checks its environment where it runs (the file itself requires nothing)."""
    script = _command(config["services"]["migrate"])[2].replace("$$", "$")
    script = script.replace("exec python manage.py migrate --noinput", "echo migrating")
    full = {k: str(v) for k, v in config["services"]["migrate"]["environment"].items()}
    ok = subprocess.run(["sh", "-c", script], env=full, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == "migrating", ok.stderr
    del full["DATABASE_URL"]
    bad = subprocess.run(["sh", "-c", script], env=full, capture_output=True, text=True)
    assert bad.returncode != 0 and "set DATABASE_URL in .env" in bad.stderr


def _apt_packages(dockerfile: Path) -> set[str]:
    text = dockerfile.read_text().replace("\\\n", " ")
    packages: set[str] = set()
    for match in re.finditer(r"apt-get install ([^&;]*)", text):
        packages |= {w for w in match[1].split() if not w.startswith("-")}
    return packages


def test_compute_image_has_what_the_node_runs() -> None:
    dockerfile = ROOT / "deploy/Dockerfile.compute"
    assert dockerfile.read_text().startswith("# ") and "FROM debian:bookworm" in dockerfile.read_text()
    packages = _apt_packages(dockerfile)
    needed = {
        "libvirt-daemon-system",  # libvirtd, virtlogd, virsh
        "qemu-system-x86",
        "qemu-utils",  # qemu-img: compute/imagecache.py
        "crun",
        "runc",
        "conmon",  # compute/drivers/container.py
        "tini",  # compute/host/start-libvirtd.sh, PID 1
        "iproute2",
        "genisoimage",  # compute/drivers/cloudinit.py: the NoCloud seed
        "libvirt-dev",  # libvirt-python compiles against it
    }
    assert needed <= packages, needed - packages
    # every tool compute/ runs by name comes from an installed package
    tools = {"qemu-img": "qemu-utils", "genisoimage": "genisoimage", "conmon": "conmon", "crun": "crun"}
    source = "".join(p.read_text() for p in (ROOT / "compute").rglob("*.py"))
    for tool, package in tools.items():
        assert f'"{tool}"' in source and package in packages, tool


def test_portal_image_runs_as_a_user_and_bakes_no_secret() -> None:
    text = (ROOT / "deploy/Dockerfile.portal").read_text()
    assert re.search(r"^FROM python:3\.11-slim-bookworm$", text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert "libvirt-dev" in _apt_packages(ROOT / "deploy/Dockerfile.portal")  # build stage only
    assert 'rm -f "$SKYPORT_VAR_DIR/secret_key"' in text
    assert "SKYPORT_SECRET_KEY=" not in text.replace("SKYPORT_SECRET_KEY=collectstatic-only", "")
