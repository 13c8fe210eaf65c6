#!/usr/bin/env bash
# The main job on one machine: install, train two small ViT parents on scikit-learn's
# digits, fuse them with the otfuse CLI, and print one-shot metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e .
otfuse demo --workdir runs/demo "$@"
