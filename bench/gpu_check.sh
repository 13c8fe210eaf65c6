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
# Exact assignment: JV on the host against the integer auction on the GPU (its round time
# decides AUCTION_MIN_N, now set from an estimate)
python3 bench/assignment.py --device cuda --repeats 2  # BERT-base: JV should win
python3 bench/assignment.py --device cuda --problems 1 --n 8192 --features 4096 --repeats 2 \
  --costs random-init --no-scipy
