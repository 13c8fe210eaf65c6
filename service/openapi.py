"""Print the API contract as YAML: `python -m service.openapi > openapi.yaml` (a test keeps
openapi.yaml equal to what the app serves)."""

from __future__ import annotations

import sys

import yaml


def schema() -> dict:
    from adapters.queue import Queue
    from adapters.settings import Settings
    from adapters.store import MemoryJobStore

    from .app import create_app

    return create_app(Settings(), store=MemoryJobStore(), queue=Queue()).openapi()


def render() -> str:
    return yaml.safe_dump(schema(), sort_keys=False, allow_unicode=True, width=100)


if __name__ == "__main__":
    sys.stdout.write(render())
