#!/usr/bin/env bash
# The checks that need a GPU, in one run (the device tool's machine, or any CUDA host with
# the project installed): engine tests with alignment and OT on cuda, then BERT-base timings.
set -euo pipefail
cd "$(dirname "$0")/.."
for dir in .whl gpuwheels; do  # wheels brought to a host without a package index (POT)
  [ -d "$dir" ] || continue
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$dir"/*.whl
  export PYTHONPATH=/tmp/site:$PWD
done
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
OTFUSE_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/test_exactness.py tests/test_heterogeneous.py tests/test_self_fusion.py
python3 bench/bert_base_timing.py --device cuda --workdir /tmp/bench-bert
# Exact assignment: lapx on the host's cores against a batched torch auction on the GPU
python3 bench/assignment.py --device cuda --repeats 2
