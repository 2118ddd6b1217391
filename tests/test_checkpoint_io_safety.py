"""Reading a ZeRO-3 checkpoint (medfm eval / medfm release) never unpickles arbitrary objects: DeepSpeed's
zero_to_fp32 asks torch.load for weights_only=False, medfm forces weights_only=True with an allowlist."""

from __future__ import annotations

import pathlib

import pytest
import torch

from medfm.model_zoo.checkpoint_io import consolidate


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what a hostile checkpoint would do on unpickling
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_hostile_partition_file_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    tag = tmp_path / "ckpt" / "step1"
    tag.mkdir(parents=True)
    for kind in ("optim", "model"):
        torch.save({"payload": _Payload(str(marker))}, tag / f"zero_pp_rank_0_mp_rank_00_{kind}_states.pt")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global|refused to load"):
        consolidate(tmp_path / "ckpt", "step1")
    assert not marker.exists()
    assert torch.load.__module__ == "torch.serialization"  # the forced-weights_only wrapper is gone again
