"""Fixtures for the pretrain tests: a learnable multimodal shard set and a tiny run config.

Samples belong to one of 4 classes; every modality carries the class (image/volume pattern, signal frequency, EHR
codes, the report text), so contrastive, MAE and captioning losses can all fall. Written with the real
medfm.shards writer and read by the real loader. Run as a script (under torchrun) it trains one RunConfig and
writes what it saw to JSON: ``python -m torch.distributed.run ... THIS_FILE SPEC.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from medfm.pretrain.world_env import env_outside_world
from medfm.shards.sample import Sample, make_meta
from medfm.shards.writer import DatasetWriter

MODS = ("image", "volume", "signal", "ehr", "text")
N_CLASSES = 4


def make_sample(i: int, modalities) -> Sample:
    rng = np.random.default_rng(i)
    k = i % N_CLASSES
    s = Sample(key=f"s{i}")
    extra = {}
    if "image" in modalities:
        yy, xx = np.mgrid[0:16, 0:16]
        img = 120 + 100 * np.sin((k + 1) * (xx + yy) / 4.0) + rng.normal(0, 10, (16, 16))
        s.image = np.clip(img, 0, 255).astype(np.uint8)[..., None]
        extra["image"] = {"photometric": "MONOCHROME2", "bits": 8, "shape": [16, 16, 1]}
    if "volume" in modalities:
        zz = np.arange(4)[:, None, None] * np.ones((4, 8, 8))
        vol = 400 * np.cos((k + 1) * zz / 2.0) + rng.normal(0, 50, (4, 8, 8))
        s.volume = vol.astype(np.int16)
        extra["volume"] = {"spacing": [2.0, 1.0, 1.0], "orientation": "RAS", "units": "HU", "shape": [4, 8, 8]}
    if "signal" in modalities:
        t = np.arange(32) / 32.0
        s.signal = np.stack([np.sin(2 * np.pi * (k + 1) * t), np.cos(2 * np.pi * (k + 1) * t)]).astype(np.float32)
        extra["signal"] = {"fs": 32.0, "leads": ["I", "II"], "units": ["mV", "mV"]}
    if "ehr" in modalities:
        ev = np.zeros((3, 4), dtype=np.float32)
        ev[:, 0] = [-2, -1, 0]
        ev[:, 1] = [2 + k, 6 + k, 2 + (k + 1) % N_CLASSES]
        ev[:, 3] = 0
        s.ehr = ev
        extra["ehr"] = {"vocab": "ehr"}
    if "text" in modalities:
        s.text = ["left effusion", "normal study", "cardiomegaly", "rib fracture"][k]
    s.meta = make_meta(patient_id=f"p{i}", study_id=f"st{i}", split="train", source={"format": "test"},
                       modalities=[m for m in MODS if m in modalities], labels={"cls": k}, **extra)
    return s


def make_shards(out_dir, n: int = 32, modalities=MODS, per_shard: int = 8, prefix: str = "ds",
                modality_of=None) -> str:
    """``n`` samples; ``modality_of(i)`` may give each sample its own modality subset (mixed datasets)."""
    with DatasetWriter(out_dir, prefix=prefix, max_samples=per_shard) as w:
        for i in range(n):
            w.add(make_sample(i, modality_of(i) if modality_of else modalities))
        w.close(vocabularies={"ehr": ["<pad>", "<unk>"] + [f"C{j}" for j in range(10)]})
    return str(out_dir)



def write_cls_suite(path: Path, shards: str, name: str, n_boot: int, protocols=("zeroshot", "retrieval")) -> Path:
    """An eval suite over :func:`make_shards` data (one split, train = test) at ``path``: the 4-class ``cls`` label
    by ``logistic`` probe and/or ``zeroshot`` (prompts = make_sample's captions by class, written beside it), and
    image-text ``retrieval`` (R@1, R@5), in the order ``protocols`` names them."""
    import yaml

    names = ["left effusion", "normal study", "cardiomegaly", "rib fracture"]  # make_sample's captions by class
    prompts = path.with_name(f"{path.stem}_prompts.yaml")
    prompts.write_text(yaml.safe_dump({"templates": ["{}"], "classes": {f"c{k}": [t] for k, t in enumerate(names)}}))
    data = {"dir": str(shards), "train": "train", "val": None, "test": "train"}  # the fixture has one split
    cls = {"data": data, "modality": "image", "kind": "multiclass", "label": "cls",
           "classes": [f"c{k}" for k in range(4)]}
    tasks = {"logistic": {"name": "cls_probe", **cls, "protocol": "logistic"},
             "zeroshot": {"name": "cls_zeroshot", **cls, "protocol": "zeroshot", "prompts": str(prompts)},
             "retrieval": {"name": "pairs_retrieval", "data": data, "modality": "image", "protocol": "retrieval",
                           "options": {"ks": [1, 5]}}}
    path.write_text(yaml.safe_dump({"name": name, "n_boot": n_boot, "seed": 0,
                                    "tasks": [tasks[p] for p in protocols]}))
    return path

def tower_specs(modalities) -> dict:
    tiny = {"width": 32, "depth": 1, "num_heads": 2}
    specs = {
        "image": {"arch": "vit2d_tiny_p16", "overrides": {"img_size": 16, "patch_size": 4, "in_chans": 1, **tiny}},
        "volume": {"arch": "vit3d_tiny", "overrides": {"img_size": [4, 8, 8], "patch_size": [2, 4, 4], **tiny}},
        "signal": {"arch": "signal_tiny", "overrides": {"n_leads": 2, "patch_size": 8, "max_len": 32, **tiny}},
        "ehr": {"arch": "ehr_tiny", "overrides": {"vocab_size": 12, "time_features": 8, **tiny}},
        "text": {"arch": "text_bert_tiny", "overrides": {"vocab_size": 259, "width": 32, "depth": 1,
                                                          "num_heads": 2, "intermediate_size": 64,
                                                          "max_position_embeddings": 64, "tokenizer": None}},
    }
    return {m: specs[m] for m in modalities}


def run_config(run_dir, shards: str | list, objectives, modalities=MODS, batch: int = 4, steps: int = 4,
               **sections) -> dict:
    """A tiny RunConfig dict (CPU seconds per step)."""
    sources = [{"path": p} for p in ([shards] if isinstance(shards, str) else shards)]
    mae = [m for m in ("image", "volume", "signal") if any(o["name"] == f"mae:{m}" for o in objectives)]
    cfg = {
        "name": "test",
        "run_dir": str(run_dir),
        "data": {"sources": sources, "batch_size": batch, "num_workers": 0, "mode": "resampled", "seed": 0,
                 "collate": {"image_size": [16, 16], "image_channels": 1, "volume_size": [4, 8, 8],
                             "signal_length": 32, "signal_leads": 2, "ehr_max_events": 4, "text_max_tokens": 16}},
        "model": {"towers": tower_specs(modalities), "embed_dim": 16, "mae": mae,
                  "mae_decoder": {"width": 16, "depth": 1, "num_heads": 2},
                  "caption": {"enabled": any(o["name"].startswith("caption:") for o in objectives),
                              "width": 16, "depth": 1, "num_heads": 2, "max_len": 16}},
        "objectives": objectives,
        "optim": {"lr": 3e-3, "weight_decay": 0.0, "warmup_steps": 0, "min_lr_ratio": 1.0},
        "train": {"steps": steps, "tokenizer": "bytes", "peak_tflops": 1.0, "progress": False, "nan_guard": 3},
        "zero": {"stage3_param_persistence_threshold": 0},
        "checkpoint": {"every": 0, "keep": 2, "final": False},
        "tracking": {"enabled": False},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value) if isinstance(value, dict) else cfg.__setitem__(key, value)
    return cfg


def demo_like_config(root, run_dir, steps: int = 12, every: int = 3) -> dict:
    """The demo's multimodal recipe (medfm.demo.recipes: three sources, round-robin groups, every objective, ZeRO-3,
    a DataLoader worker, measured MFU peak, text dropout), shrunk to CPU seconds. Shards are written under ``root``
    once and reused."""
    root = Path(root)
    pairs = {"image_text": ("image", "text"), "volume_text": ("volume", "text"), "signal_text": ("signal", "text")}
    sources = []
    for name, mods in pairs.items():
        if not (root / name / "manifest.json").is_file():
            make_shards(root / name, n=12, modalities=mods, per_shard=4, prefix=name.split("_")[0])
        sources.append({"path": str(root / name), "group": name, "name": name})
    objectives = [{"name": "mae:image"}, {"name": "mae:volume"}, {"name": "mae:signal", "mask_ratio": 0.5},
                  {"name": "contrastive:image-text"}, {"name": "contrastive:volume-text"},
                  {"name": "contrastive:signal-text"}, {"name": "caption:image", "weight": 0.5},
                  {"name": "caption:volume", "weight": 0.5}]
    cfg = run_config(run_dir, [s["path"] for s in sources], objectives, MODS[:3] + ("text",), batch=2, steps=steps,
                     train={"peak_tflops": 0.0, "log_every": 1},
                     optim={"lr": 2e-3, "weight_decay": 0.05, "warmup_steps": 3, "min_lr_ratio": 0.1},
                     checkpoint={"every": every, "keep": 10, "final": True})
    groups = [{"name": g, "modalities": list(m), "objectives": [o["name"] for o in objectives
                                                                 if set(_objective_modalities(o["name"])) <= set(m)]}
              for g, m in pairs.items()]
    cfg["data"].update({"sources": sources, "num_workers": 1, "plan": {"policy": "round_robin", "groups": groups}})
    cfg["model"]["caption"]["context"] = ["image", "volume"]
    cfg["model"]["towers"]["text"]["overrides"]["hidden_dropout"] = 0.1
    return cfg


def launch_with_kills(cfg: dict, workdir, kills: list[tuple[int, int]], timeout: int = 900):
    """``medfm launch --nproc-per-node 2 --max-restarts len(kills)`` of ``cfg`` where attempt i SIGKILLs rank
    ``kills[i][1]`` right after step ``kills[i][0]`` (steps increasing, so every attempt reaches its kill).
    Returns the CompletedProcess (stdout+stderr in ``.stdout``)."""
    import subprocess

    import yaml

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{Path(cfg['run_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    faults = ",".join(f"kill-at-step:{s}:{r}:{i}" for i, (s, r) in enumerate(kills))
    env = {**env_outside_world(), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MEDFM_FAULT", None)
    if faults:
        env["MEDFM_FAULT"] = faults
    cmd = [sys.executable, "-m", "medfm.launch.cli", "launch", str(path), "--nproc-per-node", "2",
           "--max-restarts", str(len(kills))]
    return subprocess.run(cmd, env=env, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def final_weights(run_dir) -> dict:
    """The consolidated fp32 model weights of a run's latest checkpoint."""
    from medfm.pretrain.checkpoint import consolidate, model_state_dict

    return model_state_dict(consolidate(Path(run_dir) / "checkpoints"))


