"""Resume a ZeRO-3 checkpoint at another world size (pretrain/reshard.py): 2 ranks train and checkpoint, then the
run continues from step 2 on 1 rank and on 3 ranks. The global sample order continues exactly (same global batches,
re-partitioned) and the loss continues within fp32 tolerance of the uninterrupted 2-rank run."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_support import make_shards, run_config  # noqa: E402

from medfm.pretrain.world_env import env_outside_world  # noqa: E402

HELPER = str(Path(__file__).parent / "pretrain_support.py")


def _torchrun(nproc: int, config: dict, tmp: Path, name: str) -> dict:
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps({"phases": [{"config": config}], "out": str(tmp / name)}))
    env = {**env_outside_world(), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), HELPER,
           str(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads((tmp / f"{name}.rank0.json").read_text())["phases"][0]


def _config(run_dir: Path, shards: str, **checkpoint) -> dict:
    cfg = run_config(run_dir, shards, [{"name": "contrastive:image-text"}], ("image", "text"), batch=3, steps=4,
                     checkpoint={"every": 2, "keep": 10, **checkpoint})
    cfg["model"]["towers"]["text"]["overrides"].update({"hidden_dropout": 0.0, "attention_dropout": 0.0})
    return cfg


def _global_order(data_cfg: dict, state: dict, world: int, steps: int) -> list[list[str]]:
    """Sample keys of the next ``steps`` global batches, in slot order, as a world of ``world`` ranks reads them."""
    from medfm.shards.collate import ByteTokenizer
    from medfm.shards.loader import build_loader

    per_rank = []
    for r in range(world):
        loader = build_loader({**data_cfg, "batch_size": 6 // world}, rank=r, world_size=world,
                              tokenizer=ByteTokenizer(16))
        loader.load_state_dict(state)
        it = iter(loader)
        per_rank.append([next(it)["keys"] for _ in range(steps)])
    order = []
    for s in range(steps):
        slots = [None] * 6
        for r in range(world):
            slots[r::world] = list(per_rank[r][s])
        order.append(slots)
    return order


@pytest.mark.slow
def test_resume_on_one_and_three_ranks_continues_order_and_loss(tmp_path):
    shards = make_shards(tmp_path / "shards", n=24, modalities=("image", "text"))
    ref_dir = tmp_path / "ref"
    ref = _torchrun(2, _config(ref_dir, shards), tmp_path, "ref")
    assert ref["status"] == "finished" and [x["step"] for x in ref["losses"]] == [1, 2, 3, 4]
    client = json.loads((ref_dir / "checkpoints" / "step2" / "client" / "rank0.json").read_text())
    data_cfg = _config(ref_dir, shards)["data"]
    expected = _global_order(data_cfg, client["loader"], 2, 2)
    for world in (1, 3):
        assert _global_order(data_cfg, client["loader"], world, 2) == expected, world  # nothing lost or repeated
        run = tmp_path / f"w{world}"
        shutil.copytree(ref_dir / "checkpoints" / "step2", run / "checkpoints" / "step2")
        (run / "checkpoints" / "latest").write_text("step2")
        res = _torchrun(world, _config(run, shards, resume="latest"), tmp_path, f"w{world}")
        assert res["status"] == "finished", res
        assert [x["step"] for x in res["losses"]] == [3, 4]
        for mine, theirs in zip(res["losses"], ref["losses"][2:]):
            for k in theirs:
                if k != "step":
                    assert math.isclose(mine[k], theirs[k], rel_tol=1e-4, abs_tol=1e-5), (world, k, mine, theirs)
        assert (run / "checkpoints" / "step2_universal" / "COMPLETE").is_file()
        assert not (run / "checkpoints" / "latest_universal").exists()
        assert (run / "checkpoints" / "step4" / "COMPLETE").is_file()
