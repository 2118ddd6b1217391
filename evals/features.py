"""Frozen features for evaluation: load a model from any of its three forms, extract per-sample features of one
split (distributed with HF accelerate), and cache them on disk.

Model sources (all give identical weights, hence identical features and the same cache key):
  * a ZeRO-3 (or DDP) checkpoint: the ``checkpoints`` root (uses ``latest``) or one ``stepN`` directory; partitions
    are merged by medfm.model_zoo.checkpoint_io.consolidate and the model config comes from the saved client state;
  * a consolidated state dict: ``*.safetensors`` with the model config in its metadata (``medfm_model_config``) or
    in a ``config.json`` beside it;
  * a model_zoo release directory (``model.safetensors`` + ``config.json``) or zoo name, via medfm.model_zoo.load.

The cache key is sha256(weights hash, data manifest hash, split, modality, collate options): the weights hash is
computed from the tensors themselves, so the three forms of one model share cached features.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfm.evals.data import SplitIndex, read_samples
from medfm.evals.protocols.base import ProtocolError
from medfm.schema.atomic import atomic_path


class ModelSourceError(ValueError):
    """The path is not a checkpoint / state dict / release we can load, or its weights do not fit its config."""


# ---------------------------------------------------------------------------------------------------- loading
def weights_hash(model) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor of the state dict, in name order."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _strip_prefix(sd: dict) -> dict:
    """Accept a PretrainModule state dict (``model.`` keys plus objective parameters) as well as a bare model's."""
    from medfm.model_zoo.checkpoint_io import has_model_prefix, model_state_dict

    return model_state_dict(sd) if has_model_prefix(sd) else sd


def _build_and_fill(model_cfg: dict, sd: dict, where: str):
    from medfm.model_zoo import build_multimodal
    from medfm.schema import ConfigError

    try:
        model = build_multimodal(model_cfg)
    except ConfigError as exc:
        raise ModelSourceError(f"{where}: model config is invalid ({exc})") from None
    sd = _strip_prefix(sd)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # shape mismatches: name the first one
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc).splitlines()[0])
        raise ModelSourceError(f"{where}: weights do not match the model config ({first})") from None
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ModelSourceError(f"{where}: weights do not match the model config ({len(missing)} missing, "
                               f"{len(unexpected)} unexpected keys; {what})")
    return model


def _load_checkpoint(path: Path):
    from medfm.model_zoo.checkpoint_io import find_checkpoint, read_checkpoint

    try:
        weights, client, tag = read_checkpoint(path)
    except (ValueError, FileNotFoundError) as exc:
        raise ModelSourceError(f"{path}: cannot consolidate checkpoint ({exc})") from None
    cfg = client.get("config", {}).get("model")
    if not cfg:
        raise ModelSourceError(f"{path} ({tag}): client state has no config.model")
    model = _build_and_fill(cfg, weights, str(find_checkpoint(path)[0] / tag))
    if "text" in model.towers:  # the same decision pretrain's build_data made, from the saved run config
        from medfm.model_zoo.tokenizers import TokenizerError, spec_from_run_config

        try:
            model.text_tokenizer_spec = spec_from_run_config(model.towers["text"], client.get("config", {}))
        except TokenizerError as exc:
            raise ModelSourceError(f"{path} ({tag}): the text tower's tokenizer cannot be reconstructed ({exc})") \
                from None
    return model


