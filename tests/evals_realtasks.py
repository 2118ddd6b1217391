"""Small labelled eval tasks built from real files that ship inside installed packages (no downloads).

* ``mni_tissue_shards``: 2D axial T1 patches of nilearn's MNI152 template (package data), labelled grey vs white
  matter from the template's own tissue probability maps; "patients" are axial slabs, so splits are spatially
  disjoint (no patch of the test slabs overlaps a training patch).
"""

from __future__ import annotations

import numpy as np

PATCH = 16


def mni_tissue_patches(n_per_class: int = 120, seed: int = 0):
    """(patches uint8 [n, 16, 16], labels 0=grey 1=white, slab ids) from the 2 mm MNI152 template."""
    from nilearn import datasets

    t1 = np.asarray(datasets.load_mni152_template(resolution=2).get_fdata(), dtype=np.float32)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=2).get_fdata(), dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=2).get_fdata(), dtype=np.float32)
    t1 = np.clip(t1 / np.percentile(t1[t1 > 0], 99.5), 0, 1)
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


def tiny_image_model_config():
    """A 2-layer ViT on 16x16 patches (4x4 pixel tokens) with a projection head; real architecture, CPU size."""
    from medfm.model_zoo import MultiModalConfig, TowerSpec

    return MultiModalConfig(towers={"image": TowerSpec("vit2d_tiny_p16", {
        "width": 32, "depth": 2, "num_heads": 2, "img_size": PATCH, "patch_size": 4, "in_chans": 1})}, embed_dim=16,
        mae=[])
