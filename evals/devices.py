"""Where evaluation computes: one owner for every device decision in medfm.evals.

The model is placed once, on the accelerator's device (``place``); everything fed to it afterwards (zero-shot
prompt token ids, generation and dense batches, feature batches) goes to *the model's* device (``model_device``),
so no call site guesses "cuda if available" on its own and a prompt built on the CPU never meets a model on a GPU.
Protocols that fit their own small heads on extracted features (segmentation's decoder) use ``default_device``,
the same rule accelerate applies: the current CUDA device when there is one, else the CPU.
"""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """The current CUDA device when CUDA is available, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def model_device(model) -> torch.device:
    """The device of ``model``'s parameters (its buffers for a parameter-free module; CPU for neither)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def place(model, accelerator):
    """``model`` on the accelerator's device (in place, as ``nn.Module.to``); returns it."""
    return model.to(accelerator.device)


def to_model_device(model, batch: dict) -> dict:
    """Every tensor of ``batch`` on ``model``'s device (other values unchanged)."""
    dev = model_device(model)
    return {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
