#!/usr/bin/env bash
# The main job on one machine: install, start the embedded fusion service (`otfuse serve`),
# train two small ViT parents on scikit-learn's digits (cached in runs/demo), submit OT and
# vanilla fusion jobs over HTTP, wait for them, and print the one-shot metrics.
# (`otfuse demo` is the same flow through the CLI only.)
set -euo pipefail
cd "$(dirname "$0")/.."
echo "otfuse demo: the first run installs into .venv (2-5 min), trains two small ViTs on" >&2
echo "digits (about a minute each on 2 cores), then fuses them; later runs take ~30 s." >&2
echo "[1/2] installing (torch 2.13.0 CPU build first)..." >&2
python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install --progress-bar on torch==2.13.0
python -m pip install --progress-bar on -e .
echo "[2/2] the main job: otfuse serve, two parents, OT and vanilla fusion jobs" >&2
python -m otfuse.service_cli --workdir runs/demo "$@"
