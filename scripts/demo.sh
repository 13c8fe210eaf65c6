#!/usr/bin/env bash
# The main job on one machine: install, start the embedded fusion service (`otfuse serve`),
# train two small ViT parents on scikit-learn's digits (cached in runs/demo), submit OT and
# vanilla fusion jobs over HTTP, wait for them, and print the one-shot metrics.
# (`otfuse demo` is the same flow through the CLI only.)
set -euo pipefail
cd "$(dirname "$0")/.."
python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e .
python -m otfuse.service_cli --workdir runs/demo "$@"
