"""docker-compose.yml, .env.example and the Dockerfiles under deploy/.

No Docker engine is needed: ``docker-compose config`` (Debian's docker-compose
1.29, in the Makefile's DEBS) validates and interpolates the file, and the
tests assert on its output.  Without docker-compose these tests skip locally
and fail when CI is set (tests/hostcaps.py).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import itertools
import json
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
PORTAL_SERVICES = ("migrate", "web", "relay", "control", "beat")
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
    assert set(config["services"]) == {
        "postgres",
        "redis",
        "migrate",
        "web",
        "relay",
        "control",
        "beat",
        "compute",
    }
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
    # beat: the age of the mark its scheduler touches after every send (tests/deploy/test_beat_health.py)
    beat = _command(s["beat"])
    assert s["beat"]["healthcheck"]["test"] == [
        "CMD",
        "python",
        "-m",
        "portal.beat_health",
        beat[beat.index("--schedule") + 1],
    ]


def test_every_long_running_service_has_a_healthcheck(config: dict[str, Any]) -> None:
    """Everything but one-shot services (restart "no", like migrate) is probed."""
    long_running = {n for n, s in config["services"].items() if s.get("restart", "no") != "no"}
    assert long_running == {"postgres", "redis", "web", "relay", "control", "beat", "compute"}
    for name in long_running:
        check = config["services"][name].get("healthcheck", {})
        assert not check.get("disable") and check.get("test", ["NONE"])[0] in ("CMD", "CMD-SHELL"), name
        assert len(check["test"]) > 1 and check.get("interval") and check.get("retries"), name


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
    text = dockerfile.read_text()
    assert text.startswith("# ") and re.search(r"^ARG SKYPORT_DEBIAN_BASE=debian:bookworm$", text, re.M)
    assert re.search(r"^FROM \$\{SKYPORT_DEBIAN_BASE\}$", text, re.M)
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
    assert re.search(r"^ARG SKYPORT_PYTHON_BASE=python:3\.11-slim-bookworm$", text, re.M)
    assert len(re.findall(r"^FROM \$\{SKYPORT_PYTHON_BASE\}", text, re.M)) == 2  # both stages
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert "libvirt-dev" in _apt_packages(ROOT / "deploy/Dockerfile.portal")  # build stage only
    assert 'rm -f "$SKYPORT_VAR_DIR/secret_key"' in text
    assert "SKYPORT_SECRET_KEY=" not in text.replace("SKYPORT_SECRET_KEY=collectstatic-only", "")


def test_portal_image_has_what_the_portal_runs() -> None:
    """The control worker checks disks with qemu-img: the image lacked it until the stack first ran
    under podman (import_sample_images: "qemu-img is not installed on the portal host")."""
    text = (ROOT / "deploy/Dockerfile.portal").read_text()
    runtime = text[text.rindex("\nFROM ") :].replace("\\\n", " ")  # the stage the containers run
    packages = {w for m in re.finditer(r"apt-get install ([^&;]*)", runtime) for w in m[1].split()}
    source = "".join(p.read_text() for p in (ROOT / "portal").rglob("*.py"))
    assert '["qemu-img"' in source
    assert {"qemu-utils", "libvirt0"} <= packages


def test_images_are_built_from_local_bases_when_asked(config: dict[str, Any]) -> None:
    """Every base image is a variable whose default is the public image (docs/deploy.md)."""
    assert config["services"]["migrate"]["build"]["args"] == {
        "SKYPORT_PYTHON_BASE": "python:3.11-slim-bookworm"
    }
    assert config["services"]["compute"]["build"]["args"] == {"SKYPORT_DEBIAN_BASE": "debian:bookworm"}
    assert config["services"]["postgres"]["image"] == "postgres:16-bookworm"
    assert config["services"]["redis"]["image"] == "redis:7-bookworm"
    script = (ROOT / "deploy/build-local-bases.sh").read_text()
    for name in ("SKYPORT_DEBIAN_BASE", "SKYPORT_PYTHON_BASE", "POSTGRES_IMAGE", "REDIS_IMAGE"):
        assert f'echo "{name}=' in script, name


# ---------------------------------------------------------------- Dockerfiles, parsed
@dataclasses.dataclass
class Stage:
    """What the tests need of one Dockerfile stage: its user, the directories it makes and owns, COPYs."""

    env: dict[str, str] = dataclasses.field(default_factory=dict)
    user: str = "root"
    uids: dict[str, str] = dataclasses.field(default_factory=dict)  # useradd --uid N name
    owners: dict[str, str] = dataclasses.field(default_factory=dict)  # directory made -> its owner
    copies: list[list[str]] = dataclasses.field(default_factory=list)  # sources in the build context


def _instructions(text: str) -> list[tuple[str, str]]:
    # Docker drops comment lines, even inside a continued instruction, then joins continuations.
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, args = line.strip().partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


def _expand(text: str, env: dict[str, str]) -> str:
    return re.sub(
        r"\$(?:\{(\w+)\}|(\w+))", lambda m: env.get(m[1] or m[2], m[0]), text
    )  # unknown variables stay as they are


def _commands(script: str) -> list[list[str]]:
    """The simple commands of a RUN line, without leading VAR=value assignments."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|", "(", ")"):
            commands.append([])
        else:
            commands[-1].append(token)
    out = []
    for cmd in commands:
        words = list(itertools.dropwhile(lambda w: re.fullmatch(r"\w+=.*", w) is not None, cmd))
        if words:
            out.append(words)
    return out


