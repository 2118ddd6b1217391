"""#16 moved code without changing behaviour: training (and its resume), evaluation and release give the outputs
the code before the refactor gave on the same seed (tests/data/golden_outputs.json, written by
tests/golden_outputs.py on commit 4d7bcc8). Run as a child with one thread, as the reference was, so the float
reductions run in the same order."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from medfm.pretrain.world_env import env_outside_world

HERE = Path(__file__).parent


def _close(a, b, path="") -> list[str]:
    """Paths where ``a`` and ``b`` differ (floats within 1e-5 relative / 1e-6 absolute)."""
    if isinstance(a, float) or isinstance(b, float):
        ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-5,
                                                                                         abs_tol=1e-6)
        return [] if ok else [f"{path}: {a!r} != {b!r}"]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a)} != {sorted(b)}"]
        return [d for k in a for d in _close(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _close(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def test_train_resume_eval_release_match_the_pre_refactor_outputs(tmp_path):
    out = tmp_path / "now.json"
    env = env_outside_world(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(HERE / "golden_outputs.py"), str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    want = json.loads((HERE / "data" / "golden_outputs.json").read_text())
    diffs = _close(want, json.loads(out.read_text()))
    assert not diffs, "\n".join(diffs[:20])
