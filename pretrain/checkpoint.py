"""Checkpoints: save every N steps, keep K, move "latest" only after every rank finished, resume exactly,
and consolidate ZeRO-3 partitions to one fp32 state dict.

Layout of ``<run_dir>/checkpoints``::

    step15/                  DeepSpeed ZeRO-3 files (per-rank partitions)  |  ddp: model/optimizer .safetensors
    step15/client/rank0.json step, samples seen, loader state, RNG states, resolved config, manifest hashes, commit
    step15/COMPLETE          written by rank 0 after the barrier that follows every rank's write
    latest                   the tag of the newest COMPLETE checkpoint (atomic rename)

Our own client state is JSON (never pickle). A crash mid-save leaves a directory without COMPLETE and "latest"
still naming the previous checkpoint, which therefore stays loadable.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

# Reading a checkpoint into one fp32 state dict lives in model_zoo (evals and release use it without training
# code); re-exported here for compatibility.
from medfm.model_zoo.checkpoint_io import consolidate, model_state_dict  # noqa: F401
from medfm.pretrain import collectives

TAG_RE = re.compile(r"^step(\d+)$")


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


def _write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


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
        if not self.root.is_dir():
            return []
        tags = [p.name for p in self.root.iterdir() if TAG_RE.match(p.name) and (p / "COMPLETE").is_file()]
        return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))

    def latest(self) -> str | None:
        f = self.root / "latest"
        if not f.is_file():
            return None
        tag = f.read_text().strip()
        return tag if (self.root / tag / "COMPLETE").is_file() else None

    def resolve(self, spec: str) -> str:
        """``latest`` or a tag -> an existing complete tag (ValueError, one line, otherwise)."""
        if spec == "latest":
            tag = self.latest()
            if tag is None:
                raise ValueError(f"checkpoint.resume=latest: no complete checkpoint under {self.root}")
            return tag
        if not (self.root / spec / "COMPLETE").is_file():
            have = self.complete_tags()
            raise ValueError(f"checkpoint.resume={spec}: no complete checkpoint {self.root / spec} (have {have})")
        return spec

    # -- save ------------------------------------------------------------------------------------------------
    def save(self, engine, step: int, client: dict) -> str:
        """Collective: every rank writes its part, then rank 0 marks it complete, moves "latest", prunes."""
        tag = f"step{step}"
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
        (path / "client").mkdir(exist_ok=True)
        _write_json_atomic(path / "client" / f"rank{self.rank}.json", client)
        _barrier()  # every rank has finished writing
        if self.rank == 0:
            _write_json_atomic(path / "COMPLETE", {"world_size": self.world_size, "step": step})
            tmp = self.root / "latest.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.root / "latest")
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
        done = json.loads((path / "COMPLETE").read_text())
        if engine.strategy == "zero3":
            if done["world_size"] != self.world_size:
                raise ValueError(f"checkpoint {path}: ZeRO-3 partitions of world size {done['world_size']} cannot "
                                 f"resume in world size {self.world_size}; consolidate it first")
            load_path, _ = engine.ds.load_checkpoint(str(self.root), tag=tag)
            if load_path is None:
                raise ValueError(f"checkpoint {path}: DeepSpeed found nothing to load")
        else:
            self._load_ddp(engine, path)
        client_file = path / "client" / f"rank{self.rank}.json"
        if not client_file.is_file():
            raise ValueError(f"checkpoint {path}: no client state for rank {self.rank} (saved with world size "
                             f"{done['world_size']}, now {self.world_size})")
        return json.loads(client_file.read_text())

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
