"""Imports point one way (docs/architecture.md): fusion_core knows nothing of HTTP, queues
or clouds; the adapters know nothing of the API or the workers; the API and the workers never
import each other; only `otfuse` (the CLI and the composition root) sees everything."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import REPO

WEB_QUEUE_CLOUD = {
    "fastapi",
    "starlette",
    "uvicorn",
    "httpx",
    "celery",
    "kombu",
    "billiard",
    "redis",
    "boto3",
    "botocore",
    "prometheus_client",
}
FORBIDDEN = {
    "fusion_core": {"adapters", "service", "worker", "otfuse"} | WEB_QUEUE_CLOUD,
    "adapters": {"service", "worker", "otfuse"},
    "service": {"worker", "otfuse"},
    "worker": {"service", "otfuse"},
}


def imported_packages(source: str) -> set[str]:
    """Top-level names of the absolute imports in `source` (relative ones stay inside)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def violations(package: str, files: dict[str, str]) -> list[str]:
    found = []
    for name, source in files.items():
        for target in sorted(imported_packages(source) & FORBIDDEN[package]):
            found.append(f"{name} imports {target}")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package):
    files = {
        str(path.relative_to(REPO)): path.read_text()
        for path in sorted((REPO / package).rglob("*.py"))
    }
    assert files, package
    assert violations(package, files) == []


@pytest.mark.parametrize(
    "package,line",
    [
        ("worker", "from service.jobs import finish"),
        ("service", "import worker.embedded"),
        ("fusion_core", "    import boto3"),
        ("adapters", "from otfuse.server import build_app"),
    ],
)
def test_an_upward_import_is_caught(package, line):
    source = f"def f():\n{line if line.startswith(' ') else '    ' + line}\n"
    assert violations(package, {"x.py": source}) != []


def test_every_package_is_covered():
    packages = {p.parent.name for p in Path(REPO).glob("*/__init__.py")}
    assert packages - {"tests"} == set(FORBIDDEN) | {"otfuse"}


TORCH_FREE = ("fusion_core.plan", "fusion_core.plan_costs", "fusion_core.headers")


def test_the_planner_imports_and_plans_without_torch(tmp_path):
    """The API plans jobs without torch, numpy or safetensors: with them made unimportable,
    the planner's modules import and plan two checkpoints from their headers."""
    import subprocess
    import sys

    from factories import save, tiny_bert

    folders = [str(save(tiny_bert(seed=s), tmp_path / f"m{s}")) for s in (0, 1)]
    code = f"""
import importlib.abc, sys
BLOCKED = {{"torch", "transformers", "safetensors", "scipy", "ot", "numpy", "lap", "sklearn"}}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"the planner imported {{name}}")
sys.meta_path.insert(0, Blocker())
import {", ".join(TORCH_FREE)}, adapters.planning
from fusion_core.plan import local_plan
from fusion_core.spec import FusionSpec
report = local_plan({folders!r}, FusionSpec())
assert report.compatible and report.estimate.host_peak_bytes > 0, report
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
