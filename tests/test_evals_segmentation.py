"""Segmentation protocol: Dice / HD95 equal MONAI's, and a UNETR-style decoder on frozen 2D and 3D ViT tokens
segments grey / white matter of nilearn's MNI152 T1 template (label maps from its own tissue probability maps,
written as a companion shard directory) through the suite, with patient-level CIs and clear task failures."""

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from evals_realtasks import tiny_volume_model_config  # noqa: E402

from medfm.demo.mni_tasks import SEG_CLASSES, write_mni_segmentation_shards  # noqa: E402
from medfm.evals import metrics as M  # noqa: E402
from medfm.evals.features import weights_hash  # noqa: E402
from medfm.evals.suite import load_suite, run_suite  # noqa: E402

SUITE = """
name: mni-seg
n_boot: 100
batch_size: 32
tasks:
  - {name: tissue_seg, data: {dir: IMAGES}, masks: MASKS, modality: MOD, kind: segmentation,
     protocol: segmentation, classes: [background, grey, white], options: {epochs: EPOCHS, feature_size: 8}}
"""


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Decoder training on 2 shared, busy cores: OpenMP spin-waits make 2 threads several times slower than 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _monai(pred, true, k, spacing=None):
    from monai.metrics import compute_dice, compute_hausdorff_distance

    def onehot(a):
        return torch.nn.functional.one_hot(torch.as_tensor(np.where(true < 0, 0, a)), k).movedim(-1, 0)[None].float()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on empty classes and on its own deprecations
        d = compute_dice(onehot(pred), onehot(true), include_background=False).numpy()[0]
        h = compute_hausdorff_distance(onehot(pred), onehot(true), percentile=95, spacing=spacing).numpy()[0]
    return d, h


def _blobs(rng, shape, k=3):
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(rng.normal(size=(k,) + shape), 2.5, axes=range(1, len(shape) + 1)).argmax(0)


@pytest.mark.parametrize("shape,spacing", [((40, 48), None), ((36, 30), (1.0, 2.5)), ((18, 22, 20), (2.0, 1.0, 1.5))])
def test_dice_and_hd95_equal_monai(shape, spacing):
    rng = np.random.default_rng(len(shape))
    for _ in range(3):
        true = _blobs(rng, shape)
        pred = np.where(rng.random(shape) < 0.1, rng.integers(0, 3, shape), true)  # noisy copy: partial overlap
        pred = np.roll(pred, 2, axis=0)
        d, h = M.segmentation_scores(pred, true, 3, spacing)
        md, mh = _monai(pred, true, 3, spacing)
        np.testing.assert_allclose(d, md, rtol=1e-6)
        np.testing.assert_allclose(h, mh, rtol=1e-5)


def test_segmentation_metric_edge_cases():
    true = np.zeros((20, 20), int)
    true[5:10, 5:10] = 1
    # class 2 absent from the ground truth: undefined (NaN, excluded from means) as MONAI's ignore_empty
    d, h = M.segmentation_scores(true, true, 3)
    assert d[0] == 1.0 and h[0] == 0.0 and np.isnan(d[1]) and np.isnan(h[1])
    # a structure the prediction misses entirely: Dice 0 and the worst distance the image allows (its diagonal)
    d, h = M.segmentation_scores(np.zeros_like(true), true, 2, spacing=(1.0, 2.0))
    assert d[0] == 0.0 and h[0] == pytest.approx(np.hypot(19.0, 38.0))
    # voxels labelled -1 (collate padding) count for neither map
    padded = np.where(np.arange(20)[None, :] >= 15, -1, true)
    pred = true.copy()
    pred[:, 15:] = 1  # wrong only where the ground truth is padding
    assert M.segmentation_scores(pred, padded, 2)[0][0] == 1.0
    with pytest.raises(M.MetricError, match="class absent"):
        M.nanmean_defined([np.nan, np.nan])


