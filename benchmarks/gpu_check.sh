#!/usr/bin/env bash
# The GPU checks in one run, most informative first:
#   0. benchmarks/gpu_profile.py: where cabvit_h_l2's and convnext_tiny's GPU time goes, by component, and the top
#      kernels (issue 10), results/profile-<device>-<date>.json and .md; a failure is reported and the run goes on
#   1. tests/test_tme_triton.py on the GPU: the compiled kernels against the PyTorch path (slow tests included)
#   2. benchmarks/tme.py: fused vs PyTorch TME at every TME shape of cabvit_h_l1 / h_l2, JSON under results/
#   3. benchmarks/models.py, eager only: the whole-model table, results/<device>-<date>-eager.json and .md
# FULL=1 replaces 3 by the full table with torch.compile (inductor compiles each model for inference, training and
# batch 1: expect tens of minutes for all nine models; pass --models to narrow it, e.g. FULL=1 bash ... --models
# cabvit_h_l2 convnext_tiny). Extra arguments go to benchmarks/models.py.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python benchmarks/gpu_profile.py || echo "gpu_profile.py failed (exit $?); going on with the other checks" >&2
python -m pytest tests/test_tme_triton.py -q -x -p no:cacheprovider
python benchmarks/tme.py --json
if [ "${FULL:-0}" = 1 ]; then
    python benchmarks/models.py "$@"
else
    python benchmarks/models.py --no-compile --tag eager "$@"
fi
