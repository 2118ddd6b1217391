"""Cheap, seeded training-time augmentations applied per sample before collation.

The generator for a sample is derived from (seed, step, global slot) by the loader, so the augmented batch is the
same on a resumed run and does not depend on which rank or worker produced it. Heavy transforms (resampling,
registration, intensity models) belong at shard time, not here.

Flips default to off: left/right carries anatomy (heart, situs, laterality labels) in medical images.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from medfm.shards.collate import CollateConfig
from medfm.shards.sample import Sample


@dataclass
class AugmentConfig:
    enabled: bool = False
    image_random_crop: bool = True        # random (vs centre) crop to collate.image_size when larger
    image_flip_p: float = 0.0             # horizontal flip probability
    volume_random_crop: bool = True       # random crop to collate.volume_size when larger
    volume_flip_p: float = 0.0            # per-axis flip probability (D, H, W)
    signal_random_crop: bool = True       # random window of collate.signal_length samples when longer
    signal_lead_dropout_p: float = 0.0    # each lead zeroed (and masked) with this probability
    ehr_event_dropout_p: float = 0.0      # each event dropped with this probability (at least one kept)

    def validate(self):
        for name in ("image_flip_p", "volume_flip_p", "signal_lead_dropout_p", "ehr_event_dropout_p"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"augment.{name} must be in [0, 1], got {v}")


def _random_starts(shape, size, rng) -> list[int]:
    return [int(rng.integers(0, max(cur - n, 0) + 1)) for cur, n in zip(shape, size)]


def _crop(arr: np.ndarray, size, axes, rng) -> np.ndarray:
    shape = [arr.shape[a] for a in axes]
    if all(c <= n for c, n in zip(shape, size)):
        return arr
    starts = _random_starts(shape, size, rng)
    index = [slice(None)] * arr.ndim
    for a, s, n, c in zip(axes, starts, size, shape):
        index[a] = slice(s, s + min(n, c))
    return arr[tuple(index)]


def augment_sample(sample: Sample, rng: np.random.Generator, cfg: AugmentConfig,
                   collate_cfg: CollateConfig | None = None) -> Sample:
    """A new Sample with augmentations applied (the input is not modified)."""
    if not cfg.enabled:
        return sample
    collate_cfg = collate_cfg or CollateConfig()
    out = copy.copy(sample)
    out.meta = dict(sample.meta)
    if sample.image is not None:
        img = sample.image
        if cfg.image_random_crop and collate_cfg.image_size is not None:
            img = _crop(img, collate_cfg.image_size, (0, 1), rng)
        if rng.random() < cfg.image_flip_p:
            img = img[:, ::-1]
        out.image = np.ascontiguousarray(img)
    if sample.volume is not None:
        vol = sample.volume
        if cfg.volume_random_crop and collate_cfg.volume_size is not None:
            vol = _crop(vol, collate_cfg.volume_size, (0, 1, 2), rng)
        for axis in range(3):
            if rng.random() < cfg.volume_flip_p:
                vol = np.flip(vol, axis=axis)
        out.volume = np.ascontiguousarray(vol)
    if sample.signal is not None:
        sig = sample.signal
        if cfg.signal_random_crop and collate_cfg.signal_length is not None:
            sig = _crop(sig, (collate_cfg.signal_length,), (1,), rng)
        if cfg.signal_lead_dropout_p > 0:
            keep = rng.random(sig.shape[0]) >= cfg.signal_lead_dropout_p
            if not keep.any():  # an all-dropped record carries no signal at all: keep one lead
                keep[int(rng.integers(0, sig.shape[0]))] = True
            sig = sig * keep[:, None].astype(sig.dtype)
            out.meta["signal"] = {**(sample.meta.get("signal") or {}), "lead_mask": keep.tolist()}
        out.signal = np.ascontiguousarray(sig)
    if sample.ehr is not None and cfg.ehr_event_dropout_p > 0 and len(sample.ehr) > 1:
        keep = rng.random(len(sample.ehr)) >= cfg.ehr_event_dropout_p
        if not keep.any():
            keep[int(rng.integers(0, len(keep)))] = True
        out.ehr = sample.ehr[keep]
    return out
