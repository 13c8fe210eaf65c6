#!/usr/bin/env bash
# Install everything into .venv and run the linters and the whole test suite.
# (The README's test command; CI runs exactly this.)
set -euo pipefail
cd "$(dirname "$0")/.."
python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch first: anything else in range would pull CUDA wheels.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
ruff check .
ruff format --check .
python -m pytest -q "$@"
