"""Samples -> one batch dict in the format of docs/INTERFACES.md ("Loader batch").

Every modality of the step plan gets its keys even when no sample in the batch has it (zeros plus
``<m>_present=False``): under ZeRO-3 the tower still runs on a masked dummy on that rank, so all ranks gather the
same parameters. Images and volumes are stacked at fixed shapes (``image_size`` / ``volume_size``; without them, the
largest in the batch, padded); signals, EHR event sequences and tokenised text are padded with boolean masks.
Preprocessing (spacing, windowing choice, sampling rate) was applied at shard time; here only dtype scaling happens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from medfm.shards.plan import StepPlan
from medfm.shards.sample import Sample

Tokenizer = Callable[[list[str]], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass
class CollateConfig:
    image_size: list[int] | None = None      # [H, W]; None = largest in the batch (zero padded)
    image_channels: int | None = None        # 1 or 3; None = most in the batch (grey repeated to RGB)
    image_mean: float = 0.5                  # per-dataset normalisation after scaling to [0, 1]
    image_std: float = 0.25
    volume_size: list[int] | None = None     # [D, H, W]; None = largest in the batch
    hu_window: list[float] = field(default_factory=lambda: [-1000.0, 1000.0])  # HU window of every volume (shards store HU, not windows)
    signal_length: int | None = None         # crop/pad samples; None = longest in the batch
    signal_leads: int | None = None          # None = most leads in the batch
    ehr_max_events: int = 256                # most recent events kept
    text_max_tokens: int = 128

    def validate(self):
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise ValueError(f"collate.image_size must be [H, W] >= 1, got {self.image_size}")
        if self.volume_size is not None and (len(self.volume_size) != 3 or min(self.volume_size) < 1):
            raise ValueError(f"collate.volume_size must be [D, H, W] >= 1, got {self.volume_size}")
        if self.image_channels not in (None, 1, 3):
            raise ValueError(f"collate.image_channels must be 1 or 3, got {self.image_channels}")
        if len(self.hu_window) != 2 or not self.hu_window[0] < self.hu_window[1]:
            raise ValueError(f"collate.hu_window must be [low, high] with low < high, got {self.hu_window}")
        if self.image_std <= 0:
            raise ValueError(f"collate.image_std must be > 0, got {self.image_std}")
        for name in ("signal_length", "signal_leads"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"collate.{name} must be >= 1, got {v}")
        if self.ehr_max_events < 1 or self.text_max_tokens < 2:
            raise ValueError("collate.ehr_max_events must be >= 1 and collate.text_max_tokens >= 2")


# ---------------------------------------------------------------------------------------------------------------
# tokenizers (callables: list[str] -> (ids long [B, T], valid bool [B, T]))


class ByteTokenizer:
    """UTF-8 bytes as tokens (0 pad, 1 bos, 2 eos, byte b -> b + 3): a dependency-free default for tests/demos."""

    vocab_size = 259

    def __init__(self, max_tokens: int = 128):
        self.max_tokens = max_tokens

    def __call__(self, texts: list[str]):
        rows = [[1] + [b + 3 for b in t.encode("utf-8")][: self.max_tokens - 2] + [2] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, ids != 0


class HFTokenizer:
    """Adapter for a Hugging Face tokenizer (picklable, so it travels to DataLoader workers)."""

    def __init__(self, tokenizer, max_tokens: int = 128):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens

    def __call__(self, texts: list[str]):
        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_tokens,
                             return_tensors="pt")
        return enc["input_ids"].long(), enc["attention_mask"].bool()


# ---------------------------------------------------------------------------------------------------------------
# per-modality tensors


def fit(arr: np.ndarray, size: Sequence[int], axes: Sequence[int], starts: Sequence[int] | None = None) -> np.ndarray:
    """Crop (at ``starts``, default centre) and zero-pad ``arr`` along ``axes`` to ``size``."""
    out = arr
    for i, (ax, n) in enumerate(zip(axes, size)):
        cur = out.shape[ax]
        if cur > n:
            s = (cur - n) // 2 if starts is None else starts[i]
            out = np.take(out, np.arange(s, s + n), axis=ax)
        elif cur < n:
            pad = [(0, 0)] * out.ndim
            pad[ax] = (0, n - cur)
            out = np.pad(out, pad)
    return out


def image_to_float(img: np.ndarray, channels: int) -> np.ndarray:
    """H x W x C uint8/uint16 -> C x H x W float32 in [0, 1] with ``channels`` channels."""
    scale = 255.0 if img.dtype == np.uint8 else 65535.0
    x = img.astype(np.float32) / scale
    if x.shape[2] != channels:
        x = np.repeat(x, channels, axis=2) if x.shape[2] == 1 else x.mean(axis=2, keepdims=True)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def volume_to_float(vol: np.ndarray, meta: dict, cfg: CollateConfig) -> np.ndarray:
    units = (meta.get("volume") or {}).get("units", "HU")
    if units == "HU":
        lo, hi = cfg.hu_window  # shards store clipped HU (meta.preprocessing.volume.clip_hu), no per-sample window
        return np.clip((vol.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)
    return vol.astype(np.float32)


def _present(samples, m) -> torch.Tensor:
    return torch.tensor([getattr(s, m) is not None for s in samples], dtype=torch.bool)


def _stack_images(samples: list[Sample], cfg: CollateConfig) -> torch.Tensor:
    imgs = [s.image for s in samples if s.image is not None]
    channels = cfg.image_channels or max((im.shape[2] for im in imgs), default=3)
    if cfg.image_size is not None:
        h, w = cfg.image_size
    else:
        h = max((im.shape[0] for im in imgs), default=32)
        w = max((im.shape[1] for im in imgs), default=32)
    out = np.zeros((len(samples), channels, h, w), dtype=np.float32)
    for i, s in enumerate(samples):
        if s.image is not None:
            out[i] = fit(image_to_float(s.image, channels), (h, w), (1, 2))
    t = torch.from_numpy(out)
    present = _present(samples, "image").view(-1, 1, 1, 1)
    # Normalise real images only; absent ones stay exactly 0 (an obvious dummy, and masked anyway).
    return torch.where(present, (t - cfg.image_mean) / cfg.image_std, t)


def _stack_volumes(samples: list[Sample], cfg: CollateConfig) -> torch.Tensor:
    vols = [s.volume for s in samples if s.volume is not None]
    if cfg.volume_size is not None:
        size = tuple(cfg.volume_size)
    else:
        size = tuple(max((v.shape[a] for v in vols), default=d) for a, d in zip(range(3), (16, 32, 32)))
    out = np.zeros((len(samples), 1, *size), dtype=np.float32)
    for i, s in enumerate(samples):
        if s.volume is not None:
            out[i, 0] = fit(volume_to_float(s.volume, s.meta, cfg), size, (0, 1, 2))
    return torch.from_numpy(out)


def _stack_signals(samples: list[Sample], cfg: CollateConfig) -> dict[str, torch.Tensor]:
    sigs = [s.signal for s in samples if s.signal is not None]
    n_leads = cfg.signal_leads or max((x.shape[0] for x in sigs), default=1)
    length = cfg.signal_length or max((x.shape[1] for x in sigs), default=1)
    out = np.zeros((len(samples), n_leads, length), dtype=np.float32)
    valid = np.zeros((len(samples), length), dtype=bool)
    leads = np.zeros((len(samples), n_leads), dtype=bool)
    for i, s in enumerate(samples):
        if s.signal is None:
            continue
        x = s.signal[:n_leads, :length].astype(np.float32)
        out[i, : x.shape[0], : x.shape[1]] = x
        valid[i, : x.shape[1]] = True
        lead_ok = (s.meta.get("signal") or {}).get("lead_mask")  # set by lead-dropout augmentation
        leads[i, : x.shape[0]] = True if lead_ok is None else np.asarray(lead_ok[: x.shape[0]], dtype=bool)
    return {"signal": torch.from_numpy(out), "signal_valid": torch.from_numpy(valid),
            "signal_leads": torch.from_numpy(leads)}


def _stack_ehr(samples: list[Sample], cfg: CollateConfig) -> dict[str, torch.Tensor]:
    seqs = [s.ehr[-cfg.ehr_max_events:] if s.ehr is not None else None for s in samples]
    n = max((len(e) for e in seqs if e is not None), default=1) or 1
    arr = np.zeros((len(samples), n, 4), dtype=np.float32)
    valid = np.zeros((len(samples), n), dtype=bool)
    for i, e in enumerate(seqs):
        if e is not None and len(e):
            arr[i, : len(e)] = e
            valid[i, : len(e)] = True
    t = torch.from_numpy(arr)
    return {"ehr_codes": t[..., 1].round().long(), "ehr_times": t[..., 0].contiguous(),
            "ehr_values": t[..., 2].contiguous(), "ehr_has_value": t[..., 3] > 0.5,
            "ehr_valid": torch.from_numpy(valid)}


def _labels(samples: list[Sample]) -> dict[str, torch.Tensor]:
    """Numeric labels as float tensors, NaN where a sample has no such label (non-numeric ones stay in meta)."""
    names: list[str] = []
    for s in samples:
        for k, v in (s.meta.get("labels") or {}).items():
            if k not in names and isinstance(v, (int, float)):  # bool is an int: 0/1 labels
                names.append(k)
    out = {}
    for k in names:
        vals = []
        for s in samples:
            v = (s.meta.get("labels") or {}).get(k)
            vals.append(float(v) if isinstance(v, (int, float)) else float("nan"))
        out[k] = torch.tensor(vals, dtype=torch.float32)
    return out


def collate(samples: list[Sample], plan: StepPlan, cfg: CollateConfig | None = None,
            tokenizer: Tokenizer | None = None) -> dict:
    """The batch dict for ``plan`` (see docs/INTERFACES.md). ``tokenizer`` defaults to :class:`ByteTokenizer`."""
    cfg = cfg or CollateConfig()
    if not samples:
        raise ValueError("collate: empty batch")
    batch: dict = {}
    mods = plan.modalities
    if "image" in mods:
        batch["image"] = _stack_images(samples, cfg)
        batch["image_present"] = _present(samples, "image")
    if "volume" in mods:
        batch["volume"] = _stack_volumes(samples, cfg)
        batch["volume_present"] = _present(samples, "volume")
    if "signal" in mods:
        batch.update(_stack_signals(samples, cfg))
        batch["signal_present"] = _present(samples, "signal")
    if "ehr" in mods:
        batch.update(_stack_ehr(samples, cfg))
        batch["ehr_present"] = _present(samples, "ehr")
    if "text" in mods:
        texts = [s.text if s.text is not None else "" for s in samples]
        tok = tokenizer or ByteTokenizer(cfg.text_max_tokens)
        ids, valid = tok(texts)
        present = _present(samples, "text")
        batch["text_ids"] = ids.masked_fill(~present.view(-1, 1), 0)
        batch["text_valid"] = valid.bool() & present.view(-1, 1)
        batch["text_present"] = present
        batch["text"] = texts
    batch["keys"] = [s.key for s in samples]
    batch["meta"] = [s.meta for s in samples]
    batch["labels"] = _labels(samples)
    batch["plan"] = plan
    return batch
