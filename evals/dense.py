"""Dense (per-token) features of frozen ViT towers for segmentation, paired with label maps.

The shard schema has no mask member, so a segmentation task's label maps travel as a *companion* shard directory
written with the same sample keys as the images: each mask sample holds the label map as its ``image`` (H x W x 1
uint8 class ids, 2D) or ``volume`` (D x H x W int16 class ids, 3D) — the layout nnU-Net uses (imagesTr / labelsTr).
Images and masks are joined by key; both go through the same crop/pad (``medfm.shards.collate.fit``) so they stay
aligned, and voxels added by padding get label -1 (ignored by the loss and the metrics).

UNETR reads several depths of the encoder, not only its output: forward hooks on the selected blocks of the frozen
tower capture their tokens (prefix tokens dropped) in one pass. Tokens are kept in memory (not in the disk cache):
n x layers x tokens x width floats, so bound large sets with the task's ``max_samples``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medfm.evals.data import SplitIndex
from medfm.evals.features import SplitDataset
from medfm.evals.protocols.base import ProtocolError


@dataclass
class DenseSplit:
    """``hidden`` [n, L, N, width] tokens of the selected blocks (deepest first); ``inputs`` [n, C, *size] the tower
    input; ``masks`` [n, *size] int64 class ids (-1 = padding); ``spacing`` [n, dims] mm per voxel (1 when the sample
    has none); ``groups`` patient ids and ``keys`` sample keys, in table order."""

    hidden: np.ndarray
    inputs: np.ndarray
    masks: np.ndarray
    spacing: np.ndarray
    groups: np.ndarray
    keys: list[str]
    grid: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.keys)


def vit_tower(model, modality: str):
    """The model's ViT tower for ``modality``, checked to have what UNETR needs (blocks, patch grid)."""
    if modality not in model.towers:
        raise ProtocolError(f"model has no {modality!r} tower (has {list(model.towers)})")
    tower = model.towers[modality]
    if modality not in ("image", "volume") or not all(hasattr(tower, a) for a in ("blocks", "grid_size",
                                                                                  "patch_size")):
        raise ProtocolError(f"segmentation needs a 2D/3D ViT tower (image/volume with blocks and a patch grid); "
                            f"{modality!r} is {type(tower).__name__}")
    return tower


def default_layers(depth: int, stages: int) -> list[int]:
    """UNETR's choice generalised: ``stages`` evenly spaced blocks, deepest first (12 blocks, 4 stages: 12, 9, 6, 3)."""
    return [max(1, int(round(depth - j * depth / stages))) for j in range(stages)]


def _label_map(sample, modality: str, n_classes: int, key: str, image_shape) -> np.ndarray:
    arr = sample.image if modality == "image" else sample.volume
    if arr is None:
        raise ProtocolError(f"mask sample {key} has no {modality} member holding the label map")
    lab = arr[..., 0] if modality == "image" else arr
    if lab.shape != tuple(image_shape):
        raise ProtocolError(f"mask of {key} has shape {list(lab.shape)} but its {modality} is {list(image_shape)}")
    lab = lab.astype(np.int64)
    bad = (lab < 0) | (lab >= n_classes)
    if bad.any():
        raise ProtocolError(f"mask of {key} has label {int(lab[bad][0])}; expected class ids 0..{n_classes - 1}")
    return lab


def _spacing(sample, modality: str) -> list[float]:
    dims = 2 if modality == "image" else 3
    sp = ((sample.meta or {}).get(modality) or {}).get("spacing")
    if isinstance(sp, (list, tuple)) and len(sp) == dims and all(float(s) > 0 for s in sp):
        return [float(s) for s in sp]
    return [1.0] * dims


class _PairDataset(SplitDataset):
    """Image samples with their label maps (same key, another shard directory)."""

    def __init__(self, index: SplitIndex, positions, mask_index: SplitIndex, mask_pos):
        super().__init__(index, positions)
        self.mask_index, self.mask_pos = mask_index, mask_pos

    def __getitem__(self, i):
        img = self.read(self.index, self.positions[i])
        return int(self.positions[i]), img, self.read(self.mask_index, self.mask_pos[i])


