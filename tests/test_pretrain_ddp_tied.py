"""A DDP checkpoint of a model with tied weights (the caption decoder's token embedding = its lm_head) saves on CPU.

On CPU ``tensor.cpu()`` returns the tensor itself, so the tied pair reached safetensors sharing memory and the save
raised ("Some tensors share memory"); on CUDA the copy hid it. Found by benchmarks/gpu_check.sh --cpu-smoke."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_support import make_shards, run_config  # noqa: E402

from medfm.pretrain.config import RunConfig  # noqa: E402
from medfm.schema import from_dict  # noqa: E402


def test_ddp_checkpoint_with_tied_caption_weights(tmp_path):
    from safetensors.torch import load_file

    from medfm.pretrain.train import run

    shards = make_shards(tmp_path / "shards", n=8, modalities=("image", "text"))
    cfg = run_config(tmp_path / "run", shards, [{"name": "mae:image"}, {"name": "caption:image"}],
                     ("image", "text"), batch=4, steps=2, train={"strategy": "ddp"}, checkpoint={"final": True})
    assert run(from_dict(RunConfig, cfg)).status == "finished"
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step2" / "model.safetensors"))
    emb, head = saved["model.caption_decoder.token_embed.weight"], saved["model.caption_decoder.lm_head.weight"]
    assert emb.data_ptr() != head.data_ptr() and (emb == head).all()
