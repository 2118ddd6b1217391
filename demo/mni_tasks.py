"""Small labelled MNI152 tasks for the eval tests (no downloads), cut from the 2 mm template (mni.py):

* ``write_mni_tissue_shards``: 16x16 axial T1 patches labelled grey vs white matter from the template's own tissue
  probability maps; "patients" are 10 mm axial slabs, so splits are spatially disjoint (no patch of the test slabs
  overlaps a training patch).
* ``write_mni_segmentation_shards``: 2D patches or 3D blocks of the T1 plus a companion shard directory of their
  tissue label maps (background / grey / white).

They live in the demo part because "no module outside the demo part generates demo data" (issue #16): tests import
them from here instead of cutting the template again.
"""

from __future__ import annotations

import numpy as np

from medfm.demo.mni import mni_2mm

PATCH = 16


def mni_tissue_patches(n_per_class: int = 120, seed: int = 0):
    """(patches uint8 [n, 16, 16], labels 0=grey 1=white, slab ids) from the 2 mm MNI152 template."""
    t1, gm, wm = mni_2mm()
    rng = np.random.default_rng(seed)
    h = PATCH // 2
    out, labels, slabs = [], [], []
    for label, prob in ((0, gm), (1, wm)):
        x, y, z = np.nonzero(prob > 0.7)
        ok = (x >= h) & (x < t1.shape[0] - h) & (y >= h) & (y < t1.shape[1] - h) & (z >= 20) & (z < 70)
        pick = rng.choice(np.flatnonzero(ok), size=n_per_class, replace=False)
        for i in pick:
            patch = t1[x[i] - h:x[i] + h, y[i] - h:y[i] + h, z[i]]
            out.append(np.round(patch * 255).astype(np.uint8))
            labels.append(label)
            slabs.append(int(z[i]) // 5)  # 10 mm slabs
    return np.stack(out), np.array(labels), np.array(slabs)


def write_mni_tissue_shards(out_dir, n_per_class: int = 120, seed: int = 0):
    """Write the patches as medfm shards; slabs decide the split (train 60%, val 20%, test 20% of slabs)."""
    from medfm.shards.sample import Sample, make_meta
    from medfm.shards.writer import DatasetWriter

    patches, labels, slabs = mni_tissue_patches(n_per_class, seed)
    uniq = np.unique(slabs)
    split_of = {s: ("train", "train", "val", "train", "test")[i % 5] for i, s in enumerate(uniq)}
    writer = DatasetWriter(out_dir, max_samples=64)
    for i, (p, lab, slab) in enumerate(zip(patches, labels, slabs)):
        meta = make_meta(patient_id=f"slab{slab:02d}", study_id=f"s{i:04d}", split=split_of[slab],
                         source={"format": "nifti", "file": "mni152_2mm"}, modalities=["image"],
                         labels={"tissue": ["grey", "white"][lab]},
                         image={"photometric": "MONOCHROME2", "bits": 8, "shape": [PATCH, PATCH, 1]})
        writer.add(Sample(key=f"s{i:04d}-0", meta=meta, image=p[:, :, None]))
    writer.close()
    return out_dir


SEG_CLASSES = ["background", "grey", "white"]


def _mni_maps():
    """(T1 in [0, 1], tissue label map 0 background / 1 grey / 2 white) at 2 mm."""
    t1, gm, wm = mni_2mm()
    labels = np.where((gm > 0.5) & (gm >= wm), 1, np.where((wm > 0.5) & (wm > gm), 2, 0)).astype(np.uint8)
    return t1, labels


def write_mni_segmentation_shards(out_dir, dims: int = 2, size: int = 32, n: int = 120, seed: int = 0):
    """Image (2D axial patches) or volume (3D blocks) shards of the MNI152 T1, plus a companion shard directory of
    their tissue label maps (same keys, same splits). Returns (images dir, masks dir).

    2D: ``n`` patches at random in-brain centres; patient = the axial slice, so patches of two splits never share a
    voxel. 3D: the template tiled into disjoint ``size``^3 blocks (those at least 30% tissue, at most ``n``); each
    block is its own patient.
    """
    from pathlib import Path

    from medfm.shards.sample import Sample, make_meta
    from medfm.shards.writer import DatasetWriter

    t1, labels = _mni_maps()
    rng = np.random.default_rng(seed)
    if dims == 2:
        h = size // 2
        x, y, z = np.nonzero(labels > 0)
        ok = (x >= h) & (x < t1.shape[0] - h) & (y >= h) & (y < t1.shape[1] - h) & (z >= 20) & (z < 70)
        boxes = [((x[c] - h, y[c] - h, z[c]), int(z[c])) for c in rng.choice(np.flatnonzero(ok), n, replace=False)]
    else:
        grid = [range(0, s - size + 1, size) for s in t1.shape]
        boxes = [((a, b, c), i) for i, (a, b, c) in enumerate((a, b, c) for a in grid[0] for b in grid[1]
                                                              for c in grid[2])
                 if (labels[a:a + size, b:b + size, c:c + size] > 0).mean() >= 0.3]
        boxes = [boxes[i] for i in np.sort(rng.permutation(len(boxes))[:n])]
    out = Path(out_dir)
    img_w, mask_w = DatasetWriter(out / "images", max_samples=64), DatasetWriter(out / "masks", max_samples=64)
    for i, ((a, b, c), patient) in enumerate(boxes):
        zs = slice(c, c + size) if dims == 3 else c
        patch, lab = t1[a:a + size, b:b + size, zs], labels[a:a + size, b:b + size, zs]
        common = dict(patient_id=f"p{patient:03d}", study_id=f"s{i:04d}",
                      split=("train", "train", "val", "train", "test")[(patient if dims == 2 else i) % 5],
                      source={"format": "nifti", "file": "mni152_2mm"}, labels={})
        key = f"s{i:04d}-0"
        if dims == 2:
            shape = {"photometric": "MONOCHROME2", "bits": 8, "shape": [size, size, 1]}
            img_w.add(Sample(key, make_meta(modalities=["image"], image=shape, **common),
                             image=np.round(patch * 255).astype(np.uint8)[:, :, None]))
            mask_w.add(Sample(key, make_meta(modalities=["image"], image=shape, **common), image=lab[:, :, None]))
        else:
            # array axes (x, y, z) of the template -> (D, H, W) = (z, y, x), as shards store volumes
            vol = {"spacing": [2.0, 2.0, 2.0], "orientation": "RAS", "units": "normalized", "shape": [size] * 3}
            img_w.add(Sample(key, make_meta(modalities=["volume"], volume=vol, **common),
                             volume=patch.transpose(2, 1, 0).astype(np.float16)))
            mask_w.add(Sample(key, make_meta(modalities=["volume"], volume=vol, **common),
                              volume=lab.transpose(2, 1, 0).astype(np.int16)))
    img_w.close()
    mask_w.close()
    return out / "images", out / "masks"
