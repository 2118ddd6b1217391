"""Volume orientation convention shared by readers, preprocessing and the loader.

Stored volumes are ``D x H x W`` with axes ``(S, A, R)``: the array is the closest-canonical RAS+ voxel grid of
the source (nibabel ``as_closest_canonical``: voxel i -> Right, j -> Anterior, k -> Superior) transposed to
``[k, j, i]``. So ``volume[d]`` is an axial slice, d grows towards Superior, rows (H) towards Anterior, columns (W)
towards patient Right. ``spacing`` is ``[sz, sy, sx]`` in mm in that same array axis order. Oblique acquisitions
are mapped to the *closest* canonical axes (no resampling of the obliquity), which is the usual choice for
pretraining and keeps the original voxels untouched.
"""

from __future__ import annotations

import numpy as np

ORIENTATION = "RAS"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def to_canonical(data_ijk: np.ndarray, affine_ras: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Reorient voxel array ``data[i, j, k]`` with RAS affine to the stored ``[S, A, R]`` layout.

    Returns (array D x H x W with the input dtype, spacing [sz, sy, sx] in mm).
    """
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data_ijk), np.asarray(affine_ras, dtype=np.float64))
    canon = nib.as_closest_canonical(img)
    arr = np.asanyarray(canon.dataobj)
    zooms = [float(z) for z in canon.header.get_zooms()[:3]]
    return np.ascontiguousarray(arr.transpose(2, 1, 0)), [zooms[2], zooms[1], zooms[0]]


def dicom_affine_ras(orientation, pixel_spacing, first_position, slice_step) -> np.ndarray:
    """RAS affine of a DICOM stack whose voxel index is (column i, row j, slice k).

    DICOM patient space is LPS: ImageOrientationPatient gives the row direction (along which the column index
    grows) then the column direction; PixelSpacing is (row spacing, column spacing); ``slice_step`` is the LPS
    vector between consecutive sorted slices.
    """
    row_dir = np.asarray(orientation[:3], dtype=np.float64)
    col_dir = np.asarray(orientation[3:6], dtype=np.float64)
    dr, dc = float(pixel_spacing[0]), float(pixel_spacing[1])
    aff = np.eye(4)
    aff[:3, 0] = row_dir * dc
    aff[:3, 1] = col_dir * dr
    aff[:3, 2] = np.asarray(slice_step, dtype=np.float64)
    aff[:3, 3] = np.asarray(first_position, dtype=np.float64)
    return LPS_TO_RAS @ aff
