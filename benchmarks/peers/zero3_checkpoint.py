"""Write a real DeepSpeed ZeRO-3 checkpoint of a tiny model (one rank of a gloo world) for the consolidation parity
test: odd parameter sizes (so partitions are padded), a few optimizer steps (so weights differ from init), and the
expected full fp32 weights saved beside it by gathering every partition inside the engine.

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 zero3_checkpoint.py OUT_DIR
Writes OUT_DIR/ckpt/<tag>/... (DeepSpeed's own save_checkpoint) and OUT_DIR/gathered.safetensors (rank 0).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

TAG = "step3"


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(37, 13)
        self.proj = nn.Linear(13, 11)
        self.norm = nn.LayerNorm(11)
        self.head = nn.Linear(11, 5, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor([2.6593]))  # shape [1], as medfm's learnable scalars

    def forward(self, ids):
        return self.head(self.norm(self.proj(self.embed(ids)).relu())).mean() * self.logit_scale.exp()


def main(out_dir: str) -> None:
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # avoids a 35 s JIT build on CPU
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=Tiny(), model_parameters=None, config=config)
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        loss = engine(torch.randint(0, 37, (2, 7), generator=g))
        engine.backward(loss)
        engine.step()
    root = Path(out_dir) / "ckpt"
    engine.save_checkpoint(str(root), tag=TAG)
    full = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            full[name] = p.detach().float().clone()
    if rank == 0:
        save_file(full, str(Path(out_dir) / "gathered.safetensors"))
    torch.distributed.barrier()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: zero3_checkpoint.py OUT_DIR")
    main(sys.argv[1])