def _suite(tmp_path, images, masks, modality, epochs):
    p = tmp_path / "seg.yaml"
    p.write_text(SUITE.replace("IMAGES", str(images)).replace("MASKS", str(masks)).replace("MOD", modality)
                 .replace("EPOCHS", str(epochs)))
    return load_suite(p)


def _check_against_monai(res):
    out = res.outputs
    per = [_monai(p, t, 3, [float(s) for s in sp] if not np.allclose(sp, 1) else None) for p, t, sp in zip(out["pred"], out["true"],
                                                                                       out["spacing"])]
    dice, hd = np.stack([d for d, _ in per]), np.stack([h for _, h in per])
    rows = {(r.metric, r.params.get("class")): r.estimate for r in res.rows}
    for j, name in enumerate(SEG_CLASSES[1:]):
        ok = ~np.isnan(dice[:, j])
        assert rows[("dice", name)].value == pytest.approx(dice[ok, j].mean(), rel=1e-6)
        hd_name = next(m for m, c in rows if c == name and m.startswith("hd"))
        assert rows[(hd_name, name)].value == pytest.approx(hd[ok, j].mean(), rel=1e-5)
    for est in rows.values():
        assert est.low <= est.value <= est.high and est.n == len(out["pred"])


def test_unetr_decoder_on_frozen_vit2d_segments_mni_tissue(tmp_path):
    from medfm.model_zoo import MultiModalConfig, TowerSpec, build_multimodal

    images, masks = write_mni_segmentation_shards(tmp_path / "seg2d", dims=2, size=32, n=120)
    torch.manual_seed(0)
    model = build_multimodal(MultiModalConfig(towers={"image": TowerSpec("vit2d_tiny_p16", {
        "width": 32, "depth": 2, "num_heads": 2, "img_size": 32, "patch_size": 4, "in_chans": 1})}, embed_dim=16,
        mae=[])).eval()
    suite = _suite(tmp_path, images, masks, "image", 20)
    (res,) = run_suite(suite, model, weights_hash(model), None, progress=False)
    assert res.status == "ok", res.error
    rows = {(r.metric, r.params.get("class")): r.estimate for r in res.rows}
    # grey and white matter are each ~1/3 of the pixels: chance Dice is ~0.33; a working decoder is far above it
    assert rows[("dice", "grey")].value > 0.7 and rows[("dice", "white")].value > 0.7, rows
    assert rows[("hd95", "grey")].value < 8.0  # pixels (2D patches carry no spacing)
    assert res.info["layers"] == [2, 1] and res.info["stages"] == 2 and res.info["best_epoch"] >= 5
    assert res.outputs["pred"].shape == (len(res.outputs["keys"]), 32, 32)
    _check_against_monai(res)

    # Label maps that are not class ids, and a modality without a tower, fail the task with one line each.
    suite.tasks[0].masks = str(images)  # the images as "label maps": intensities are not class ids
    (bad,) = run_suite(suite, model, weights_hash(model), None, progress=False)
    assert bad.status == "failed" and "expected class ids 0..2" in bad.error
    suite.tasks[0].masks = str(masks)
    suite.tasks[0].modality = "volume"
    (bad,) = run_suite(suite, model, weights_hash(model), None, progress=False)
    assert bad.status == "failed" and "no 'volume' tower" in bad.error


def test_unetr_decoder_on_frozen_vit3d_reports_mm(tmp_path):
    from medfm.model_zoo import build_multimodal

    images, masks = write_mni_segmentation_shards(tmp_path / "seg3d", dims=3, size=16, n=60)
    torch.manual_seed(0)
    model = build_multimodal(tiny_volume_model_config(16)).eval()
    (res,) = run_suite(_suite(tmp_path, images, masks, "volume", 8), model, weights_hash(model), None,
                       progress=False)
    assert res.status == "ok", res.error
    rows = {(r.metric, r.params.get("class")): r for r in res.rows}
    assert rows[("hd95", "white")].params["units"] == "mm" and res.info["grid"] == [4, 4, 4]
    assert rows[("dice", "white")].estimate.value > 0.4  # 8 epochs on ~35 blocks; chance is ~0.3
    _check_against_monai(res)
