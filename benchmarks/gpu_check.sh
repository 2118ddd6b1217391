#!/usr/bin/env bash
# GPU check, kernels to product (one H200, budget < 8 min): attention backends equal + speed; medfm pretrain of the
# tiny multimodal recipe in bf16 under torchrun + NCCL (zero3, ddp; 2 ranks if >1 GPU); medfm eval incl. zero-shot;
# ViT-L/16 MAE MFU. One PASS/FAIL/SKIP line per check, exit 1 if any failed (see benchmarks/gpu_check.py).
#   bash benchmarks/gpu_check.sh [--cpu-smoke] [--out results.json] [--work DIR] [--peak-tflops T]
# Uses $PYTHON, else .venv/bin/python, else python3. A hard timeout ($GPU_CHECK_TIMEOUT, default 480 s) keeps it
# inside the budget; the CPU smoke on a loaded shared host needs more (its test sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
for pkg in flash_attn xformers; do
  "$PY" -c "import $pkg; print('$pkg', $pkg.__version__)" 2>/dev/null || echo "$pkg: not installed (its rows are skipped)"
done
# PYTHONPATH lets it run from a checkout that is not pip-installed (medfm.* maps folders via setup.py)
exec timeout "${GPU_CHECK_TIMEOUT:-480}" "$PY" benchmarks/gpu_check.py "$@"
