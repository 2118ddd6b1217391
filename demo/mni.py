"""nilearn's MNI152 2009a symmetric template (package data, read with nibabel through medfm.shards.realdata), read in
one place for every demo dataset cut from it: the corpus's mri2d / mri3d families at 1 mm (brain_patches.py) and the
small eval tasks at 2 mm (mni_tasks.py)."""

from __future__ import annotations

import functools

import numpy as np

from medfm.shards import realdata


def _template_arrays():
    """(t1 as stored, gm as stored, wm as stored, affine): the uint8 arrays of the T1 and its GM / WM maps."""
    import nibabel as nib

    t1_path = realdata.require("nifti_mni152")
    img = nib.load(str(t1_path))
    maps = []
    for tissue in ("gm", "wm"):
        p = t1_path.with_name(t1_path.name.replace("_t1_", f"_{tissue}_"))
        if not p.exists():
            raise realdata.RealDataMissing(f"nilearn's MNI152 {tissue.upper()} map {p.name} is missing: "
                                           "reinstall nilearn")
        maps.append(np.asanyarray(nib.load(str(p)).dataobj))
    return np.asanyarray(img.dataobj), maps[0], maps[1], img.affine


def load_mni():
    """(t1 uint8, gm prob, wm prob, affine) at 1 mm (RAS affine): what the corpus's brain families are cut from."""
    t1, gm, wm, affine = _template_arrays()
    return t1, gm.astype(np.float32) / 255.0, wm.astype(np.float32) / 255.0, affine


def _to_2mm(a: np.ndarray) -> np.ndarray:
    a = a[: a.shape[0] // 2 * 2, : a.shape[1] // 2 * 2, : a.shape[2] // 2 * 2].astype(np.float32)
    return a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2, a.shape[2] // 2, 2).mean(axis=(1, 3, 5)) / 255.0


@functools.lru_cache(maxsize=1)
def mni_2mm():
    """(T1 in [0, 1], GM and WM probabilities) averaged over 2x2x2 voxels to 2 mm (nilearn's own resampling takes
    ~15 s); the T1 is scaled by its 99.5th in-brain percentile."""
    t1, gm, wm, _ = _template_arrays()
    t1 = _to_2mm(t1)
    return np.clip(t1 / np.percentile(t1[t1 > 0], 99.5), 0, 1), _to_2mm(gm), _to_2mm(wm)