def _objective_modalities(name: str) -> list[str]:
    kind, arg = name.split(":")
    return arg.split("-") + (["text"] if kind == "caption" else [])


def _worker(spec_path: str) -> None:
    """torchrun entry: train the spec's config (optionally in several phases) and report per rank."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    import torch.distributed as dist

    from medfm.pretrain.config import RunConfig
    from medfm.pretrain.train import run
    from medfm.schema import from_dict

    spec = json.loads(Path(spec_path).read_text())
    report = {"phases": []}
    for phase in spec["phases"]:
        cfg = from_dict(RunConfig, phase["config"])
        res = run(cfg)
        info = {"status": res.status, "step": res.step, "losses": res.losses, "skipped": res.skipped,
                "message": res.message}
        if phase.get("inspect"):
            info.update(_inspect(cfg))
        if phase.get("compare_init"):
            info.update(_compare_init(cfg))
        report["phases"].append(info)
    rank = dist.get_rank()
    Path(spec["out"]).with_suffix(f".rank{rank}.json").write_text(json.dumps(report))


def _inspect(cfg) -> dict:
    """Partitioning and consolidation facts of the engine the last phase built (fresh engine, same config)."""
    import torch
    import torch.distributed as dist

    from medfm.pretrain.checkpoint import CheckpointManager, consolidate
    from medfm.pretrain.engine import Engine

    cfg.checkpoint.resume = "latest"
    engine = Engine(cfg, dist.get_rank(), dist.get_world_size())
    mgr = CheckpointManager(Path(cfg.run_dir) / "checkpoints", cfg.checkpoint.keep, dist.get_rank(),
                            dist.get_world_size())
    tag = mgr.resolve("latest")
    mgr.load(engine, tag)
    live = engine.gathered_state_dict()
    out = {"local_bytes": engine.local_param_bytes(), "full_bytes": engine.full_param_bytes()}
    if dist.get_rank() == 0:
        merged = consolidate(Path(cfg.run_dir) / "checkpoints", tag)
        missing = sorted(set(live) - set(merged))
        diff = max(float((live[k] - merged[k]).abs().max()) for k in live if k in merged)
        out.update({"consolidated_missing": missing, "consolidated_max_diff": diff,
                    "n_params": len(live), "finite": all(bool(torch.isfinite(v).all()) for v in live.values())})
    return out


def _compare_init(cfg) -> dict:
    """Initial weights built under deepspeed.zero.Init vs an ordinary build (then partitioned), same seed."""
    import copy

    import torch.distributed as dist

    from medfm.pretrain.engine import Engine

    built = {}
    for zero_init in (True, False):
        c = copy.deepcopy(cfg)
        c.zero.zero_init = zero_init
        engine = Engine(c, dist.get_rank(), dist.get_world_size())
        built[zero_init] = (engine.gathered_state_dict(), engine.local_param_bytes() / engine.full_param_bytes())
    (a, ratio), (b, _) = built[True], built[False]
    return {"init_keys_differ": sorted(set(a) ^ set(b)), "zero_init_local_ratio": ratio,
            "init_max_diff": max(float((a[k] - b[k]).abs().max()) for k in a if k in b),
            "init_std": {k: [float(a[k].std()), float(b[k].std())] for k in a if k in b and a[k].numel() > 1}}


if __name__ == "__main__":
    _worker(sys.argv[1])