def _load_state_dict_file(path: Path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    cfg = json.loads(meta["medfm_model_config"]) if "medfm_model_config" in meta else None
    side = path.parent / "config.json"
    if cfg is None and side.is_file():
        cfg = json.loads(side.read_text())
        cfg = cfg.get("model", cfg)  # a release-style config.json nests the model config under "model"
    if cfg is None:
        raise ModelSourceError(f"{path}: no model config (expected safetensors metadata 'medfm_model_config' or "
                               f"{side})")
    sd = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    return _build_and_fill(cfg, sd, str(path))


def load_model(source) -> tuple[object, str, str]:
    """(model in eval mode, weights hash, kind) from a checkpoint dir, a state-dict file or a release/zoo name."""
    from medfm.model_zoo.checkpoint_io import is_checkpoint

    path = Path(str(source))
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelSourceError(f"{path}: a state dict must be .safetensors (pickled weights are never loaded)")
        model, kind = _load_state_dict_file(path), "state_dict"
    elif is_checkpoint(path):
        model, kind = _load_checkpoint(path), "checkpoint"
    else:
        try:
            from medfm.model_zoo import load
        except ImportError as exc:
            raise ModelSourceError(f"{source}: not a checkpoint or state dict, and model_zoo release loading is "
                                   f"unavailable ({exc})") from None
        try:
            model = load(str(source))
        except (FileNotFoundError, KeyError, ValueError) as exc:
            raise ModelSourceError(f"{source}: not a checkpoint, state dict or release ({exc})") from None
        model, kind = (model[0] if isinstance(model, tuple) else model), "release"
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, weights_hash(model), kind


# ---------------------------------------------------------------------------------------------------- extraction
@dataclass
class ExtractOptions:
    batch_size: int = 32
    collate: dict | None = None  # medfm.shards.collate.CollateConfig fields; None = sized from the tower config
    cache_dir: str | None = None
    text_tokenizer: str = "auto"  # tower | bytes | auto (see text_tokenizer_spec)


@dataclass
class SplitFeatures:
    """Per-sample outputs in table order: ``pooled`` [n, width] tower features and ``embed`` [n, D] joint-space
    embeddings (L2-normalised), for the samples at ``positions`` of the split table."""

    pooled: np.ndarray
    embed: np.ndarray
    positions: np.ndarray
    keys: list[str]


def _collate_config(model, modality: str, overrides: dict | None):
    from medfm.model_zoo.input_sizes import derived_collate
    from medfm.schema import from_dict
    from medfm.shards.collate import CollateConfig

    tcfg = getattr(model.towers[modality], "cfg", None)  # the tower fixes its input; unset collate fields follow
    return from_dict(CollateConfig, derived_collate({modality: tcfg}, overrides), "collate")


class SplitDataset:
    """Map-style dataset of table positions; decoding happens in the DataLoader (per process)."""

    def __init__(self, index: SplitIndex, positions: np.ndarray):
        self.index, self.positions = index, positions
        self._reader = None

    def __len__(self):
        return len(self.positions)

    def read(self, index: SplitIndex, position) -> dict:
        """One decoded sample; the ShardReader is opened lazily, once per DataLoader worker process."""
        from medfm.shards.stream import ShardReader

        if self._reader is None:
            self._reader = ShardReader()
        return read_samples(index, [int(position)], self._reader)[0]

    def __getitem__(self, i):
        return int(self.positions[i]), self.read(self.index, self.positions[i])


def cache_key(weights: str, index: SplitIndex, modality: str, collate_cfg, positions: np.ndarray,
              tokenizer: str = "") -> str:
    from medfm.schema import to_dict

    blob = json.dumps({"weights": weights, "manifest": index.manifest_hash, "split": index.split,
                       "modality": modality, "collate": to_dict(collate_cfg),
                       "positions": hashlib.sha256(np.asarray(positions, np.int64).tobytes()).hexdigest(),
                       "tokenizer": tokenizer, "version": 2}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _load_cached(path: Path) -> SplitFeatures | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata() or {}
        return SplitFeatures(f.get_tensor("pooled"), f.get_tensor("embed"), f.get_tensor("positions"),
                             json.loads(meta.get("keys", "[]")))


def _save_cached(path: Path, feats: SplitFeatures, info: dict) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # a crash mid-write never leaves a truncated cache entry under the real name
        save_file({"pooled": np.ascontiguousarray(feats.pooled), "embed": np.ascontiguousarray(feats.embed),
                   "positions": np.ascontiguousarray(feats.positions)}, str(tmp),
                  metadata={"keys": json.dumps(feats.keys), **{k: str(v) for k, v in info.items()}})


def get_accelerator():
    """One Accelerator per process: gloo on CPU (NCCL would need GPUs), the launcher's world if any."""
    from accelerate import Accelerator, InitProcessGroupKwargs

    from medfm.evals.devices import default_device

    cpu = default_device().type == "cpu"
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun / accelerate launch set it
    # The gloo handler only for a launched world: given alone it makes accelerate expect a process group.
    kwargs = [InitProcessGroupKwargs(backend="gloo")] if cpu and launched else []
    return Accelerator(cpu=cpu, kwargs_handlers=kwargs)


def extract(model, model_hash: str, index: SplitIndex, modality: str, positions=None,
            opts: ExtractOptions | None = None, accelerator=None) -> SplitFeatures:
    """Features of ``positions`` (default: all) of the split, computed across the processes of ``accelerator``.

    Every process gets the full result. Samples are sharded across processes by accelerate; ``gather_for_metrics``
    drops the padding duplicates of the last batch, and the positions gathered alongside are checked so that each
    sample counts exactly once.
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from medfm.evals.devices import place
    from medfm.shards.collate import collate
    from medfm.shards.plan import StepPlan

    opts = opts or ExtractOptions()
    if modality not in model.towers:
        raise ProtocolError(f"model has no {modality!r} tower (has {list(model.towers)})")
    positions = np.arange(len(index)) if positions is None else np.asarray(positions, dtype=np.int64)
    ccfg = _collate_config(model, modality, opts.collate)
    tok_spec = text_tokenizer_spec(model, opts.text_tokenizer) if modality == "text" else None
    tok_key = json.dumps({k: v for k, v in tok_spec.items() if k != "dir"}, sort_keys=True) if tok_spec else ""
    key = cache_key(model_hash, index, modality, ccfg, positions, tok_key)
    cache_path = Path(opts.cache_dir) / f"{key}.safetensors" if opts.cache_dir else None
    if cache_path is not None and (hit := _load_cached(cache_path)) is not None:
        return hit
    accelerator = accelerator or get_accelerator()
    tokenizer = text_tokenizer(model, opts.text_tokenizer) if modality == "text" else None
    plan = StepPlan(0, (modality,), (), "eval")

    def collate_fn(items):
        batch = collate([s for _, s in items], plan, ccfg, tokenizer)
        # Tensors only: accelerate moves and gathers them; keys/meta stay in the split table on every process.
        out = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        out["positions"] = torch.tensor([p for p, _ in items], dtype=torch.long)
        return out

    loader = DataLoader(SplitDataset(index, positions), batch_size=opts.batch_size, shuffle=False,
                        collate_fn=collate_fn)
    loader = accelerator.prepare_data_loader(loader, device_placement=True)
    model = place(model, accelerator)
    pooled, embed, pos = [], [], []
    with torch.no_grad():
        for batch in tqdm(loader, desc=f"features {modality}/{index.split}", disable=not accelerator.is_main_process,
                          leave=False):
            _, feat = model.encode(modality, batch)
            emb = torch.nn.functional.normalize(model.heads[modality](feat), dim=-1)
            got = accelerator.gather_for_metrics({"pooled": feat.float().contiguous(), "embed": emb.float(),
                                                  "positions": batch["positions"]})
            pooled.append(got["pooled"].cpu().numpy())
            embed.append(got["embed"].cpu().numpy())
            pos.append(got["positions"].cpu().numpy())
    pos_all = np.concatenate(pos)
    if len(pos_all) != len(positions) or not np.array_equal(np.sort(pos_all), np.sort(positions)):
        raise RuntimeError(f"feature extraction gathered {len(pos_all)} rows for {len(positions)} samples "
                           f"({len(set(pos_all.tolist()))} distinct): a sample was lost or counted twice")
    order = np.argsort(pos_all, kind="stable")
    feats = SplitFeatures(np.concatenate(pooled)[order], np.concatenate(embed)[order], pos_all[order],
                          [index.keys[p] for p in pos_all[order]])
    if cache_path is not None and accelerator.is_main_process:
        _save_cached(cache_path, feats, {"weights": model_hash, "manifest": index.manifest_hash, "split": index.split,
                                         "modality": modality})
    accelerator.wait_for_everyone()
    return feats


def text_tokenizer_spec(model, kind: str = "auto") -> dict:
    """The tokenizer spec (medfm.model_zoo.tokenizers) text is encoded with for this model.

    A release and a checkpoint record the one training used (``model.text_tokenizer_spec``); ``kind`` (the suite's
    ``text_tokenizer``: auto | tower | bytes) must then agree with it. Only a bare state dict carries none: there
    ``auto`` means the tower's Hugging Face tokenizer when it has one configured, else bytes.
    """
    from medfm.model_zoo.tokenizers import TokenizerError, tokenizer_spec

    if kind not in ("auto", "tower", "bytes"):
        raise ProtocolError(f"text_tokenizer must be auto, tower or bytes, got {kind!r}")
    if "text" not in model.towers:
        raise ProtocolError(f"text needs a text tower (model has {list(model.towers)})")
    recorded = getattr(model, "text_tokenizer_spec", None)
    if recorded is not None:
        trained = "bytes" if recorded["kind"] == "bytes" else "tower"
        if kind not in ("auto", trained):
            raise ProtocolError(f"text_tokenizer: {kind}, but the model was trained with train.tokenizer={trained}")
        return recorded
    tower = model.towers["text"]
    if kind == "auto":
        kind = "tower" if tower.cfg.tokenizer or tower.cfg.path else "bytes"
    try:
        return tokenizer_spec(tower, kind, int(tower.cfg.max_length))
    except TokenizerError as exc:
        raise ProtocolError(str(exc)) from None


def text_tokenizer_kind(model, kind: str = "auto") -> str:
    """``tower`` (a Hugging Face tokenizer) or ``bytes`` (medfm.shards.collate.ByteTokenizer): see text_tokenizer_spec.
    A model without a text tower (a caption decoder alone) has nothing recorded: auto = bytes."""
    if "text" not in model.towers and kind in ("auto", "tower", "bytes"):
        return "tower" if kind == "tower" else "bytes"
    return "bytes" if text_tokenizer_spec(model, kind)["kind"] == "bytes" else "tower"


def text_tokenizer(model, kind: str = "auto"):
    """list[str] -> (ids long [B, T], valid bool [B, T]), exactly as the loader tokenised text in pretraining."""
    from medfm.model_zoo.tokenizers import TokenizerError, build_tokenizer

    try:
        return build_tokenizer(text_tokenizer_spec(model, kind))
    except TokenizerError as exc:
        raise ProtocolError(str(exc)) from None


def text_encoder(model, batch_size: int = 64, tokenizer: str = "auto"):
    """prompts -> [n, D] joint-space embeddings, for zero-shot classifiers (on whatever device the model is)."""
    import torch

    from medfm.evals.devices import to_model_device

    if "text" not in model.towers:
        raise ProtocolError(f"zero-shot needs a text tower (model has {list(model.towers)})")
    tok = text_tokenizer(model, tokenizer)

    def encode(prompts):
        out = []
        with torch.no_grad():
            for s in range(0, len(prompts), batch_size):
                ids, valid = tok(list(prompts[s:s + batch_size]))
                batch = to_model_device(model, {"text_ids": ids, "text_valid": valid})
                out.append(model.embed("text", batch).float().cpu().numpy())
        return np.concatenate(out)

    return encode
