#!/usr/bin/env bash
# The GPU acceptance run (issue 26) on a bare GPU image: installs the wheelhouse (.whl, built here by
# `make gpu-wheelhouse`) beside the image's packages, checks that plwlab imports, then runs
# benchmarks/gpu_check.py. Extra arguments go to gpu_check.py (e.g. --only 1,2 or --smoke).
#
#   bash tools/gpu_check.sh [--only 1,1c,2,3,4,5,6,7]    results: $OUT/gpu_check.{json,md}, else outputs/gpu_check
#   PYTHON=.venv/bin/python bash tools/gpu_check.sh --smoke        toy sizes on the CPU (tests/test_gpu_check.py)
set -euo pipefail
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
if [ -d .whl ] && ! "$PYTHON" -c "import hydra, omegaconf, lm_eval" 2>/dev/null; then  # the bare image
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" -c "import hydra, omegaconf, lm_eval, plwlab.training.train; import torch; print('plwlab imports; torch', torch.__version__, 'cuda', torch.cuda.is_available())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PYTHON" benchmarks/gpu_check.py --out "${OUT:-outputs/gpu_check}" "$@"
