"""benchmarks/gpu_check.sh --cpu-smoke: the prepared GPU check runs end to end on CPU with gloo (tiny sizes), so
the script a GPU session will run is known to work before a GPU is lent."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_smoke_passes(tmp_path):
    out = tmp_path / "rows.json"
    # Started from inside a world of one whose store still holds its port, as this pytest process is after an
    # in-process training test (or a user's notebook): the script's own worlds must neither join it nor collide
    # with its port (CI failed here once: medfm eval inherited MASTER_PORT and hit EADDRINUSE).
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        stale = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(held.getsockname()[1])}
        env = {**os.environ, **stale, "DS_ACCELERATOR": "cpu", "GPU_CHECK_TIMEOUT": "1500", "CUDA_VISIBLE_DEVICES": ""}
        proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--cpu-smoke", "--work",
                               str(tmp_path / "work"), "--out", str(out)], env=env, capture_output=True, text=True,
                              timeout=1600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads(out.read_text())
    passed = {(r["check"], r["case"]) for r in rows if r["status"] == "ok"}
    checks = {c for c, _ in passed}
    assert {"equal", "speed", "shards", "pretrain", "eval", "mfu"} <= checks, passed
    assert {c for c, case in passed if c == "equal" and case == "padding+causal"}
    assert {case for c, case in passed if c == "pretrain"} == {"tiny_multimodal bf16 zero3 x1",
                                                               "tiny_multimodal bf16 ddp x1"}
    lines = [x for x in proc.stdout.splitlines() if x[:4] in ("PASS", "FAIL", "SKIP")]
    assert len(lines) == len(rows) and not any(x.startswith("FAIL") for x in lines)
