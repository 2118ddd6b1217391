"""Shard-time preprocessing: done once at ingest, recorded in every sample's ``meta.preprocessing``.

Volumes: resampling to ``target_spacing`` uses ``scipy.ndimage.zoom`` (linear, order=1, on float64, grid aligned
to the first voxel; MONAI is not required). Then CT values are clipped to ``ct_clip`` HU and stored int16; MR/other
volumes are normalised to [0, 1] by the ``mr_percentiles`` of the volume (or a fixed ``mr_range``) and stored
float16; then a centred crop/pad to ``target_shape`` (pad = the clip minimum for CT, 0 for MR).
Images: 16-bit/float monochrome -> 8 bit through the DICOM window when the source has one, else the 0.5/99.5
percentiles; resized (PIL, bilinear with antialias) so the longest side is at most ``max_size``.
Signals: zero-phase Butterworth band-pass (scipy ``sosfiltfilt``, order 4), then polyphase resampling to
``target_fs`` (``resample_poly``), optionally cropped to ``max_seconds``; stored float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

HU_AIR = -1024.0


@dataclass
class VolumePreprocess:
    ct_clip: tuple[float, float] = (-1024.0, 3071.0)
    target_spacing: list[float] | None = None  # [sz, sy, sx] mm; None keeps the source grid
    target_shape: list[int] | None = None      # [D, H, W]; None keeps the (resampled) size
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    # Fixed [lo, hi] source range mapped to [0, 1] instead of each volume's own percentiles: keeps intensities
    # comparable across volumes (e.g. patches cut from one template, where per-patch scaling erases the tissue).
    mr_range: tuple[float, float] | None = None
    max_voxels: int = 64 * 1024 * 1024          # refuse absurd volumes instead of exhausting memory

    def validate(self):
        if self.ct_clip[0] >= self.ct_clip[1] or self.ct_clip[0] < -32768 or self.ct_clip[1] > 32767:
            raise ValueError(f"volume.ct_clip must be increasing and fit int16, got {list(self.ct_clip)}")
        if self.target_spacing is not None and (len(self.target_spacing) != 3 or min(self.target_spacing) <= 0):
            raise ValueError(f"volume.target_spacing must be 3 positive numbers, got {self.target_spacing}")
        if self.target_shape is not None and (len(self.target_shape) != 3 or min(self.target_shape) < 1):
            raise ValueError(f"volume.target_shape must be 3 positive integers, got {self.target_shape}")
        lo, hi = self.mr_percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"volume.mr_percentiles must satisfy 0 <= lo < hi <= 100, got {[lo, hi]}")
        if self.mr_range is not None and (len(self.mr_range) != 2 or not self.mr_range[0] < self.mr_range[1]):
            raise ValueError(f"volume.mr_range must be [lo, hi] with lo < hi, got {list(self.mr_range)}")


@dataclass
class ImagePreprocess:
    max_size: int | None = 512  # longest side in pixels; None keeps the source size
    bits: int = 8                # 8 or 16 bits per stored sample
    percentiles: tuple[float, float] = (0.5, 99.5)

    def validate(self):
        if self.bits not in (8, 16):
            raise ValueError(f"image.bits must be 8 or 16, got {self.bits}")
        if self.max_size is not None and self.max_size < 8:
            raise ValueError(f"image.max_size must be >= 8, got {self.max_size}")


@dataclass
class SignalPreprocess:
    bandpass: tuple[float, float] | None = (0.5, 40.0)  # Hz; the high edge is capped at 0.45 x fs
    target_fs: float | None = None
    max_seconds: float | None = None

    def validate(self):
        if self.bandpass is not None and not 0 <= self.bandpass[0] < self.bandpass[1]:
            raise ValueError(f"signal.bandpass must be [low, high] with 0 <= low < high, got {list(self.bandpass)}")
        if self.target_fs is not None and self.target_fs <= 0:
            raise ValueError(f"signal.target_fs must be > 0, got {self.target_fs}")


@dataclass
class PreprocessConfig:
    volume: VolumePreprocess = field(default_factory=VolumePreprocess)
    image: ImagePreprocess = field(default_factory=ImagePreprocess)
    signal: SignalPreprocess = field(default_factory=SignalPreprocess)


class PreprocessError(ValueError):
    def __init__(self, reason: str, message: str):
        self.reason, self.message = reason, message
        super().__init__(f"{reason}: {message}")


# --- volumes ----------------------------------------------------------------------------------------------------
def _crop_pad(arr: np.ndarray, shape, fill) -> np.ndarray:
    out = np.full(tuple(shape), fill, dtype=arr.dtype)
    src, dst = [], []
    for n, t in zip(arr.shape, shape):
        if n >= t:
            s = (n - t) // 2
            src.append(slice(s, s + t))
            dst.append(slice(0, t))
        else:
            s = (t - n) // 2
            src.append(slice(0, n))
            dst.append(slice(s, s + n))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def preprocess_volume(vol: np.ndarray, spacing, modality: str, cfg: VolumePreprocess):
    """Returns (array int16 HU or float16 normalised, meta.volume updates, meta.preprocessing.volume)."""
    from scipy import ndimage

    if vol.size > cfg.max_voxels:
        raise PreprocessError("too_large", f"volume of {vol.size} voxels exceeds max_voxels={cfg.max_voxels}")
    data = vol.astype(np.float64, copy=False)
    spacing = [float(s) for s in spacing]
    applied: dict = {"source_shape": list(vol.shape), "source_spacing": spacing}
    if cfg.target_spacing is not None:
        zoom = [s / t for s, t in zip(spacing, cfg.target_spacing)]
        # A single-slice axis has no extent to interpolate over (zoom would only copy the slice, and the
        # endpoint-aligned step below would be 0): it keeps one voxel and its own spacing.
        new_shape = [max(1, int(round(n * z))) if n > 1 else 1 for n, z in zip(data.shape, zoom)]
        if int(np.prod(new_shape)) > cfg.max_voxels:
            raise PreprocessError("too_large", f"resampling to {cfg.target_spacing} mm gives {new_shape}")
        if new_shape != list(data.shape):
            data = ndimage.zoom(data, [t / n for t, n in zip(new_shape, data.shape)], order=1, mode="nearest",
                                grid_mode=False)
        # zoom(grid_mode=False) keeps the first and last voxel centres fixed, so the new step is s*(n-1)/(t-1)
        # (not s*n/t): record the grid the data really has.
        spacing = [s * (n - 1) / (t - 1) if t > 1 else s * n for s, n, t in zip(spacing, vol.shape, data.shape)]
        applied["resample"] = {"method": "scipy.ndimage.zoom", "order": 1, "target_spacing": list(cfg.target_spacing)}
    if modality == "CT":
        lo, hi = cfg.ct_clip
        out = np.clip(np.rint(data), lo, hi).astype(np.int16)
        applied["clip_hu"] = [lo, hi]
        units, fill = "HU", np.int16(lo)
    else:
        if cfg.mr_range is not None:
            p_lo, p_hi = (float(v) for v in cfg.mr_range)
            applied["normalize"] = {"method": "fixed_range", "values": [p_lo, p_hi]}
        else:
            p_lo, p_hi = np.percentile(data, cfg.mr_percentiles)
            applied["normalize"] = {"method": "percentile", "percentiles": list(cfg.mr_percentiles),
                                    "values": [float(p_lo), float(p_hi)]}
        scale = p_hi - p_lo if p_hi > p_lo else 1.0
        out = np.clip((data - p_lo) / scale, 0.0, 1.0).astype(np.float16)
        units, fill = "normalized", np.float16(0)
    if cfg.target_shape is not None:
        out = _crop_pad(out, cfg.target_shape, fill)
        applied["crop_pad"] = list(cfg.target_shape)
    return out, {"spacing": spacing, "units": units, "shape": list(out.shape)}, applied


# --- images -----------------------------------------------------------------------------------------------------
def preprocess_image(img: np.ndarray, window, cfg: ImagePreprocess):
    """HxWxC -> uint8/uint16 HxWxC (resized). Returns (array, meta.image, meta.preprocessing.image)."""
    from PIL import Image

    applied: dict = {"source_shape": list(img.shape)}
    maxval = 255 if cfg.bits == 8 else 65535
    dtype = np.uint8 if cfg.bits == 8 else np.uint16
    if img.dtype == np.uint8 and cfg.bits == 8:
        out = img
    elif img.dtype == np.uint16 and cfg.bits == 16:
        out = img
    else:
        f = img.astype(np.float64)
        if window is not None:
            c, w = float(window[0]), max(float(window[1]), 1.0)
            lo, hi = c - w / 2.0, c + w / 2.0
            applied["window"] = [c, w]
        elif img.dtype == np.uint8:
            lo, hi = 0.0, 255.0
        else:
            lo, hi = (float(v) for v in np.percentile(f, cfg.percentiles))
            applied["percentiles"] = list(cfg.percentiles)
        hi = hi if hi > lo else lo + 1.0
        out = np.rint(np.clip((f - lo) / (hi - lo), 0.0, 1.0) * maxval).astype(dtype)
    h, w, c = out.shape
    if cfg.max_size is not None and max(h, w) > cfg.max_size:
        s = cfg.max_size / max(h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        if c == 3:
            out = np.asarray(Image.fromarray(out, "RGB").resize((nw, nh), Image.BILINEAR, reducing_gap=None))
        else:
            chan = out[..., 0].astype(np.float32)
            out = np.asarray(Image.fromarray(chan, "F").resize((nw, nh), Image.BILINEAR))
            out = np.clip(np.rint(out), 0, maxval).astype(dtype)[..., None]
        applied["resize"] = [nh, nw]
    out = np.ascontiguousarray(out)
    meta = {"photometric": "RGB" if out.shape[2] == 3 else "MONOCHROME2", "bits": cfg.bits, "shape": list(out.shape)}
    return out, meta, applied


# --- signals ----------------------------------------------------------------------------------------------------
def preprocess_signal(sig: np.ndarray, fs: float, cfg: SignalPreprocess):
    """leads x samples -> float32. Returns (array, {"fs": new fs}, meta.preprocessing.signal)."""
    from scipy import signal as sps

    data = np.asarray(sig, dtype=np.float64)
    applied: dict = {"source_fs": float(fs), "source_samples": int(data.shape[1])}
    if cfg.bandpass is not None and data.shape[1] > 27:  # sosfiltfilt needs > 3 x (2 x sections) samples
        low, high = float(cfg.bandpass[0]), min(float(cfg.bandpass[1]), 0.45 * fs)
        if low > 0 and low < high:
            sos = sps.butter(4, [low, high], btype="bandpass", fs=fs, output="sos")
        else:
            sos = sps.butter(4, high, btype="lowpass", fs=fs, output="sos")
        pad = min(data.shape[1] - 1, 3 * (2 * len(sos) + 1))
        data = sps.sosfiltfilt(sos, data, axis=1, padlen=pad)
        applied["bandpass"] = {"method": "butterworth sosfiltfilt", "order": 4, "band": [low, high]}
    new_fs = float(fs)
    if cfg.target_fs is not None and abs(cfg.target_fs - fs) > 1e-6:
        ratio = Fraction(cfg.target_fs / fs).limit_denominator(1000)
        data = sps.resample_poly(data, ratio.numerator, ratio.denominator, axis=1)
        new_fs = float(fs) * ratio.numerator / ratio.denominator
        applied["resample"] = {"method": "scipy.signal.resample_poly", "up": ratio.numerator,
                               "down": ratio.denominator}
    if cfg.max_seconds is not None:
        n = max(1, int(round(cfg.max_seconds * new_fs)))
        if data.shape[1] > n:
            data = data[:, :n]
            applied["crop_seconds"] = float(cfg.max_seconds)
    return np.ascontiguousarray(data.astype(np.float32)), {"fs": new_fs}, applied
