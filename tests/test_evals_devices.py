"""Evals compute on the model's device: nothing fed to the model is built on a device of its own choosing.

A CPU-only host cannot hold a model on a GPU, so the model here lives on the ``meta`` device and asserts that
every input it is given is on its device (what a CUDA model does with a CPU tensor: "Expected all tensors to be on
the same device")."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from medfm.evals.devices import model_device, to_model_device
from medfm.evals.features import text_encoder


class DeviceStrictModel(nn.Module):
    """A text-only model on the meta device that refuses inputs from another device."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4, device="meta")
        self.towers = {"text": SimpleNamespace(cfg=SimpleNamespace(max_length=16, tokenizer=None, path=None),
                                               hf_config=SimpleNamespace(vocab_size=512))}

    def embed(self, modality, batch):
        dev = model_device(self)
        for k, v in batch.items():
            assert v.device == dev, f"{k} on {v.device}, model on {dev}"
        return torch.ones(batch["text_ids"].shape[0], 4)  # stands for the embedding, brought back for numpy


def test_zero_shot_prompts_go_to_the_models_device():
    encode = text_encoder(DeviceStrictModel(), batch_size=2, tokenizer="bytes")
    out = encode(["left effusion", "normal study", "cardiomegaly"])
    assert isinstance(out, np.ndarray) and out.shape == (3, 4)


def test_model_device_and_batch_placement():
    m = DeviceStrictModel()
    assert model_device(m) == torch.device("meta") and model_device(nn.Identity()) == torch.device("cpu")
    got = to_model_device(m, {"ids": torch.ones(2), "keys": ["a"]})
    assert got["ids"].device.type == "meta" and got["keys"] == ["a"]
