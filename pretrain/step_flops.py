"""Model FLOPs of a training micro-step (forward + backward), for MFU and the cumulative ``train_flops``.

Two sources, and the metrics say which one was used (``flops_analytic`` 1 / 0):

* ``analytic`` — medfm.model_zoo.flops formulas, exact for what they model: MAE objectives (patch embedding on every
  patch, the encoder on the kept ones, the decoder on all), evaluated per micro-batch on its real input shape and
  this objective's mask ratio. Used when every configured objective is ``mae:<m>``.
* ``counter`` — torch's FlopCounterMode on the first real micro-step of each plan group (contrastive heads and
  losses, caption decoders and LMs are outside model_zoo's formulas). Backward is included because the counter
  runs around forward *and* backward.
"""

from __future__ import annotations

from medfm.model_zoo.flops import mae_forward_flops, train_flops
from medfm.pretrain.objectives import MAEObjective


def analytic_covers(module) -> bool:
    """True when model_zoo's formulas model every objective this PretrainModule can run."""
    return bool(len(module.objectives)) and all(isinstance(o, MAEObjective) for o in module.objectives)


def analytic_micro_step_flops(module, model_cfg, batch: dict, names) -> float:
    """fwd + bwd FLOPs of one micro-batch on this rank for the objectives ``names`` that ran (all MAE)."""
    objectives = {o.name: o for o in module.objectives}
    d = model_cfg.mae_decoder
    total = 0
    for name in names:
        obj = objectives[name]
        tower = module.model.towers[obj.modality]
        x = batch[obj.modality]
        per_sample = mae_forward_flops(tower, obj.mask_ratio, tuple(x.shape[1:]), decoder_width=d.width,
                                       decoder_depth=d.depth, decoder_mlp_ratio=d.mlp_ratio)
        total += train_flops(per_sample) * x.shape[0]
    return float(total)


def planned_sample_flops(run_cfg) -> float:
    """fwd + bwd FLOPs of one training sample of ``run_cfg``, known before it runs: the a-priori side of the
    ``train_flops`` the loop records (sweeps turn a compute budget into a sample count with it).

    MAE objectives use the same formula as the ``analytic`` source above, at the collate config's input shape and the
    objective's mask ratio, so for an all-MAE run it equals the recorded ``train_flops / samples_seen``. Other
    objectives are recorded by the ``counter`` source, which also sees heads, losses and decoders: here each of their
    towers counts one full forward (model_zoo's formula) x 3, a lower bound of what the counter records."""
    import torch

    from medfm.model_zoo import build_multimodal
    from medfm.model_zoo.flops import forward_flops
    from medfm.pretrain.objectives import DEFAULT_MASK_RATIO

    with torch.device("meta"):
        model = build_multimodal(run_cfg.model)
    from medfm.model_zoo.input_sizes import input_collate

    col = input_collate(run_cfg.model, run_cfg.data.collate)  # the towers' input where the collate leaves it unset

    def shape(modality, tower):
        cfg = tower.cfg
        if modality == "image" and col.image_size:
            return (col.image_channels or cfg.in_chans, *col.image_size)
        if modality == "volume" and col.volume_size:
            return (cfg.in_chans, *col.volume_size)
        if modality == "signal" and col.signal_length:
            return (col.signal_leads or cfg.n_leads, col.signal_length)
        if modality == "ehr":
            return (col.ehr_max_events,)
        if modality == "text":
            return (col.text_max_tokens,)
        return None

    total, plain = 0, set()
    dec = run_cfg.model.mae_decoder
    for o in run_cfg.objectives:
        if o.kind == "mae":
            m = o.modalities[0]
            ratio = o.mask_ratio if o.mask_ratio is not None else DEFAULT_MASK_RATIO[m]
            total += mae_forward_flops(model.towers[m], ratio, shape(m, model.towers[m]), dec.width, dec.depth,
                                       dec.mlp_ratio)
        else:
            plain.update(o.modalities)
    for m in plain:  # each tower's full forward once per step (shared between objectives by the step cache)
        total += forward_flops(model.towers[m], shape(m, model.towers[m]))
    return float(train_flops(total))
