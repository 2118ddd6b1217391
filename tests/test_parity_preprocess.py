"""medfm's shard-time volume preprocessing vs MONAI's transforms on real files.

- Orientation: medfm's readers (nibabel ``as_closest_canonical`` -> stored [S, A, R]) vs MONAI ``LoadImage`` +
  ``Orientation("RAS")`` (-> [R, A, S]): identical voxels (transposed) and spacing, on nibabel's LAS
  ``anatomical.nii``, on nilearn's MNI152 T1 re-encoded in a permuted+flipped orientation, and on pydicom's CT slice.
- HU windowing: shard-time clip + the loader's ``volume_to_float`` vs ``ScaleIntensityRange(a_min, a_max, 0, 1,
  clip=True)``; MR percentile normalisation vs ``ScaleIntensityRangePercentiles``: equal to float16 storage precision.
- Resampling: medfm (``scipy.ndimage.zoom``, order 1, corner-aligned grid) vs MONAI ``Spacing`` (bilinear). They differ
  by design in *which grid* they produce (see test_resampling_grid_differs_from_monai_by_design); on the same grid the
  interpolated values agree to the int16 rounding (|diff| <= 1 HU).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.data import PydicomReader  # MONAI is in the dev extra; missing it must fail, not skip
from monai.transforms import LoadImage, Orientation, ScaleIntensityRange, ScaleIntensityRangePercentiles, Spacing

from medfm.shards.collate import CollateConfig, volume_to_float
from medfm.shards.deid import DeidConfig
from medfm.shards.preprocess import VolumePreprocess, preprocess_volume
from medfm.shards.readers.dicom import read_dicom
from medfm.shards.readers.nifti import read_nifti

NO_CLIP = (-32768.0, 32767.0)  # CT path with a clip that never bites: resampling compared alone


def _anatomical() -> Path:
    return Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"


@pytest.fixture(scope="module")
def mni_reoriented(tmp_path_factory) -> Path:
    """nilearn's MNI152 T1 (RAS), every 3rd voxel, re-encoded as P-I-L (axes permuted and two flipped) so that both
    sides have real reorientation to undo."""
    import nilearn

    src = nib.load(Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    data = np.asanyarray(src.dataobj)[::3, ::3, ::3].astype(np.int16)
    aff = src.affine.copy()
    aff[:3, :3] *= 3
    small = nib.Nifti1Image(data, aff)
    target = nib.orientations.axcodes2ornt(("P", "I", "L"))
    xform = nib.orientations.ornt_transform(nib.io_orientation(aff), target)
    moved = small.as_reoriented(xform)
    assert nib.aff2axcodes(moved.affine) == ("P", "I", "L")
    path = tmp_path_factory.mktemp("mni") / "mni_pil.nii.gz"
    nib.save(moved, str(path))
    return path


def _monai_ras(path, reader=None, axcodes="RAS"):
    img = LoadImage(reader=reader, image_only=True, ensure_channel_first=True)(str(path))
    return Orientation(axcodes=axcodes)(img)


@pytest.mark.parametrize("which", ["anatomical_LAS", "mni152_PIL"])
def test_nifti_orientation_matches_monai(which, mni_reoriented):
    path = _anatomical() if which == "anatomical_LAS" else mni_reoriented
    rec = read_nifti(path, path.name)[0]
    ours, spacing = rec.volume, rec.volume_meta["spacing"]
    theirs = _monai_ras(path)
    theirs_sar = np.asarray(theirs[0]).transpose(2, 1, 0)  # MONAI [R, A, S] -> medfm [S, A, R]
    assert ours.shape == theirs_sar.shape
    np.testing.assert_array_equal(ours.astype(np.float32), theirs_sar)
    np.testing.assert_allclose(spacing, np.asarray(theirs.pixdim)[::-1], rtol=1e-6)
    assert ours.std() > 0  # a real image, not a constant block


def test_dicom_ct_orientation_and_hu_window_match_monai():
    from pydicom.data import get_testdata_file

    path = Path(get_testdata_file("CT_small.dcm"))
    rec = read_dicom([path], path.name, None, DeidConfig(enabled=False))[0]
    # MONAI reads a single slice as 2D: orient the plane (R, A); medfm stores it as [S=1, A, R].
    theirs = _monai_ras(path, reader=PydicomReader(), axcodes="RA")
    np.testing.assert_array_equal(rec.volume[0], np.asarray(theirs[0]).T)
    np.testing.assert_allclose(rec.volume_meta["spacing"][1:], np.asarray(theirs.pixdim)[::-1], rtol=1e-6)

    window = (-160.0, 240.0)  # soft-tissue window, narrower than the data range so the clip really bites
    shard, vmeta, applied = preprocess_volume(rec.volume, rec.volume_meta["spacing"], "CT", VolumePreprocess())
    assert shard.dtype == np.int16 and vmeta["units"] == "HU"
    ours = volume_to_float(shard, {"volume": vmeta, "preprocessing": {"volume": applied}},
                           CollateConfig(hu_window=list(window)))
    ref = ScaleIntensityRange(a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True)(theirs)
    np.testing.assert_allclose(ours[0], np.asarray(ref[0]).T, rtol=0, atol=1e-6)
    assert 0.05 < float((ours == 0).mean()) < 0.95 and float((ours == 1).mean()) > 0.001


def test_mr_percentile_normalisation_matches_monai():
    rec = read_nifti(_anatomical(), "anatomical.nii")[0]
    cfg = VolumePreprocess(mr_percentiles=(0.5, 99.5))
    ours, vmeta, _ = preprocess_volume(rec.volume, rec.volume_meta["spacing"], "MR", cfg)
    assert ours.dtype == np.float16 and vmeta["units"] == "normalized"
    ref = ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)(
        rec.volume.astype(np.float32)[None])
    np.testing.assert_allclose(ours.astype(np.float32), np.asarray(ref[0]), rtol=0, atol=1e-3)  # float16 storage


def _medfm_resample(vol, spacing, target):
    return preprocess_volume(vol, spacing, "CT", VolumePreprocess(target_spacing=list(target), ct_clip=NO_CLIP))


def _corner_aligned_spacing(spacing, n_in, n_out):
    """Spacing of the grid ``ndimage.zoom(grid_mode=False)`` produces: first and last voxel centres are kept, so
    n_out - 1 steps span what n_in - 1 steps spanned."""
    return [s * (n - 1) / (t - 1) for s, n, t in zip(spacing, n_in, n_out)]


@pytest.mark.parametrize("target", [(3.0, 3.0, 3.0), (1.5, 2.5, 3.5)])
def test_resampling_values_match_monai_on_the_same_grid(target):
    rec = read_nifti(_anatomical(), "anatomical.nii")[0]
    vol, spacing = rec.volume, rec.volume_meta["spacing"]
    ours, _, _ = _medfm_resample(vol, spacing, target)
    grid = _corner_aligned_spacing(spacing, vol.shape, ours.shape)
    theirs = Spacing(pixdim=grid[::-1], mode="bilinear", padding_mode="border")(_monai_ras(_anatomical()))
    theirs_sar = np.rint(np.asarray(theirs[0]).transpose(2, 1, 0))
    assert theirs_sar.shape == ours.shape
    diff = np.abs(theirs_sar - ours)
    # Same linear interpolation on the same grid; medfm rounds to int16 HU, so .5 ties may round apart by 1.
    assert diff.max() <= 1.0 and diff.mean() < 0.01, f"max {diff.max()}, mean {diff.mean()}"


def test_resampling_grid_differs_from_monai_by_design():
    """The documented difference. MONAI ``Spacing`` places voxels exactly ``pixdim`` apart from the first voxel centre
    and sizes the output to cover the input's extent; medfm resizes to ``round(n * s / t)`` voxels with the first and
    last voxel centres fixed, so its step is ``s (n-1)/(t'-1)``, close to but not exactly the target spacing."""
    rec = read_nifti(_anatomical(), "anatomical.nii")[0]
    vol, spacing = rec.volume, rec.volume_meta["spacing"]
    target = (3.0, 3.0, 3.0)
    ours, _, _ = _medfm_resample(vol, spacing, target)
    theirs = Spacing(pixdim=target, mode="bilinear", padding_mode="border")(_monai_ras(_anatomical()))
    np.testing.assert_allclose(np.asarray(theirs.pixdim), target)
    grid = _corner_aligned_spacing(spacing, vol.shape, ours.shape)
    assert max(abs(g - t) / t for g, t in zip(grid, target)) < 0.05  # within 5% of the request
    assert list(ours.shape) == [max(1, round(n * s / t)) for n, s, t in zip(vol.shape, spacing, target)]


def test_recorded_spacing_is_the_resampled_grid():
    rec = read_nifti(_anatomical(), "anatomical.nii")[0]
    vol, spacing = rec.volume, rec.volume_meta["spacing"]
    ours, vmeta, _ = _medfm_resample(vol, spacing, (3.0, 3.0, 3.0))
    np.testing.assert_allclose(vmeta["spacing"], _corner_aligned_spacing(spacing, vol.shape, ours.shape), rtol=1e-6)
