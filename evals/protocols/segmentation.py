"""Segmentation on a frozen 2D/3D ViT: a small UNETR-style decoder (Hatamizadeh et al., 2022) trained on the
tower's tokens, scored by Dice and 95% Hausdorff distance per class with patient-level bootstrap CIs.

UNETR, for a patch size of 2^S: the deepest selected block's tokens (a grid at 1/2^S resolution) are decoded up
S stages of x2 transposed convolutions; at each stage j a skip from a shallower block is brought to that
resolution by j transposed convolutions, and the last stage's skip is a conv block on the input itself. The tower
stays frozen (its tokens are extracted once, evals/dense.py); only the decoder trains, with MONAI's Dice + cross-
entropy loss. With a val split the decoder of the best val mean Dice (checked every ``val_every`` epochs) is kept.

Metrics follow MONAI (include_background=False; a class absent from a sample's ground truth is excluded from that
class's mean), so results equal ``monai.metrics.compute_dice`` / ``compute_hausdorff_distance(percentile=95)`` on
the same predictions (tested). HD95 is in mm when the samples carry a spacing (volumes), else in pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from medfm.evals import metrics as M
from medfm.evals.bootstrap import bootstrap_ci
from medfm.evals.dense import DenseSplit
from medfm.evals.protocols.base import ProtocolError, ProtocolResult, Row


@dataclass
class SegmentationOptions:
    layers: list[int] = field(default_factory=list)  # 1-based blocks, deepest first; [] = UNETR spacing (12,9,6,3)
    feature_size: int = 16  # UNETR's channel unit: stage j has feature_size * 2^(S-j) channels (capped at 8x)
    epochs: int = 40
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-5
    dice_weight: float = 1.0  # loss = CE + dice_weight * soft Dice (MONAI DiceCELoss)
    val_every: int = 5
    hd_percentile: float = 95.0
    seed: int = 0
    device: str = "auto"  # where the decoder trains: auto = cuda when available, else cpu

    def validate(self):
        if self.epochs < 1 or self.batch_size < 1 or self.feature_size < 1 or self.val_every < 1:
            raise ValueError("epochs, batch_size, feature_size and val_every must be >= 1")
        if not 0 < self.hd_percentile <= 100:
            raise ValueError(f"hd_percentile must be in (0, 100], got {self.hd_percentile}")


def upsampling_stages(patch_size) -> list[tuple[int, ...]]:
    """Per-stage x2 factors per axis that undo a (power-of-two, possibly anisotropic) patch size."""
    patch = tuple(int(p) for p in np.atleast_1d(patch_size))
    logs = []
    for p in patch:
        k = int(round(math.log2(p))) if p >= 1 else -1
        if k < 0 or 2 ** k != p:
            raise ProtocolError(f"segmentation decoder needs power-of-two patch sizes, tower has {list(patch)}")
        logs.append(k)
    return [tuple(2 if s < k else 1 for k in logs) for s in range(max(logs))]


def build_decoder(dims: int, in_chans: int, width: int, patch_size, n_classes: int, feature_size: int = 16):
    """The UNETR decoder as an nn.Module: ``forward(hidden [B, S, N, width], x [B, C, *size]) -> logits``."""
    import torch
    from einops import rearrange
    from torch import nn

    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    deconv = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
    stages = upsampling_stages(patch_size if dims == 3 or np.ndim(patch_size) else (patch_size,) * 2)
    n_stages = len(stages)
    if n_stages == 0:
        raise ProtocolError("segmentation decoder needs a patch size > 1")

    def ch(level):  # channels at resolution level j (0 = token grid, S = input)
        return feature_size * 2 ** min(n_stages - level, 3)

    def block(cin, cout):  # UNETR's residual-free UnetBasicBlock: (conv3 + norm + LeakyReLU) x 2
        return nn.Sequential(conv(cin, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.LeakyReLU(0.01),
                             conv(cout, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.LeakyReLU(0.01))

    def up(cin, cout, factor):
        return deconv(cin, cout, factor, stride=factor)

    class UNETRDecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.token_norm = nn.LayerNorm(width)  # block outputs are pre-norm: bring every depth to one scale
            self.bottom = block(width, ch(0))
            # skip j (1..S-1): hidden state j brought up j stages; skip S: the input image
            self.skips = nn.ModuleList()
            for j in range(1, n_stages):
                layers = [up(width, ch(j), stages[0])]
                for s in range(1, j):
                    layers += [block(ch(j), ch(j)), up(ch(j), ch(j), stages[s])]
                self.skips.append(nn.Sequential(*layers, block(ch(j), ch(j))))
            self.skips.append(block(in_chans, ch(n_stages)))
            self.ups = nn.ModuleList(up(ch(j - 1), ch(j), stages[j - 1]) for j in range(1, n_stages + 1))
            self.fuse = nn.ModuleList(block(2 * ch(j), ch(j)) for j in range(1, n_stages + 1))
            self.head = conv(ch(n_stages), n_classes, 1)

        def grid(self, hidden, grid):
            t = self.token_norm(hidden)
            if dims == 2:
                return rearrange(t, "b (h w) c -> b c h w", h=grid[0], w=grid[1])
            return rearrange(t, "b (d h w) c -> b c d h w", d=grid[0], h=grid[1], w=grid[2])

        def forward(self, hidden: torch.Tensor, x: torch.Tensor, grid) -> torch.Tensor:
            if hidden.shape[1] < n_stages:
                raise ValueError(f"decoder needs {n_stages} token depths, got {hidden.shape[1]}")
            d = self.bottom(self.grid(hidden[:, 0], grid))
            for j in range(1, n_stages + 1):
                skip = self.skips[j - 1](self.grid(hidden[:, j], grid) if j < n_stages else x)
                d = self.fuse[j - 1](torch.cat([self.ups[j - 1](d), skip], dim=1))
            return self.head(d)

    return UNETRDecoder(), n_stages


def _dice_ce_loss(logits, target, n_classes: int, dice_weight: float):
    """MONAI DiceCELoss (softmax, batch-summed soft Dice over all classes, smooth 1e-5); label -1 is ignored."""
    import torch.nn.functional as F

    valid = target >= 0
    ce = F.cross_entropy(logits, target.clamp_min(0), reduction="none")
    ce = (ce * valid).sum() / valid.sum().clamp_min(1)
    prob = logits.softmax(dim=1) * valid.unsqueeze(1)
    onehot = F.one_hot(target.clamp_min(0), n_classes).movedim(-1, 1).to(prob.dtype) * valid.unsqueeze(1)
    dims = [0] + list(range(2, logits.ndim))
    inter = (prob * onehot).sum(dims)
    denom = prob.sum(dims) + onehot.sum(dims)
    dice = 1 - (2 * inter + 1e-5) / (denom + 1e-5)
    return ce + dice_weight * dice.mean()


def _device(opts: SegmentationOptions) -> str:
    from medfm.evals.devices import default_device

    return str(default_device()) if opts.device == "auto" else opts.device


def _predict(decoder, split: DenseSplit, batch_size: int, device) -> np.ndarray:
    import torch

    out = []
    decoder.eval()
    with torch.no_grad():
        for s in range(0, len(split), batch_size):
            h = torch.from_numpy(split.hidden[s:s + batch_size]).to(device)
            x = torch.from_numpy(split.inputs[s:s + batch_size]).to(device)
            out.append(decoder(h, x, split.grid).argmax(dim=1).cpu().numpy())
    pred = np.concatenate(out) if out else np.zeros((0,) + split.masks.shape[1:], np.int64)
    return np.where(split.masks < 0, -1, pred)


def _mean_fg_dice(pred: np.ndarray, split: DenseSplit, n_classes: int) -> float:
    vals = [M.segmentation_scores(p, t, n_classes, percentile=95.0)[0] for p, t in zip(pred, split.masks)]
    v = np.asarray(vals, dtype=np.float64)
    return float(np.nanmean(v)) if np.isfinite(v).any() else 0.0


def train_decoder(train: DenseSplit, val: DenseSplit | None, n_classes: int, opts: SegmentationOptions,
                  patch_size, in_chans: int):
    """Fit the decoder on frozen tokens; returns (decoder, info)."""
    import copy

    import torch

    dims = train.masks.ndim - 1
    n_fg = [int((train.masks == c).sum()) for c in range(n_classes)]
    missing = [c for c in range(n_classes) if n_fg[c] == 0]
    if missing:
        raise ProtocolError(f"class id {missing[0]} never occurs in the training masks (voxel counts {n_fg})")
    torch.manual_seed(opts.seed)
    decoder, n_stages = build_decoder(dims, in_chans, train.hidden.shape[-1], patch_size, n_classes,
                                      opts.feature_size)
    device = _device(opts)
    decoder = decoder.to(device)
    if train.hidden.shape[1] != n_stages:
        raise ProtocolError(f"the decoder for patch size {patch_size} needs {n_stages} token depths, "
                            f"got {train.hidden.shape[1]} layers")
    opt = torch.optim.AdamW(decoder.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    steps_per_epoch = math.ceil(len(train) / opts.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, opts.lr, total_steps=opts.epochs * steps_per_epoch,
                                                pct_start=0.1)
    gen = torch.Generator().manual_seed(opts.seed)
    hidden, inputs = torch.from_numpy(train.hidden).to(device), torch.from_numpy(train.inputs).to(device)
    masks = torch.from_numpy(train.masks).to(device)
    best, best_state, history = -1.0, None, {}
    for epoch in range(1, opts.epochs + 1):
        decoder.train()
        for idx in torch.randperm(len(train), generator=gen).to(device).split(opts.batch_size):
            loss = _dice_ce_loss(decoder(hidden[idx], inputs[idx], train.grid), masks[idx], n_classes,
                                 opts.dice_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if val is not None and len(val) and (epoch % opts.val_every == 0 or epoch == opts.epochs):
            score = _mean_fg_dice(_predict(decoder, val, opts.batch_size, device), val, n_classes)
            history[epoch] = score
            if score > best:
                best, best_state = score, (epoch, copy.deepcopy(decoder.state_dict()))
    info = {"stages": n_stages, "epochs": opts.epochs, "final_loss": float(loss.detach()),
            "params": int(sum(p.numel() for p in decoder.parameters()))}
    if best_state is not None:
        decoder.load_state_dict(best_state[1])
        info.update(best_epoch=best_state[0], val_dice=history)
    return decoder, info


def segmentation_probe(name: str, class_names: list[str], train: DenseSplit, val: DenseSplit | None,
                       test: DenseSplit, patch_size, in_chans: int, opts: SegmentationOptions | None = None,
                       n_boot: int = 1000, seed: int = 0) -> ProtocolResult:
    """Train on ``train`` (select on ``val``), then Dice / HD per foreground class of ``test`` with CIs."""
    opts = opts or SegmentationOptions()
    k = len(class_names)
    if k < 2:
        raise ProtocolError(f"task {name}: classes must list the label-map classes in id order, background first")
    if len(train) == 0 or len(test) == 0:
        raise ProtocolError(f"task {name}: empty {'train' if len(train) == 0 else 'test'} split")
    try:
        decoder, info = train_decoder(train, val, k, opts, patch_size, in_chans)
    except ProtocolError as exc:
        raise ProtocolError(f"task {name}: {exc}") from None
    pred = _predict(decoder, test, opts.batch_size, _device(opts))
    per = [M.segmentation_scores(p, t, k, sp, opts.hd_percentile) for p, t, sp in zip(pred, test.masks,
                                                                                     test.spacing)]
    dice = np.stack([d for d, _ in per])  # [n, K-1]
    hd = np.stack([h for _, h in per])
    units = "mm" if not np.allclose(test.spacing, 1.0) else "voxels"
    hd_name = f"hd{int(opts.hd_percentile)}" if float(opts.hd_percentile).is_integer() else "hd"
    rows = []

    def est(metric, values):  # Dice in [0, 1], Hausdorff distances >= 0
        bounds = (0.0, 1.0) if metric.startswith("dice") else (0.0, np.inf)
        return bootstrap_ci(M.nanmean_defined, [values], groups=test.groups, n_boot=n_boot, seed=seed, bounds=bounds)

    for j, cname in enumerate(class_names[1:]):
        for metric, values, params in (("dice", dice[:, j], {"class": cname}),
                                       (hd_name, hd[:, j], {"class": cname, "units": units})):
            try:
                rows.append(Row(metric, est(metric, values), params))
            except M.MetricError as exc:
                rows.append(Row(metric, f"class {cname!r}: {exc}", params))
    with np.errstate(invalid="ignore"):  # a sample may hold none of the foreground classes: NaN, skipped
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            dice_mean, hd_mean = np.nanmean(dice, axis=1), np.nanmean(hd, axis=1)
    for metric, values, params in (("dice_mean", dice_mean, {}), (f"{hd_name}_mean", hd_mean, {"units": units})):
        try:
            rows.append(Row(metric, est(metric, values), params))
        except M.MetricError as exc:
            rows.append(Row(metric, str(exc), params))
    info.update(classes=list(class_names), units=units, grid=list(test.grid))
    return ProtocolResult(rows, pred, info)
