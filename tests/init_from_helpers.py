"""torchrun entry for tests/test_init_from.py: pretrained initialisation of a ZeRO-3 engine built under
deepspeed.zero.Init (2 CPU ranks), reported per rank as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(spec_path: str) -> None:
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    import torch
    import torch.distributed as dist

    from medfm.pretrain.checkpoint import CheckpointManager
    from medfm.pretrain.config import RunConfig
    from medfm.pretrain.engine import Engine, init_distributed, setup_environment
    from medfm.schema import from_dict

    spec = json.loads(Path(spec_path).read_text())
    setup_environment()
    rank, world = init_distributed()
    report = {}
    # 1. the MiniLM text tower built under zero.Init, filled from its package, against from_pretrained
    cfg = from_dict(RunConfig, spec["minilm"])
    engine = Engine(cfg, rank, world)
    tower = engine.module.model.towers["text"]
    report["minilm_partitioned"] = all(hasattr(p, "ds_id") for p in tower.parameters())
    report["minilm_local_numel"] = sum(p.ds_tensor.numel() for p in tower.parameters())  # this rank's share
    report["minilm_full_numel"] = sum(p.ds_numel for p in tower.parameters())
    batch = tower.tokenize(["chest x-ray: no acute cardiopulmonary process", "small left pleural effusion"])
    engine.module.eval()
    with torch.no_grad():
        ours = tower(batch["text_ids"], attention_mask=batch["text_valid"])
    from transformers import AutoModel

    from medfm.model_zoo.text import resolve_local_dir

    ref = AutoModel.from_pretrained(resolve_local_dir(tower.cfg.path), add_pooling_layer=False,
                                    use_safetensors=True).eval()
    with torch.no_grad():
        theirs = ref(input_ids=batch["text_ids"], attention_mask=batch["text_valid"].long()).last_hidden_state
    report["minilm_max_diff"] = float((ours - theirs).abs().max())
    full = engine.gathered_state_dict()
    ref_sd = ref.state_dict()
    report["minilm_weight_max_diff"] = max(float((full[f"model.towers.text.model.{k}"] - v).abs().max())
                                           for k, v in ref_sd.items() if f"model.towers.text.model.{k}" in full)
    report["minilm_weights_compared"] = sum(f"model.towers.text.model.{k}" in full for k in ref_sd)
    del engine, tower
    # 2. a zoo release continued under ZeRO-3: checkpoint at step 0, consolidated
    cfg = from_dict(RunConfig, spec["release"])
    engine = Engine(cfg, rank, world)
    mgr = CheckpointManager(Path(cfg.run_dir) / "checkpoints", 1, rank, world)
    mgr.save(engine, 0, {"step": 0})
    dist.barrier()
    Path(spec["out"]).with_suffix(f".rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
