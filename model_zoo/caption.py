"""CoCa-style causal text decoder: causal self-attention over caption tokens + cross-attention to any tower's tokens.

Each source modality gets its own linear projection into the decoder width (towers have different widths), so one
decoder can caption images, volumes or signals. ``forward`` returns next-token logits; the generative loss (shifted
cross-entropy over ``text_valid`` positions) belongs to the pretraining objective.
"""

from __future__ import annotations

import torch
from torch import nn

from medfm.model_zoo.layers import Block, init_weights_mae, run_blocks


class CaptionDecoder(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        context_dims: dict[str, int],
        width: int = 512,
        depth: int = 6,
        num_heads: int = 8,
        max_len: int = 128,
        mlp_ratio: float = 4.0,
        attn_backend: str = "auto",
        tie_embeddings: bool = True,
    ):
        super().__init__()
        if not context_dims:
            raise ValueError("caption decoder needs at least one context modality")
        self.vocab_size = vocab_size
        self.width = width
        self.max_len = max_len
        self.grad_checkpointing = False
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, width))
        self.context_proj = nn.ModuleDict({m: nn.Linear(d, width) for m, d in context_dims.items()})
        self.blocks = nn.ModuleList(
            Block(width, num_heads, mlp_ratio, backend=attn_backend, cross_dim=width) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.lm_head = nn.Linear(width, vocab_size, bias=False)
        init_weights_mae(self)
        nn.init.normal_(self.pos_embed, std=0.01)
        if tie_embeddings:
            self.lm_head.weight = self.token_embed.weight

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)

    def forward(
        self,
        text_ids: torch.Tensor,
        context: torch.Tensor,
        modality: str,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """text_ids [B, T] (T <= max_len), context [B, M, C_modality] -> logits [B, T, vocab]."""
        if modality not in self.context_proj:
            raise KeyError(f"caption decoder has no context projection for '{modality}' (has {list(self.context_proj)})")
        t = text_ids.shape[1]
        if t > self.max_len:
            raise ValueError(f"caption of {t} tokens exceeds the decoder's max_len {self.max_len}")
        x = self.token_embed(text_ids) + self.pos_embed[:, :t]
        ctx = self.context_proj[modality](context)
        x = run_blocks(
            self.blocks, x, self.grad_checkpointing, key_padding_mask=None, causal=True, context=ctx,
            context_mask=context_mask,
        )
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def generate(
        self,
        context: torch.Tensor,
        modality: str,
        bos_id: int,
        eos_id: int,
        max_new_tokens: int = 32,
        context_mask: torch.Tensor | None = None,
        all_done=None,
    ) -> torch.Tensor:
        """Greedy decoding -> ids [B, <=1+max_new_tokens] starting with bos; finished rows are padded with eos.

        ``all_done(local_done: bool) -> bool`` decides the early stop for a distributed caller (every rank must run
        the same number of decoder forwards under ZeRO-3); default: stop when this batch is done."""
        b = context.shape[0]
        ids = torch.full((b, 1), bos_id, dtype=torch.long, device=context.device)
        done = torch.zeros(b, dtype=torch.bool, device=context.device)
        for _ in range(min(max_new_tokens, self.max_len - 1)):
            nxt = self(ids, context, modality, context_mask)[:, -1].argmax(dim=-1)
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == eos_id
            if (all_done or bool)(bool(done.all())):
                break
        return ids
