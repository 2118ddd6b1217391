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
