"""Every pretraining loss and its distributed gather rule, in one place (open_clip's loss.py style).

Contract shared by every loss here, so a 2-rank world trains exactly like one process on the global batch:
each rank returns its *share* ``L_r`` of the global loss, with ``mean_r L_r == L_global``, and the gradient that
reaches rank r's features is ``world_size * dL_global/df_r``. DDP and DeepSpeed average parameter gradients
over ranks, so after that average the update equals the single-process update. Means are therefore taken over
*global* counts (valid pairs, masked patches, target tokens): one small all-reduce of a count per loss.

Samples that miss one side of a pair (``valid`` False) are excluded by mask: their rows do not contribute a
loss term and their columns are not negatives. Nothing is dropped from the graph, so every rank's backward
touches the same parameters (a ZeRO-3 requirement) even when its whole local batch is masked.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medfm.pretrain import collectives

# Logit written into excluded columns: finite (so 0 * term stays 0, never NaN) and far below any real logit
# (|logit| <= logit_scale.exp() <= 100 for CLIP; SigLIP cells are removed by weight instead).
_EXCLUDED = -1e9
MAX_LOGIT_SCALE = math.log(100.0)


def dist_info(group=None) -> tuple[int, int]:
    """(rank, world_size) of ``group``, or (0, 1) outside torch.distributed."""
    return collectives.rank_world(group)


def gather_features(x: torch.Tensor, gather_with_grad: bool = True, group=None) -> torch.Tensor:
    """Concatenate ``x`` [B, ...] from every rank along dim 0 (rank order).

    With ``gather_with_grad`` the gather is differentiable (its backward sums the gradients of every rank's copy
    back onto the owner); without it the other ranks' rows are constants and only the local slice keeps its graph.
    Runs in a world of one too (a gather with itself), so a one-GPU NCCL run exercises it.
    """
    if not collectives.active(group):
        return x
    if gather_with_grad:
        return _GatherWithGrad.apply(x, group)
    rank, _ = dist_info(group)
    parts = collectives.all_gather(x, group)
    parts[rank] = x
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's rows (a reduce-scatter; written as
    all_reduce + slice because gloo has no reduce_scatter)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        ctx.rows = x.shape[0]
        return torch.cat(collectives.all_gather(x, group), dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = collectives.all_reduce(grad.contiguous(), "sum", ctx.group)
        rank, _ = dist_info(ctx.group)
        return grad[rank * ctx.rows:(rank + 1) * ctx.rows], None


def gather_mask(mask: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather a bool [B] mask (no gradient; collectives sends it as uint8, NCCL has no bool)."""
    if not collectives.active(group):
        return mask
    return torch.cat(collectives.all_gather(mask.bool(), group))


def global_count(count: torch.Tensor, group=None) -> torch.Tensor:
    """Sum a local count over ranks (float, no gradient)."""
    return collectives.all_reduce(count.detach().to(torch.float32).reshape(()), "sum", group)


def share_of_global_mean(local_sum: torch.Tensor, local_count: torch.Tensor, group=None) -> torch.Tensor:
    """This rank's share of ``sum_all / count_all`` (see the module docstring): ``local_sum * W / count_all``."""
    _, world = dist_info(group)
    total = global_count(local_count, group)
    return local_sum * world / total.clamp(min=1.0)


def _connected_zero(*tensors: torch.Tensor) -> torch.Tensor:
    """0 that depends on every input, so backward reaches their parameters even when nothing is valid."""
    return sum((t.sum() * 0.0) for t in tensors if t is not None and t.requires_grad) + 0.0