def join_masks(index: SplitIndex, mask_index: SplitIndex, positions) -> np.ndarray:
    """Position in ``mask_index`` of each image sample's mask (same key); a missing mask names its key."""
    where = {k: i for i, k in enumerate(mask_index.keys)}
    out = []
    for p in positions:
        key = index.keys[int(p)]
        if key not in where:
            raise ProtocolError(f"no mask for {index.split} sample {key} in {mask_index.directory} "
                                f"(split {mask_index.split}; masks are joined to images by sample key)")
        out.append(where[key])
    return np.asarray(out, dtype=np.int64)


def extract_dense(model, index: SplitIndex, mask_index: SplitIndex, modality: str, layers: list[int],
                  n_classes: int, positions=None, batch_size: int = 32, collate_overrides: dict | None = None,
                  accelerator=None) -> DenseSplit:
    """Tokens of ``layers`` (1-based block numbers) for the samples at ``positions``, with their label maps, across
    the processes of ``accelerator`` (each sample exactly once, every process gets the full result)."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from medfm.evals.devices import place
    from medfm.evals.features import _collate_config, get_accelerator
    from medfm.shards.collate import collate, fit
    from medfm.shards.plan import StepPlan

    tower = vit_tower(model, modality)
    depth = len(tower.blocks)
    bad = [i for i in layers if not 1 <= i <= depth]
    if bad:
        raise ProtocolError(f"layers {bad} out of range: the {modality} tower has {depth} blocks (1..{depth})")
    positions = np.arange(len(index)) if positions is None else np.asarray(positions, dtype=np.int64)
    mask_pos = join_masks(index, mask_index, positions)
    ccfg = _collate_config(model, modality, collate_overrides)
    plan = StepPlan(0, (modality,), (), "eval")
    axes = (0, 1) if modality == "image" else (0, 1, 2)

    def collate_fn(items):
        batch = collate([s for _, s, _ in items], plan, ccfg)
        x = batch[modality]
        size = tuple(x.shape[2:])
        masks = [fit(_label_map(m, modality, n_classes, s.key, (s.image if modality == "image" else s.volume)
                                .shape[: len(axes)]) + 1, size, axes) - 1 for _, s, m in items]
        return {"x": x, "masks": torch.from_numpy(np.stack(masks)),
                "spacing": torch.tensor([_spacing(s, modality) for _, s, _ in items], dtype=torch.float32),
                "positions": torch.tensor([p for p, _, _ in items], dtype=torch.long)}

    captured: dict[int, torch.Tensor] = {}
    hooks = [tower.blocks[i - 1].register_forward_hook(
        lambda _m, _in, out, i=i: captured.__setitem__(i, out)) for i in sorted(set(layers))]
    accelerator = accelerator or get_accelerator()
    loader = accelerator.prepare_data_loader(
        DataLoader(_PairDataset(index, positions, mask_index, mask_pos), batch_size=batch_size, shuffle=False,
                   collate_fn=collate_fn), device_placement=True)
    model = place(model, accelerator)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("hidden", "x", "masks", "spacing", "positions")}
    grid = None
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc=f"tokens {modality}/{index.split}", leave=False,
                              disable=not accelerator.is_main_process):
                captured.clear()
                tower(batch["x"])
                grid = tower.grid_size(batch["x"])
                p = tower.num_prefix_tokens
                hidden = torch.stack([captured[i][:, p:] for i in layers], dim=1).float().contiguous()
                got = accelerator.gather_for_metrics({"hidden": hidden, "x": batch["x"].float(),
                                                      "masks": batch["masks"], "spacing": batch["spacing"],
                                                      "positions": batch["positions"]})
                for k in parts:
                    parts[k].append(got[k].cpu().numpy())
    finally:
        for h in hooks:
            h.remove()
    pos = np.concatenate(parts["positions"])
    if len(pos) != len(positions) or not np.array_equal(np.sort(pos), np.sort(positions)):
        raise RuntimeError(f"dense extraction gathered {len(pos)} rows for {len(positions)} samples")
    order = np.argsort(pos, kind="stable")
    cat = {k: np.concatenate(v)[order] for k, v in parts.items()}
    accelerator.wait_for_everyone()
    return DenseSplit(cat["hidden"], cat["x"], cat["masks"], cat["spacing"], index.patients[cat["positions"]],
                      [index.keys[p] for p in cat["positions"]], tuple(grid))
