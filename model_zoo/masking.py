"""MAE per-sample random masking, padding-aware and reproducible with an explicit torch.Generator."""

from __future__ import annotations

import torch


def random_masking(
    x: torch.Tensor,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random subset of tokens per sample.

    x: [B, N, C] patch tokens (no prefix tokens). valid: optional bool [B, N] (False = padding); padded tokens are
    always dropped before real ones, so kept tokens are real whenever a sample has enough of them.

    Returns (x_kept [B, K, C], mask [B, N] float with 1 = removed, ids_restore [B, N], kept_valid [B, K] bool) where
    K = int(N * (1 - mask_ratio)) is the same for every sample (static shapes).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    b, n, c = x.shape
    keep = max(1, int(n * (1.0 - mask_ratio)))
    gen_device = generator.device if generator is not None else x.device
    noise = torch.rand(b, n, generator=generator, device=gen_device).to(x.device)
    if valid is not None:
        noise = noise + (~valid.to(torch.bool)).to(noise.dtype) * 2.0  # padding sorts after every real token
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    x_kept = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, c))
    mask = torch.ones(b, n, device=x.device, dtype=x.dtype)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    if valid is None:
        kept_valid = torch.ones(b, keep, dtype=torch.bool, device=x.device)
    else:
        kept_valid = torch.gather(valid.to(torch.bool), 1, ids_keep)
    return x_kept, mask, ids_restore, kept_valid
