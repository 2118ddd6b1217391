"""Compressed DICOM through the shards: the lossless copies pydicom-data / pydicom ship of one image give the same
array in the shards as the uncompressed copy; lossy copies stay within a stated error; each core decoder (gdcm,
pylibjpeg-openjpeg, pylibjpeg-rle: setup.py install_requires) decodes its syntaxes on its own."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
import webdataset as wds

from medfm.shards import realdata
from medfm.shards.deid import DeidConfig
from medfm.shards.ingest import BurnedInConfig, IngestConfig, build
from medfm.shards.preprocess import ImagePreprocess, PreprocessConfig
from medfm.shards.sample import decode_sample


def _trees():
    trees = dict(realdata.export_trees())
    if "pydicom" not in trees or "data_store" not in trees:
        pytest.fail("pydicom and pydicom-data test files are needed (`make test` installs the dev extra)",
                    pytrace=False)
    return trees["pydicom"], trees["data_store"]


P, Q = ("pydicom", "data_store")
# (compressed, uncompressed reference): the RG1, MR2, US1, 693 pairs (J2KR = reversible JPEG 2000; the
# J2KI = irreversible copies' UNCI references are their own decodes) plus RLE / JPEG-LS / JPEG 2000 / JPEG lossless
# copies of emri_small, MR_small, the palette-colour US and SC_rgb.
LOSSLESS = [((Q, "RG1_J2KR.dcm"), (Q, "RG1_UNCR.dcm")), ((Q, "MR2_J2KR.dcm"), (Q, "MR2_UNCR.dcm")),
            ((Q, "US1_J2KR.dcm"), (Q, "US1_UNCR.dcm")), ((Q, "693_J2KR.dcm"), (Q, "693_UNCR.dcm")),
            ((Q, "MR2_J2KI.dcm"), (Q, "MR2_UNCI.dcm")), ((P, "693_J2KI.dcm"), (Q, "693_UNCI.dcm")),
            ((Q, "emri_small_RLE.dcm"), (Q, "emri_small.dcm")),
            ((Q, "emri_small_jpeg_2k_lossless.dcm"), (Q, "emri_small.dcm")),
            ((Q, "emri_small_jpeg_ls_lossless.dcm"), (Q, "emri_small.dcm")),
            ((P, "MR_small_RLE.dcm"), (P, "MR_small.dcm")), ((P, "MR_small_jp2klossless.dcm"), (P, "MR_small.dcm")),
            ((P, "MR_small_jpeg_ls_lossless.dcm"), (P, "MR_small.dcm")),
            ((Q, "OBXXXX1A_rle.dcm"), (Q, "OBXXXX1A.dcm")), ((P, "SC_rgb_rle.dcm"), (Q, "SC_rgb.dcm")),
            ((P, "SC_rgb_rle_16bit.dcm"), (Q, "SC_rgb_16bit.dcm")), ((P, "SC_rgb_jpeg_gdcm.dcm"), (Q, "SC_rgb.dcm"))]
# lossy JPEG baseline (YCbCr 4:4:4 and 4:2:2) of SC_rgb: stated error, in the 16-bit shard scale
LOSSY = [((P, "SC_rgb_jpeg_dcmtk.dcm"), (Q, "SC_rgb.dcm")), ((P, "SC_rgb_dcmtk_+eb+cy+s2.dcm"), (Q, "SC_rgb.dcm"))]
LOSSY_MAX_ABS, LOSSY_MEAN_ABS = 0.04, 0.005  # fraction of full scale (measured: 6/255 max, 0.57/255 mean at source)


def _path(ref) -> Path:
    trees = dict(zip((P, Q), _trees()))
    return trees[ref[0]] / ref[1]


def _shard_array(path: Path, out: Path) -> np.ndarray:
    # full resolution, 16 bits: what the decoder produced reaches the shard without a resize hiding a difference
    cfg = IngestConfig(deid=DeidConfig(salt="decoder-salt-0123"), burned_in=BurnedInConfig(allow=True),
                       preprocess=PreprocessConfig(image=ImagePreprocess(max_size=None, bits=16)))
    manifest = build([path], out, cfg, progress=False, log=lambda m: None)
    assert manifest["totals"]["samples"] == 1, (path.name, manifest["skipped_inputs"])
    (s,) = [decode_sample(m) for m in wds.WebDataset([str(out / manifest["shards"][0]["name"])],
                                                      shardshuffle=False)]
    return s.image if s.image is not None else s.volume


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    cache: dict[str, np.ndarray] = {}

    def get(ref):
        key = "/".join(ref)
        if key not in cache:
            cache[key] = _shard_array(_path(ref), tmp_path_factory.mktemp("d"))
        return cache[key]

    return get


@pytest.mark.parametrize("comp,ref", LOSSLESS, ids=[c[1] for c, _ in LOSSLESS])
def test_lossless_copies_give_identical_shard_arrays(arrays, comp, ref):
    a, b = arrays(comp), arrays(ref)
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("comp,ref", LOSSY, ids=[c[1] for c, _ in LOSSY])
def test_lossy_copies_stay_within_stated_error(arrays, comp, ref):
    a, b = arrays(comp), arrays(ref)
    assert a.shape == b.shape
    full = float(np.iinfo(b.dtype).max)
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64)) / full
    assert diff.max() <= LOSSY_MAX_ABS and diff.mean() <= LOSSY_MEAN_ABS, (diff.max(), diff.mean())
    assert diff.max() > 0  # really lossy: the test would notice a reference decoded twice


# each core (permissively licensed) decoder on its own, against the uncompressed reference
CORE = [("gdcm", (Q, "emri_small_jpeg_ls_lossless.dcm"), (Q, "emri_small.dcm")),
        ("gdcm", (P, "SC_rgb_jpeg_gdcm.dcm"), (Q, "SC_rgb.dcm")),
        ("pylibjpeg", (Q, "MR2_J2KR.dcm"), (Q, "MR2_UNCR.dcm")),  # JPEG 2000 -> pylibjpeg-openjpeg
        ("pylibjpeg", (Q, "emri_small_RLE.dcm"), (Q, "emri_small.dcm"))]  # RLE -> pylibjpeg-rle


@pytest.mark.parametrize("plugin,comp,ref", CORE, ids=[f"{p}-{c[1]}" for p, c, _ in CORE])
def test_each_core_decoder_decodes_its_syntax(plugin, comp, ref):
    ds = pydicom.dcmread(_path(comp))
    ds.pixel_array_options(decoding_plugin=plugin)
    np.testing.assert_array_equal(ds.pixel_array, pydicom.dcmread(_path(ref)).pixel_array)
