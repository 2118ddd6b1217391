"""MAE reconstructions as a PNG (input / masked / reconstruction), the first thing people check of an MAE run.

``write_mae_figures(model, cfg, run_dir, rank)`` runs at the end of training on *every* rank (under ZeRO-3 each
forward gathers partitioned parameters collectively, so all ranks run the same forwards on the same samples) and
rank 0 writes ``<run_dir>/mae_<modality>.png`` for each image / volume MAE objective (a volume shows its middle
slice). The samples are the first few of the training sources holding the modality, collated as training collates
them; masks are seeded, so a rerun draws the same figure. With norm-pix targets the prediction is in per-patch
normalised units; it is mapped back with the true patch's mean and std (as the MAE paper's figures do) and the kept
patches are pasted in, so the picture shows what the decoder inferred for the removed ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

FIGURE_MODALITIES = ("image", "volume")


def _samples(cfg, modality: str, n: int) -> list:
    from medfm.shards.manifest import load_manifest, shard_paths
    from medfm.shards.sample import decode_sample
    from medfm.shards.stream import ShardReader

    out, reader = [], ShardReader()
    try:
        for src in cfg.data.sources:
            manifest = load_manifest(src.path)
            for tar in shard_paths(src.path, manifest, split=cfg.data.split):
                for i in range(reader.count(str(tar))):
                    sample = decode_sample(reader.read(str(tar), i))
                    in_split = cfg.data.split is None or (sample.meta or {}).get("split") == cfg.data.split
                    if in_split and getattr(sample, modality, None) is not None:
                        out.append(sample)
                    if len(out) == n:
                        return out
    finally:
        reader.close()
    return out


def _to_images(x: torch.Tensor, modality: str) -> np.ndarray:
    """[B, C, H, W] or [B, C, D, H, W] -> [B, H, W] (first channel; a volume's middle slice)."""
    x = x[:, 0]
    if modality == "volume":
        x = x[:, x.shape[1] // 2]
    return x.float().cpu().numpy()


@torch.no_grad()
def reconstruct(model, batch: dict, modality: str, mask_ratio: float, norm_pix: bool = True, seed: int = 0):
    """(input, masked input, reconstruction) as [B, H, W] arrays in the collated input's units."""
    tower = model.towers[modality]
    x = batch[modality]
    gen = torch.Generator(device=x.device).manual_seed(seed)
    out = model.mae(modality, batch, mask_ratio=mask_ratio, generator=gen)
    target, pred, mask = out["target"].float(), out["pred"].float(), out["mask"].float()[..., None]
    if norm_pix:  # back from per-patch normalised units, with the true patch's statistics
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True, unbiased=False)
        pred = pred * (var + 1e-6).sqrt() + mean
    grid = tower.grid_size(x)
    recon = tower.unpatchify(pred * mask + target * (1 - mask), grid)
    masked = tower.unpatchify(target * (1 - mask) + target.min() * mask, grid)
    return _to_images(x, modality), _to_images(masked, modality), _to_images(recon, modality)


def plot_reconstructions(images, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inp, masked, recon = images
    n = len(inp)
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
    for i in range(n):
        lo, hi = float(inp[i].min()), float(inp[i].max())
        for j, (img, name) in enumerate(((inp, "input"), (masked, "masked"), (recon, "reconstruction"))):
            ax = axes[i][j]
            ax.imshow(img[i], cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
    fig.suptitle(title + "\n(norm-pix: removed patches shown with the true patch mean/std; flat = mean prediction)",
                 fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_mae_figures(model, cfg, run_dir, rank: int = 0, n: int = 6) -> list[Path]:
    """Every rank calls this; rank 0 writes ``mae_<modality>.png`` per image / volume MAE objective."""
    from medfm.model_zoo.layers import whole_params
    from medfm.pretrain.objectives import DEFAULT_MASK_RATIO
    from medfm.pretrain.precision import batch_to_device
    from medfm.shards.collate import collate
    from medfm.shards.plan import StepPlan

    written = []
    for obj in cfg.objectives:
        modality = obj.name.split(":", 1)[1] if obj.name.startswith("mae:") else None
        if modality not in FIGURE_MODALITIES or modality not in model.mae_decoders:
            continue
        try:  # the same files on every rank, so every rank takes the same branch (no collective is skipped alone)
            samples = _samples(cfg, modality, n)
        except (OSError, ValueError) as exc:  # e.g. a remote source (URL template): no local shards to read
            if rank == 0:
                print(f"medfm pretrain: MAE figure for {modality} skipped ({exc})", file=sys.stderr)
            continue
        if not samples:
            continue
        # The weights' device and dtype (bf16 under ZeRO-3 bf16), with the one cast policy the engine applies.
        weight = next(model.parameters())
        batch = collate(samples, StepPlan(0, (modality,), (), "mae_figure"), cfg.data.collate)
        batch = batch_to_device(batch, weight.device, weight.dtype)
        ratio = obj.mask_ratio if obj.mask_ratio is not None else DEFAULT_MASK_RATIO[modality]
        was_training = model.training
        model.eval()
        # Outside the engine's forward, ZeRO-3 does not gather parameters used directly (cls token, mask token):
        # gather the tower and its decoder whole, on every rank (a collective; a no-op without ZeRO-3).
        params = [*model.towers[modality].parameters(), *model.mae_decoders[modality].parameters()]
        try:
            with whole_params(params):
                images = reconstruct(model, batch, modality, ratio, obj.norm_pix)
        except RuntimeError as exc:
            # Known: a ZeRO-3 tower whose submodules hold partitioned (non-persistent) parameters, e.g. ViT-L at the
            # default persistence threshold, raises "Cannot free a ZeRO-3 parameter while it is still active in
            # submodules" when the gather ends. Every rank runs the same forwards and fails alike, so no rank
            # waits; the run has finished and its checkpoint is written: the figure is skipped with one line.
            if rank == 0:
                print(f"medfm pretrain: MAE figure for {modality} not drawn ({str(exc).splitlines()[0][:200]})",
                      file=sys.stderr)
            continue
        finally:
            model.train(was_training)
        if rank == 0:
            try:  # a plotting failure must not fail a finished run (no collective follows, so no rank waits)
                written.append(plot_reconstructions(images, Path(run_dir) / f"mae_{modality}.png",
                                                    f"{cfg.name}: MAE {modality}, mask ratio {ratio:g}"))
            except (OSError, ValueError, RuntimeError) as exc:
                print(f"medfm pretrain: MAE figure for {modality} not written ({exc})", file=sys.stderr)
    return written