class ClipLoss(nn.Module):
    """Symmetric InfoNCE (CLIP) between two L2-normalised embeddings.

    ``logit_scale`` is the learnable *log* temperature (a shape-[1] parameter, CLIP init log(1/0.07)); the scale
    applied is ``exp(logit_scale)`` clamped at 100 as in CLIP.

    Forms (open_clip): ``local_loss=True`` computes only this rank's rows against the gathered columns, so logit
    memory is ``B x (W*B)`` — linear in world size — and needs ``gather_with_grad=True`` (otherwise the negatives
    contributed by other ranks would get no gradient and the update would be wrong). ``local_loss=False`` builds
    the full ``(W*B)^2`` matrix on every rank; with ``gather_with_grad=False`` its gradient is rescaled by W so
    the contract of this module holds exactly.
    """

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True, group=None):
        super().__init__()
        if local_loss and not gather_with_grad:
            raise ValueError("ClipLoss: local_loss=True needs gather_with_grad=True (negatives from other ranks "
                             "would otherwise get no gradient)")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.group = group

    def logits(self, a, b, logit_scale, valid=None):
        """(logits_a [Ba, N], logits_b [Bb, N], labels, row_valid): rows this rank scores, columns = global batch."""
        rank, world = dist_info(self.group)
        a = a.float()
        b = b.float()
        n_local = a.shape[0]
        if valid is None:
            valid = torch.ones(n_local, dtype=torch.bool, device=a.device)
        scale = logit_scale.float().clamp(max=MAX_LOGIT_SCALE).exp().reshape(())
        if world > 1 and not self.gather_with_grad:
            # Each rank holds the full global loss but its features only get the gradient of their local slice;
            # scaling that gradient by W supplies the other ranks' (identical) contributions.
            a = a + (world - 1) * (a - a.detach())
            b = b + (world - 1) * (b - b.detach())
        all_a = gather_features(a, self.gather_with_grad, self.group)
        all_b = gather_features(b, self.gather_with_grad, self.group)
        all_valid = gather_mask(valid, self.group)
        if self.local_loss:
            rows_a, rows_b, row_valid = a, b, valid
            labels = torch.arange(n_local, device=a.device) + rank * n_local
        else:
            rows_a, rows_b, row_valid = all_a, all_b, all_valid
            labels = torch.arange(all_a.shape[0], device=a.device)
        logits_a = (scale * rows_a @ all_b.T).masked_fill(~all_valid[None, :], _EXCLUDED)
        logits_b = (scale * rows_b @ all_a.T).masked_fill(~all_valid[None, :], _EXCLUDED)
        return logits_a, logits_b, labels, row_valid

    def forward(self, a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        logits_a, logits_b, labels, row_valid = self.logits(a, b, logit_scale, valid)
        ce = (F.cross_entropy(logits_a[row_valid], labels[row_valid], reduction="sum")
              + F.cross_entropy(logits_b[row_valid], labels[row_valid], reduction="sum")) / 2
        if self.local_loss:
            loss = share_of_global_mean(ce, row_valid.sum(), self.group)
        else:
            loss = ce / row_valid.sum().float().clamp(min=1.0)  # every rank holds the full global loss
        return loss + _connected_zero(a, b, logit_scale)


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (SigLIP): ``-log sigmoid(z_ij * (t * a_i.b_j + bias))`` with z = +1 on the diagonal.

    Distributed form: this rank's rows of ``a`` against the gathered ``b`` (gather-with-grad), so each cell of the
    global ``N x N`` matrix is scored on exactly one rank and memory is linear in world size. Normalised per
    valid row (as the paper's ``1/|B|``), over the global count. ``logit_bias`` is a shape-[1] parameter (SigLIP
    init -10); ``logit_scale`` the log temperature (SigLIP init log 10).
    """

    def __init__(self, group=None):
        super().__init__()
        self.group = group

    def forward(self, a, b, logit_scale, logit_bias, valid=None):
        rank, _ = dist_info(self.group)
        a = a.float()
        b = b.float()
        n_local = a.shape[0]
        if valid is None:
            valid = torch.ones(n_local, dtype=torch.bool, device=a.device)
        all_b = gather_features(b, True, self.group)
        all_valid = gather_mask(valid, self.group)
        scale = logit_scale.float().clamp(max=MAX_LOGIT_SCALE).exp().reshape(())
        logits = scale * a @ all_b.T + logit_bias.float().reshape(())
        targets = -torch.ones_like(logits)
        idx = torch.arange(n_local, device=a.device)
        targets[idx, idx + rank * n_local] = 1.0
        weight = (valid[:, None] & all_valid[None, :]).float()
        cell = -F.logsigmoid(targets * logits) * weight
        return share_of_global_mean(cell.sum(), valid.sum(), self.group) + _connected_zero(a, b, logit_scale,
                                                                                            logit_bias)


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True,
             present: torch.Tensor | None = None, group=None, eps: float = 1e-6) -> torch.Tensor:
    """MAE reconstruction loss: per-patch MSE on removed patches only (``mask`` 1 = removed).

    ``pred``/``target`` [B, N, patch_dim]; with ``norm_pix`` each target patch is normalised by its own mean and
    variance (MAE's best setting). ``present`` [B] excludes samples whose modality is a dummy. The mean is over
    masked patches of the global batch.
    """
    target = target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True, unbiased=False)
        target = (target - mean) / (var + eps).sqrt()
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
    weight = mask.float()
    if present is not None:
        weight = weight * present.float()[:, None]
    return share_of_global_mean((per_patch * weight).sum(), weight.sum(), group) + _connected_zero(pred)


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, target_valid: torch.Tensor | None = None,
                 ignore_index: int = -100, label_smoothing: float = 0.0, group=None) -> torch.Tensor:
    """Token cross-entropy (teacher forcing): ``logits`` [B, T, V] predict ``targets`` [B, T], already aligned.

    Tokens where ``target_valid`` is False (padding, absent samples) or equal to ``ignore_index`` are ignored;
    the mean is over target tokens of the global batch.
    """
    targets = targets.clone()
    if target_valid is not None:
        targets[~target_valid.bool()] = ignore_index
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index,
                         reduction="sum", label_smoothing=label_smoothing)
    count = (targets != ignore_index).sum()
    return share_of_global_mean(ce, count, group) + _connected_zero(logits)


class CoCaLoss(nn.Module):
    """CoCa: ``clip_weight * contrastive + caption_weight * caption CE``; returns both terms and the total."""

    def __init__(self, clip_weight: float = 1.0, caption_weight: float = 2.0, pad_id: int = -100,
                 contrastive: nn.Module | None = None):
        super().__init__()
        self.clip_weight = clip_weight
        self.caption_weight = caption_weight
        self.pad_id = pad_id
        self.contrastive = contrastive or ClipLoss()

    def forward(self, a, b, logit_scale, logits, targets, valid=None, target_valid=None) -> dict[str, torch.Tensor]:
        contrastive = self.contrastive(a, b, logit_scale, valid=valid)
        caption = caption_loss(logits, targets, target_valid, ignore_index=self.pad_id)
        return {"contrastive": contrastive, "caption": caption,
                "total": self.clip_weight * contrastive + self.caption_weight * caption}


class MultiPairLoss(nn.Module):
    """Several contrastive pairs at once (ImageBind): each pair scored with its own mask.

    ``pairs`` is a list of (anchor, other) modality names; ``MultiPairLoss.anchored("text", modalities)`` builds
    text↔every-other pairs. Forward takes dicts of embeddings and present-masks and returns ``{"a-b": loss}``; a
    pair's valid mask is ``present[a] & present[b]``.
    """

    def __init__(self, pairs, kind: str = "clip", local_loss: bool = True, group=None):
        super().__init__()
        if kind not in ("clip", "siglip"):
            raise ValueError(f"MultiPairLoss: kind must be 'clip' or 'siglip', got {kind!r}")
        self.pairs = [tuple(p) for p in pairs]
        self.kind = kind
        self.loss = ClipLoss(local_loss=local_loss, group=group) if kind == "clip" else SigLipLoss(group=group)

    @classmethod
    def anchored(cls, anchor: str, modalities, **kw) -> MultiPairLoss:
        return cls([(anchor, m) for m in modalities if m != anchor], **kw)

    def forward(self, embeddings: dict, present: dict, logit_scale, logit_bias=None) -> dict[str, torch.Tensor]:
        out = {}
        for a, b in self.pairs:
            valid = present[a].bool() & present[b].bool()
            if self.kind == "clip":
                out[f"{a}-{b}"] = self.loss(embeddings[a], embeddings[b], logit_scale, valid=valid)
            else:
                out[f"{a}-{b}"] = self.loss(embeddings[a], embeddings[b], logit_scale, logit_bias, valid=valid)
        return out
