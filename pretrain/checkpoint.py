"""Checkpoints: save every N steps, keep K, move "latest" only after every rank finished, resume exactly.

The layout (``latest``, ``COMPLETE``, ``client/rank<r>.json``, the ``model.`` prefix) has one owner,
medfm.model_zoo.checkpoint_io, which evals, release and launch read through too; this module writes it.
Our own client state is JSON (never pickle); DeepSpeed's files are read with weights_only=True (its checkpoint
engine is swapped for checkpoint_io's). A crash mid-save leaves a directory without COMPLETE and "latest"
still naming the previous checkpoint, which therefore stays loadable.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

# Reading a checkpoint into one fp32 state dict lives in model_zoo (evals and release use it without training
# code); re-exported here for compatibility.
from medfm.model_zoo import checkpoint_io as layout
from medfm.model_zoo.checkpoint_io import TAG_RE, consolidate, model_state_dict  # noqa: F401
from medfm.pretrain import collectives


def git_commit() -> str:
    """Commit of the source tree (read-only ``git rev-parse``), or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def rng_state() -> dict:
    """Every RNG the step touches, JSON-safe."""
    np_state = np.random.get_state()
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def _barrier():
    collectives.barrier()


_write_json_atomic = layout.write_json_atomic


def _unshared(state: dict) -> dict:
    """CPU tensors safetensors can write: tied weights (a caption decoder's token embedding and LM head share one
    storage) are copied, since safetensors refuses shared storage; loading copies into both names alike."""
    seen, out = set(), {}
    for k, v in state.items():
        v = v.detach().contiguous().cpu()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


class CheckpointManager:
    def __init__(self, root, keep: int, rank: int, world_size: int, faults=None):
        self.root = Path(root)
        self.keep = keep
        self.rank, self.world_size = rank, world_size
        self.faults = faults  # medfm.pretrain.faults.FaultInjector (restart tests) or None

    # -- discovery -------------------------------------------------------------------------------------------
    def complete_tags(self) -> list[str]:
        """Complete checkpoints, oldest first."""
        return layout.complete_tags(self.root)

    def latest(self) -> str | None:
        return layout.latest(self.root)

    def resolve(self, spec: str) -> str:
        """``latest`` or a tag -> an existing complete tag (ValueError, one line, otherwise)."""
        return layout.resolve_tag(self.root, spec)

    # -- save ------------------------------------------------------------------------------------------------
    def save(self, engine, step: int, client: dict) -> str:
        """Collective: every rank writes its part, then rank 0 marks it complete, moves "latest", prunes."""
        tag = layout.tag_for(step)
        path = self.root / tag
        if self.rank == 0 and path.exists():  # a half-written leftover of a crashed run at this step
            shutil.rmtree(path)
        _barrier()
        path.mkdir(parents=True, exist_ok=True)
        if engine.strategy == "zero3":
            engine.ds.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        else:
            self._save_ddp(engine, path)
        if self.faults:
            self.faults.in_save(step)  # partitions written, client state and COMPLETE not yet
        client_file = layout.client_file(self.root, tag, self.rank)
        client_file.parent.mkdir(exist_ok=True)
        _write_json_atomic(client_file, client)
        _barrier()  # every rank has finished writing
        if self.rank == 0:
            layout.mark_complete(self.root, tag, self.world_size, step)
            for old in self.complete_tags()[: -self.keep]:
                shutil.rmtree(self.root / old, ignore_errors=True)
        _barrier()
        return tag

    def _save_ddp(self, engine, path: Path) -> None:
        from safetensors.torch import save_file

        if self.rank != 0:  # DDP replicas are identical
            return
        save_file(_unshared(engine.module.state_dict()), str(path / "model.safetensors"))
        opt = engine.optimizer.state_dict()
        tensors, meta = {}, {"param_groups": opt["param_groups"], "state": {}}
        for idx, st in opt["state"].items():
            meta["state"][str(idx)] = {}
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"{idx}.{k}"] = v.detach().contiguous().cpu()
                    meta["state"][str(idx)][k] = "tensor"
                else:
                    meta["state"][str(idx)][k] = v
        save_file(tensors, str(path / "optimizer.safetensors"))
        sched = {k: v for k, v in engine.scheduler.state_dict().items() if k != "lr_lambdas"}
        _write_json_atomic(path / "optimizer.json", {"optimizer": meta, "scheduler": sched})

    # -- load ------------------------------------------------------------------------------------------------
    def load(self, engine, tag: str) -> dict:
        path = self.root / tag
        done = layout.read_complete(self.root, tag)
        if engine.strategy == "zero3":
            if done["world_size"] != self.world_size:  # re-partitioned through a universal checkpoint
                from medfm.pretrain.reshard import load_other_world

                return load_other_world(engine, self.root, tag, done["world_size"], self.rank)
            # DeepSpeed's own engine unpickles (weights_only=False); every file goes through checkpoint_io instead
            engine.ds.checkpoint_engine = layout.weights_only_checkpoint_engine(engine.ds._config)
            with layout.weights_only_loads():  # torch.load calls outside the engine (stage-3 optimizer, universal)
                load_path, _ = engine.ds.load_checkpoint(str(self.root), tag=tag)
            if load_path is None:
                raise ValueError(f"checkpoint {path}: DeepSpeed found nothing to load")
        else:
            self._load_ddp(engine, path)
        return layout.read_client(self.root, tag, self.rank)

    def _load_ddp(self, engine, path: Path) -> None:
        from safetensors.torch import load_file

        engine.module.load_state_dict(load_file(str(path / "model.safetensors")))
        meta = json.loads((path / "optimizer.json").read_text())
        tensors = load_file(str(path / "optimizer.safetensors"))
        opt = {"param_groups": meta["optimizer"]["param_groups"], "state": {}}
        for idx, st in meta["optimizer"]["state"].items():
            opt["state"][int(idx)] = {k: (tensors[f"{idx}.{k}"] if v == "tensor" else v) for k, v in st.items()}
        engine.optimizer.load_state_dict(opt)
        engine.scheduler.load_state_dict({**engine.scheduler.state_dict(), **meta["scheduler"]})
