#!/usr/bin/env bash
# Model-zoo GPU check (one H200, budget < 8 min): attention backends equal + speed, ViT MAE bf16 MFU.
#   bash benchmarks/gpu_check.sh [--cpu-smoke] [--out results.json]
# Uses $PYTHON, else .venv/bin/python, else python3. A hard 480 s timeout keeps it inside the budget.
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
exec timeout 480 "$PY" benchmarks/gpu_check.py "$@"