def _run(stage: Stage, script: str) -> None:
    for cmd in _commands(_expand(script, stage.env)):
        args = [a for a in cmd[1:] if not a.startswith("-")]
        if cmd[0] == "mkdir":
            if "-m" in cmd:  # the mode is an argument of its own
                args.remove(cmd[cmd.index("-m") + 1])
            for path in args:
                stage.owners[os.path.normpath(path)] = stage.user
        elif cmd[0] == "chown" and args:
            owner = args[0].split(":")[0]
            for path in map(os.path.normpath, args[1:]):
                for made in stage.owners:
                    if made == path or ("-R" in cmd and made.startswith(path + "/")):
                        stage.owners[made] = owner
        elif cmd[0] in ("useradd", "adduser") and "--uid" in cmd:
            stage.uids[cmd[-1]] = cmd[cmd.index("--uid") + 1]


def _final_stage(dockerfile: Path) -> Stage:
    """The stage the image runs (the last FROM), with the COPY sources of every stage."""
    stage, copies = Stage(), []
    for instruction, args in _instructions(dockerfile.read_text()):
        if instruction == "FROM":
            stage = Stage()
        elif instruction == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                stage.env[key] = _expand(value, stage.env)
        elif instruction == "USER":
            stage.user = args.split(":")[0]
        elif instruction == "RUN":
            _run(stage, args)
        elif instruction in ("COPY", "ADD"):
            words = json.loads(args) if args.startswith("[") else shlex.split(args)
            if not any(w.startswith("--from=") for w in words):
                copies.append([w for w in words if not w.startswith("--")][:-1])
    stage.copies = copies
    return stage


def _runs_as(service: dict[str, Any], stage: Stage) -> str:
    return str(service.get("user", stage.user)).split(":")[0]


def _same_user(a: str, b: str, stage: Stage) -> bool:
    return stage.uids.get(a, a) == stage.uids.get(b, b)


def _writable_named_volumes(config: dict[str, Any], service: dict[str, Any]) -> list[str]:
    """Targets of the service's named volumes that are not read-only (docker-compose 1.29 prints
    "source:target:mode"; a named volume's source is a key of the top-level volumes)."""
    targets = []
    for v in service.get("volumes", []):
        source, target, mode = (
            (v["source"], v["target"], "ro" if v.get("read_only") else "rw")
            if isinstance(v, dict)
            else [*v.split(":"), "rw"][:3]
        )
        if source in config.get("volumes", {}) and mode != "ro":
            targets.append(os.path.normpath(target))
    return targets


