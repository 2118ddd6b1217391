"""The checkpoint layout's one owner, and reading a checkpoint into one fp32 state dict.

Read-only and free of training code, so evals, release and launch read checkpoints without importing
medfm.pretrain (dependency direction: evals -> {model_zoo, shards}); pretrain's CheckpointManager writes through
the same names. Layout of ``<run_dir>/checkpoints``::

    step15/                   DeepSpeed ZeRO-3 files (per-rank partitions)  |  ddp: model/optimizer .safetensors
    step15/client/rank0.json  step, samples seen, loader state, RNG states, resolved config, manifest hashes, commit
    step15/COMPLETE           {"world_size", "step"}, written by rank 0 after every rank finished writing
    latest                    the tag of the newest COMPLETE checkpoint (atomic rename)

State dicts of the trained PretrainModule carry the ``model.`` prefix on the MultiModalModel's tensors
(``model_state_dict`` strips it). Every file is read without unpickling arbitrary objects (``weights_only_loads``).
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch

from medfm.schema.atomic import atomic_write

LATEST = "latest"
COMPLETE = "COMPLETE"
CLIENT_DIR = "client"
MODEL_PREFIX = "model."
TAG_RE = re.compile(r"^step(\d+)$")


# -- layout ------------------------------------------------------------------------------------------------------
def tag_for(step: int) -> str:
    return f"step{step}"


def step_of(tag: str) -> int:
    return int(TAG_RE.match(tag).group(1))


def client_file(root, tag: str, rank: int = 0) -> Path:
    return Path(root) / tag / CLIENT_DIR / f"rank{rank}.json"


def is_complete(root, tag: str) -> bool:
    return (Path(root) / tag / COMPLETE).is_file()


def read_complete(root, tag: str) -> dict:
    """The COMPLETE marker's record ({"world_size", "step"})."""
    return json.loads((Path(root) / tag / COMPLETE).read_text())


def complete_tags(root) -> list[str]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if TAG_RE.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(tags, key=step_of)


def latest(root) -> str | None:
    """The tag ``latest`` names if that checkpoint is complete, else None."""
    f = Path(root) / LATEST
    tag = f.read_text().strip() if f.is_file() else ""
    return tag if tag and is_complete(root, tag) else None


def latest_tag(checkpoint_dir) -> str:
    """The tag ``latest`` names, if that checkpoint is complete (ValueError, one line, otherwise)."""
    tag = latest(checkpoint_dir)
    if tag is None:
        raise ValueError(f"checkpoint.resume=latest: no complete checkpoint under {Path(checkpoint_dir)}")
    return tag


def resolve_tag(root, spec: str) -> str:
    """``latest`` or a tag -> an existing complete tag (ValueError, one line, otherwise)."""
    if spec == LATEST:
        return latest_tag(root)
    if not is_complete(root, spec):
        raise ValueError(f"checkpoint.resume={spec}: no complete checkpoint {Path(root) / spec} "
                         f"(have {complete_tags(root)})")
    return spec


def write_json_atomic(path: Path, data) -> None:
    atomic_write(path, json.dumps(data, indent=1))


def mark_complete(root, tag: str, world_size: int, step: int) -> None:
    """Rank 0, after every rank has written: COMPLETE, then move ``latest`` onto ``tag`` (both atomic)."""
    root = Path(root)
    write_json_atomic(root / tag / COMPLETE, {"world_size": world_size, "step": step})
    atomic_write(root / LATEST, tag)


