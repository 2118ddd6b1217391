"""NIfTI-1/2 (.nii, .nii.gz) -> volume via nibabel; spacing and orientation from the affine (shards/volume.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medfm.shards.readers.base import ReadError, Record
from medfm.shards.volume import ORIENTATION, to_canonical


def read_nifti(path: Path, rel: str, modality: str = "MR") -> list[Record]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)  # applies scl_slope/scl_inter like get_fdata, keeps integer dtype if none
    except Exception as exc:  # nibabel raises ImageFileError, HeaderDataError, EOFError, zlib errors, ...
        raise ReadError("bad_nifti", f"{rel}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        data = data[..., 0]  # a time series: the first volume is the anatomical reference
    if data.ndim != 3:
        raise ReadError("bad_shape", f"{rel}: expected a 3D volume, got shape {data.shape}")
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ReadError("bad_geometry", f"{rel}: affine is missing or singular")
    vol, spacing = to_canonical(data, affine)
    stem = Path(rel).name.split(".")[0]
    return [Record(format="nifti", file=rel, patient=stem, study=stem, volume=vol,
                   volume_meta={"spacing": spacing, "orientation": ORIENTATION, "modality": modality},
                   info={"modality": modality, "dtype": str(data.dtype)})]
