"""The corpus's brain families, cut from the 1 mm MNI152 template (mni.py): mri2d = 32x32 axial / coronal patches
(PNG), mri3d = 16^3 NIfTI blocks (affine shifted to the block), each labelled grey vs white matter from nilearn's
GM / WM probability maps. Pseudo-patient = one disjoint 40 mm cell of the template, so no voxel is in two splits."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from medfm.demo.sources import write_index
from medfm.demo.tasks import CAPTION_2D, CAPTION_3D, TISSUES

CELL_MM = 40            # pseudo-patient = one disjoint 40 mm cube of the template (1 mm voxels)
PATCH_2D = 32           # 32 x 32 px at 1 mm
PATCH_3D = 16           # 16^3 voxels at 1 mm
PER_CLASS_2D = 200
PER_CLASS_3D = 150
MIN_BRAIN = 0.9         # fraction of a patch inside the template's brain (T1 > 0)
MIN_DOMINANT = 0.5      # mean probability of the dominant tissue over the patch


def _cells(inside: np.ndarray):
    """Disjoint CELL_MM cubes tiling the brain's bounding box: yields (cell id, origin (i, j, k))."""
    idx = np.argwhere(inside)
    lo, hi = idx.min(0), idx.max(0) + 1
    n = np.ceil((hi - lo) / CELL_MM).astype(int)
    start = np.maximum(0, lo - (n * CELL_MM - (hi - lo)) // 2)
    for a in range(n[0]):
        for b in range(n[1]):
            for c in range(n[2]):
                o = start + np.array([a, b, c]) * CELL_MM
                if np.all(o + CELL_MM <= inside.shape):
                    yield f"mni152-cell-{a}-{b}-{c}", o


def _position_words(center_vox, affine) -> tuple[str, str]:
    x, _, z = (affine @ np.r_[center_vox, 1.0])[:3]
    side = "left hemisphere" if x < -8 else "right hemisphere" if x > 8 else "midline"
    level = "superior" if z >= 35 else "inferior" if z < 0 else "middle"
    return side, level


def _balanced_pick(cands: list[dict], per_class: int, rng: np.random.Generator) -> list[dict]:
    """Equal counts per class (the smaller class's count, at most ``per_class``), spread over cells: candidates are
    taken round-robin across cells in a random order, so every cell that has a class contributes to it."""
    by_class: dict[int, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for c in cands:
        by_class[c["label"]][c["patient"]].append(c)
    n = min(per_class, *(sum(len(v) for v in by_class[k].values()) for k in range(len(TISSUES))))
    out = []
    for k in range(len(TISSUES)):
        pools = [list(rng.permutation(len(v))) for v in by_class[k].values()]
        cells = list(by_class[k].values())
        taken = 0
        while taken < n:
            for cell, pool in zip(cells, pools):
                if pool and taken < n:
                    out.append(cell[pool.pop()])
                    taken += 1
    return out


def _tissue_label(gm_patch, wm_patch, brain_patch):
    if brain_patch.mean() < MIN_BRAIN:
        return None
    f = np.array([gm_patch.mean(), wm_patch.mean()])
    k = int(f.argmax())
    return (k, float(f[k])) if f[k] >= MIN_DOMINANT else None


def plan_mri2d(mni) -> list[dict]:
    """The 32x32 patches (axial and coronal) to cut: index rows plus where each patch lies."""
    t1, gm, wm, affine = mni
    inside = t1 > 0
    cands = []
    half = PATCH_2D // 2
    for cell, o in _cells(inside):
        offsets = range(0, CELL_MM - PATCH_2D + 1, 4)
        for plane, fixed_axis in (("axial", 2), ("coronal", 1)):
            inplane = [a for a in range(3) if a != fixed_axis]
            for s in range(2, CELL_MM, 4):
                for u in offsets:
                    for v in offsets:
                        sl = [slice(None)] * 3
                        sl[fixed_axis] = o[fixed_axis] + s
                        sl[inplane[0]] = slice(o[inplane[0]] + u, o[inplane[0]] + u + PATCH_2D)
                        sl[inplane[1]] = slice(o[inplane[1]] + v, o[inplane[1]] + v + PATCH_2D)
                        sl = tuple(sl)
                        lab = _tissue_label(gm[sl], wm[sl], inside[sl])
                        if lab is None:
                            continue
                        center = np.array([x.start + half if isinstance(x, slice) else x for x in sl], float)
                        cands.append({"patient": cell, "label": lab[0], "dominant": lab[1], "sl": sl,
                                      "plane": plane, "center": center})
    picked = _balanced_pick(cands, PER_CLASS_2D, np.random.default_rng(2))
    rows = []
    for n, c in enumerate(sorted(picked, key=lambda c: (c["patient"], c["plane"], str(c["sl"])))):
        side, level = _position_words(c["center"], affine)
        text = CAPTION_2D.format(tissue=TISSUES[c["label"]], side=side, level=level, plane=c["plane"])
        rows.append({"path": f"patch{n:04d}.png", "text": text, "patient_id": c["patient"], "tissue": c["label"],
                     "_where": c["sl"]})
    return rows


def write_mri2d(folder: Path, rows: list[dict], mni) -> None:
    """The PNG files (the template's own uint8 values, no rescaling) and their index tables."""
    from PIL import Image

    t1 = mni[0]
    for r in rows:
        patch = t1[r["_where"]]  # (x, y) for axial, (x, z) for coronal: anterior / superior at the top
        Image.fromarray(np.ascontiguousarray(patch.T[::-1]).astype(np.uint8), "L").save(folder / r["path"])
    write_index(folder, rows, ["path", "text", "patient_id", "tissue"])


def plan_mri3d(mni) -> list[dict]:
    """The 16^3 blocks to cut: index rows plus each block's voxel origin."""
    t1, gm, wm, affine = mni
    inside = t1 > 0
    cands = []
    for cell, o in _cells(inside):
        offsets = range(0, CELL_MM - PATCH_3D + 1, 4)
        for a in offsets:
            for b in offsets:
                for c in offsets:
                    p = o + np.array([a, b, c])
                    sl = tuple(slice(int(x), int(x) + PATCH_3D) for x in p)
                    lab = _tissue_label(gm[sl], wm[sl], inside[sl])
                    if lab is not None:
                        cands.append({"patient": cell, "label": lab[0], "dominant": lab[1], "origin": p})
    picked = _balanced_pick(cands, PER_CLASS_3D, np.random.default_rng(3))
    rows = []
    for n, c in enumerate(sorted(picked, key=lambda c: (c["patient"], tuple(c["origin"])))):
        side, level = _position_words(c["origin"] + PATCH_3D / 2, affine)
        text = CAPTION_3D.format(tissue=TISSUES[c["label"]], side=side, level=level)
        rows.append({"path": f"block{n:04d}.nii.gz", "text": text, "patient_id": c["patient"],
                     "tissue": c["label"], "_where": c["origin"]})
    return rows


def write_mri3d(folder: Path, rows: list[dict], mni) -> None:
    """NIfTI blocks: the template's uint8 values with its affine shifted to the block (world coordinates kept)."""
    import nibabel as nib

    t1, affine = mni[0], mni[3]
    for r in rows:
        p = r["_where"]
        block = np.ascontiguousarray(t1[p[0]:p[0] + PATCH_3D, p[1]:p[1] + PATCH_3D, p[2]:p[2] + PATCH_3D])
        shift = np.eye(4)
        shift[:3, 3] = p
        img = nib.Nifti1Image(block.astype(np.uint8), affine @ shift)
        img.header.set_xyzt_units("mm")
        nib.save(img, str(folder / r["path"]))
    write_index(folder, rows, ["path", "text", "patient_id", "tissue"])