def find_checkpoint(path) -> tuple[Path, str]:
    """(checkpoints root, tag) from a run dir, its ``checkpoints`` dir or one ``stepN`` dir (latest when not named).
    ValueError (one line) when there is no complete checkpoint there."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: checkpoint not found")
    if (p / COMPLETE).is_file():
        return p.parent, p.name
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    tag = latest(root)
    if tag is None:
        raise ValueError(f"{p}: no complete checkpoint (expected a run dir, its checkpoints/ or a stepN dir "
                         f"with {COMPLETE})")
    return root, tag


def is_checkpoint(path) -> bool:
    """Whether ``path`` looks like a run dir, checkpoints dir or stepN dir (complete or not)."""
    p = Path(path)
    return p.is_dir() and ((p / COMPLETE).is_file() or (p / LATEST).is_file()
                           or (p / "checkpoints" / LATEST).is_file())


def read_client(root, tag: str, rank: int = 0) -> dict:
    """Client state (JSON, never pickle) of ``rank``; ValueError (one line) when absent or not JSON."""
    f = client_file(root, tag, rank)
    if not f.is_file():
        raise ValueError(f"{Path(root) / tag}: no client state ({CLIENT_DIR}/rank{rank}.json) — not a medfm "
                         "checkpoint, or written by a smaller world")
    try:
        return json.loads(f.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{f}: refused: client state is not JSON ({type(exc).__name__}); medfm never unpickles it") from None


def read_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict, str]:
    """checkpoint (run dir / checkpoints dir / stepN dir) -> (MultiModalModel weights without the ``model.``
    prefix, rank 0's client state, tag). ValueError, one line, for anything unreadable or hostile."""
    root, tag = find_checkpoint(path)
    client = read_client(root, tag)
    return model_state_dict(consolidate(root, tag)), client, tag


def model_state_dict(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The MultiModalModel part of a PretrainModule state dict (keys without ``model.``) — what
    ``medfm.model_zoo.release`` and ``MultiModalModel.load_state_dict`` take."""
    return {k[len(MODEL_PREFIX):]: v for k, v in full.items() if k.startswith(MODEL_PREFIX)}


def has_model_prefix(sd: dict) -> bool:
    """A PretrainModule state dict (``model.towers...`` plus objective parameters) rather than a bare model's."""
    return bool(sd) and any(k.startswith(MODEL_PREFIX + "towers.") for k in sd) and all(
        k.startswith(MODEL_PREFIX) or not k.startswith(("towers.", "heads.")) for k in sd)


# -- reading without unpickling ----------------------------------------------------------------------------------
class UnsafeCheckpointError(ValueError):
    """A checkpoint file that needs arbitrary unpickling to load (refused; nothing in it was executed)."""


def _allowlist() -> list:
    """The only non-tensor types DeepSpeed's ZeRO-3 files hold (model states, optimizer states, engine state)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


def _refusal(path, exc: Exception) -> UnsafeCheckpointError:
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text) or re.search(r"Unsupported operand (\S+)", text)
    what = found.group(1) if found else text.strip().splitlines()[0][:120] if text.strip() else type(exc).__name__
    return UnsafeCheckpointError(f"{path}: refused to load (it needs unpickling {what}, which could run code; "
                                 "medfm loads tensors only)")


def safe_torch_load(path, map_location=None, _load=None):
    """``torch.load(path, weights_only=True)`` with the DeepSpeed allowlist; a file that needs anything else is
    refused with one line (UnsafeCheckpointError) and nothing in it runs."""
    import pickle

    load = _load or torch.load
    try:
        with torch.serialization.safe_globals(_allowlist()):
            return load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, exc) from None


@contextlib.contextmanager
def weights_only_loads():
    """DeepSpeed's zero_to_fp32 and load_checkpoint (engine, stage-3 optimizer, universal checkpoints) call
    torch.load with weights_only disabled: a checkpoint handed over by a colleague could then run arbitrary code.
    Within this context every torch.load is ``safe_torch_load`` (weights_only=True, DeepSpeed's types allowlisted),
    so a file that needs anything else is refused instead of executed."""
    original = torch.load

    def load(f, map_location=None, *args, **kwargs):
        return safe_torch_load(f, map_location, _load=original)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def weights_only_checkpoint_engine(config=None):
    """A DeepSpeed checkpoint engine whose ``load`` is ``safe_torch_load`` (DeepSpeed's own TorchCheckpointEngine
    passes weights_only=False); install it as ``ds_engine.checkpoint_engine`` before ``load_checkpoint``."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_torch_load(path, map_location)

    return WeightsOnlyCheckpointEngine(config)


def consolidate(checkpoint_dir, tag: str | None = None) -> dict[str, torch.Tensor]:
    """fp32 state dict of the PretrainModule in checkpoint ``tag`` (default: the latest complete one) — keys carry the
    ``model.`` prefix (see ``model_state_dict``). ZeRO-3 partitions are merged with DeepSpeed's zero_to_fp32 (exact
    fp32 master weights) with every torch.load forced to weights_only (see ``weights_only_loads``); a DDP
    checkpoint is safetensors, read directly."""
    root = Path(checkpoint_dir)
    if tag is None:
        tag = latest_tag(root)
    path = root / tag  # an explicit tag may also be a plain DeepSpeed checkpoint (no medfm COMPLETE marker)
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads():
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag))