def _volume_ownership(config: dict[str, Any], dockerfiles: dict[str, Stage]) -> tuple[set[Any], list[str]]:
    """(service, mount) pairs checked, and the problems: a writable named volume mounted into a
    service that runs as a user other than root, where the image lacks the directory or the user
    does not own it (Docker would then create it owned by root)."""
    checked, problems = set(), []
    for name, service in config["services"].items():
        if "build" not in service:
            continue  # images of others (postgres, redis) prepare their own directories
        stage = dockerfiles[service["build"]["dockerfile"]]
        user = _runs_as(service, stage)
        if user in ("root", "0"):
            continue
        for target in _writable_named_volumes(config, service):
            checked.add((name, target))
            owner = stage.owners.get(target)
            if owner is None:
                problems.append(f"{name}: {target} is not created by {service['build']['dockerfile']}")
            elif not _same_user(owner, user, stage):
                problems.append(f"{name}: {target} is owned by {owner}, the service runs as {user}")
    return checked, problems


def _dockerfiles(config: dict[str, Any]) -> dict[str, Stage]:
    return {
        s["build"]["dockerfile"]: _final_stage(ROOT / s["build"]["dockerfile"])
        for s in config["services"].values()
        if "build" in s
    }


def test_writable_volumes_of_unprivileged_services_are_made_and_owned_by_the_image(
    config: dict[str, Any],
) -> None:
    checked, problems = _volume_ownership(config, _dockerfiles(config))
    assert problems == []
    # the image store of web and control, at least, was checked
    assert {("web", "/var/lib/skyport/store"), ("control", "/var/lib/skyport/store")} <= checked


def test_the_volume_check_finds_a_directory_the_image_lacks(config: dict[str, Any], tmp_path: Path) -> None:
    """The check above on the portal Dockerfile as it was: the store was never created."""
    text = (ROOT / "deploy/Dockerfile.portal").read_text()
    assert " /var/lib/skyport/store" in text
    old = tmp_path / "Dockerfile.portal"
    old.write_text(text.replace(" /var/lib/skyport/store", ""))
    dockerfiles = {**_dockerfiles(config), "deploy/Dockerfile.portal": _final_stage(old)}
    _, problems = _volume_ownership(config, dockerfiles)
    assert "web: /var/lib/skyport/store is not created by deploy/Dockerfile.portal" in problems
    # and one it makes but leaves to root
    old.write_text(
        text.replace(
            'skyport:skyport "$SKYPORT_VAR_DIR" /var/lib/skyport/store', 'skyport:skyport "$SKYPORT_VAR_DIR"'
        )
    )
    dockerfiles["deploy/Dockerfile.portal"] = _final_stage(old)
    _, problems = _volume_ownership(config, dockerfiles)
    assert "control: /var/lib/skyport/store is owned by root, the service runs as skyport" in problems


def test_portal_image_user_and_directories() -> None:
    stage = _final_stage(ROOT / "deploy/Dockerfile.portal")
    assert stage.user == "skyport" and stage.uids == {"skyport": "10001"}
    assert stage.owners["/var/lib/skyport-portal"] == "skyport"  # SKYPORT_VAR_DIR: beat's schedule
    assert stage.env["SKYPORT_VAR_DIR"] == "/var/lib/skyport-portal"


def _dockerignored(path: str, patterns: list[str]) -> bool:
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(p, pat.strip("/")) for p in prefixes for pat in patterns)


def test_every_copied_path_exists_and_is_in_the_build_context(config: dict[str, Any]) -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in ignored), "exceptions (!) are not handled here"
    seen = []
    for dockerfile, stage in _dockerfiles(config).items():
        for sources in stage.copies:
            for source in sources:
                seen.append(source)
                assert glob.glob(str(ROOT / source)), f"{dockerfile}: COPY {source}: no such path"
                assert not _dockerignored(source, ignored), f"{dockerfile}: COPY {source}: in .dockerignore"
    assert {"pyproject.toml", "portal", "compute", "manage.py", "frontend"} <= set(seen)
    assert "deploy/compute-entrypoint.sh" in seen
