"""Report generation from the model's own caption decoder (``medfm.model_zoo`` CaptionDecoder.generate, greedy),
distributed like feature extraction: each process decodes its share of the samples, ``gather_for_metrics`` brings
the token ids back, and every sample is decoded exactly once.

The decoder emits ids of the tokenizer it was pretrained with (pretrain's ``train.tokenizer``): ``tower`` = the text
tower's Hugging Face tokenizer ([CLS] ... [SEP] as begin/end), ``bytes`` = medfm.shards.collate.ByteTokenizer
(1 = begin, 2 = end, byte b -> b + 3). The task must name the same one, or the text is gibberish.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from medfm.evals.data import SplitIndex, read_samples
from medfm.evals.protocols.base import ProtocolError


@dataclass
class GenerationOptions:
    tokenizer: Literal["", "auto", "tower", "bytes"] = ""  # pretrain's train.tokenizer; "" = the suite's text_tokenizer
    max_new_tokens: int = 64
    findings: dict[str, list[str]] = field(default_factory=dict)  # finding -> keywords, for finding-level F1

    def validate(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


class _Codec:
    """begin/end ids and ids -> text for one tokenizer family."""

    def __init__(self, model, kind: str):
        from medfm.evals.features import text_tokenizer_kind

        self.kind = kind = text_tokenizer_kind(model, kind or "auto")
        if kind == "bytes":
            self.bos, self.eos, self.tok = 1, 2, None
            return
        if "text" not in model.towers:
            raise ProtocolError("generation with tokenizer: tower needs a text tower (or use tokenizer: bytes)")
        from medfm.evals.features import text_tokenizer_spec
        from medfm.model_zoo.tokenizers import hf_tokenizer

        tok = hf_tokenizer(text_tokenizer_spec(model, kind))
        bos = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        eos = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        if bos is None or eos is None:
            raise ProtocolError(f"the text tower's tokenizer ({type(tok).__name__}) has no begin/end token ids")
        self.bos, self.eos, self.tok = int(bos), int(eos), tok

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids[1:]]  # drop the begin token
        ids = ids[: ids.index(self.eos)] if self.eos in ids else ids
        if self.kind == "bytes":
            return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")
        return self.tok.decode(ids, skip_special_tokens=True).strip()


def generate_reports(model, index: SplitIndex, modality: str, positions, opts: GenerationOptions,
                     batch_size: int = 32, collate_overrides: dict | None = None,
                     accelerator=None) -> tuple[list[str], list[str]]:
    """(generated, reference) texts for the samples at ``positions``, in that order."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from medfm.evals.features import SplitDataset, _collate_config, get_accelerator
    from medfm.shards.collate import collate
    from medfm.shards.plan import StepPlan

    decoder = getattr(model, "caption_decoder", None)
    if decoder is None:
        raise ProtocolError("generation needs the model's caption decoder (model.caption.enabled is false)")
    if modality not in decoder.context_proj:
        raise ProtocolError(f"the caption decoder does not attend to {modality!r} (context: "
                            f"{list(decoder.context_proj)})")
    if modality not in model.towers:
        raise ProtocolError(f"model has no {modality!r} tower (has {list(model.towers)})")
    codec = _Codec(model, opts.tokenizer)
    if max(codec.bos, codec.eos) >= decoder.vocab_size:
        raise ProtocolError(f"tokenizer {opts.tokenizer!r} ids exceed the decoder's vocabulary of "
                            f"{decoder.vocab_size}: was the model pretrained with another train.tokenizer?")
    positions = np.asarray(positions, dtype=np.int64)
    ccfg = _collate_config(model, modality, collate_overrides)
    plan = StepPlan(0, (modality,), (), "eval")
    tower = model.towers[modality]
    width = 1 + min(opts.max_new_tokens, decoder.max_len - 1)

    def collate_fn(items):
        batch = collate([s for _, s in items], plan, ccfg)
        out = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        out["positions"] = torch.tensor([p for p, _ in items], dtype=torch.long)
        return out

    accelerator = accelerator or get_accelerator()
    loader = accelerator.prepare_data_loader(DataLoader(SplitDataset(index, positions), batch_size=batch_size,
                                                        shuffle=False, collate_fn=collate_fn), device_placement=True)
    from medfm.evals.devices import place

    model = place(model, accelerator)

    def all_done(local: bool) -> bool:  # stop only when every process's batch is done: equal decoder forwards
        if accelerator.num_processes == 1:
            return local
        flags = accelerator.reduce(torch.tensor([float(local)], device=accelerator.device), reduction="sum")
        return int(flags.item()) == accelerator.num_processes

    ids_all, pos_all = [], []
    with torch.no_grad():
        for batch in tqdm(loader, desc=f"generate {modality}/{index.split}", leave=False,
                          disable=not accelerator.is_main_process):
            x, masks = tower.batch_inputs(batch)
            tokens = tower(x, **masks)
            valid = tower.token_valid(x, **masks)
            ctx_mask = None
            if valid is not None:  # prefix tokens (CLS, registers) are always attendable, as in training
                pre = torch.ones(valid.shape[0], tower.num_prefix_tokens, dtype=torch.bool, device=valid.device)
                ctx_mask = torch.cat([pre, valid], dim=1)
            ids = decoder.generate(tokens, modality, codec.bos, codec.eos, opts.max_new_tokens, ctx_mask,
                                   all_done=all_done)
            ids = torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=codec.eos)  # equal widths to gather
            got = accelerator.gather_for_metrics({"ids": ids, "positions": batch["positions"]})
            ids_all.append(got["ids"].cpu().numpy())
            pos_all.append(got["positions"].cpu().numpy())
    pos = np.concatenate(pos_all)
    if len(pos) != len(positions) or not np.array_equal(np.sort(pos), np.sort(positions)):
        raise RuntimeError(f"generation gathered {len(pos)} rows for {len(positions)} samples")
    order = {int(p): i for i, p in enumerate(pos)}
    ids = np.concatenate(ids_all)
    hyps = [codec.decode(ids[order[int(p)]]) for p in positions]
    refs = [s.text or "" for s in read_samples(index, positions)]  # the shard's text.txt is the reference
    accelerator.wait_for_everyone()
    return hyps, refs
