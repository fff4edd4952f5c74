"""compute/ runs on nodes without the portal: it must never import Django or portal."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
FORBIDDEN = ("django", "portal", "rest_framework", "celery.contrib.django")


def _imports(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_compute_never_imports_django_or_portal() -> None:
    files = sorted((ROOT / "compute").rglob("*.py"))
    assert files, "compute/ has no modules?"
    bad = [
        f"{f.relative_to(ROOT)}: {name}"
        for f in files
        for name in _imports(f)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    ]
    assert bad == []


def test_importing_every_compute_module_loads_no_django() -> None:
    modules = [
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in sorted((ROOT / "compute").rglob("*.py"))
        if p.name != "__main__.py"
    ]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m.removesuffix('.__init__'))\n"
        # kombu.utils.json imports django.utils.functional when Django happens to be installed (to encode
        # lazy strings); what must never load on a node is the portal, Django's settings, apps or ORM.
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('portal', 'rest_framework')\n"
        "             or m.startswith(('django.conf', 'django.db', 'django.apps', 'django.contrib')))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    # as on a node: no Django settings in the environment
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr
