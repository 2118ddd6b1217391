"""The one definition of training FLOPs: what the trainer records (``train_flops``, MFU) and what a sweep's compute
budget and scaling x-axis use.

:func:`sample_flops` is fwd + bwd FLOPs of ONE sample through the objectives a step ran, from medfm.model_zoo.flops
formulas at a per-sample input shape:

* ``mae:<m>``        patch embedding on every patch, the encoder on the kept ones, the decoder on all (at this
                     objective's mask ratio);
* every other kind   each tower it reads one full forward (once per step, however many objectives share it: the
                     StepCache); ``caption:<m>`` adds the caption decoder (cross-attending to the tower's tokens);
* ``lm:<m>``         the transformers LM is outside model_zoo's formulas: not counted (:func:`formulas_cover` is False:
                     the trainer logs ``flops_analytic`` 0, and ``train_flops`` is a lower bound).

Backward = 2x forward (``model_zoo.flops.train_flops``). Projection heads, norms and losses are not counted (the
formulas' convention, the same as torch's FlopCounterMode for matmuls and attention).

The trainer evaluates it per micro-batch at the shapes that ran (:func:`micro_batch_flops`); a sweep evaluates it
before the run at the collate config's shapes, averaged over the step plan's groups (:func:`planned_sample_flops`).
Where every input is at its configured size (images, volumes, signals are cropped/padded to it; text and EHR are
padded to the longest in the batch, at most the configured maximum) the two agree exactly.
"""

from __future__ import annotations

from medfm.model_zoo.flops import (
    caption_decoder_flops,
    default_input_shape,
    forward_flops,
    mae_forward_flops,
    num_tokens,
    train_flops,
)
from medfm.pretrain.objectives import DEFAULT_MASK_RATIO, INPUT_KEY, active_objectives


def _mask_ratio(obj_cfg) -> float:
    m = obj_cfg.modalities[0]
    return obj_cfg.mask_ratio if obj_cfg.mask_ratio is not None else DEFAULT_MASK_RATIO[m]


def _source(obj_cfg) -> str:
    """The non-text modality a caption/lm objective reads (its tower runs; text goes to the decoder/LM)."""
    return obj_cfg.name.split(":", 1)[1]


def formulas_cover(objectives) -> bool:
    """True when :func:`sample_flops` counts every module these objectives run (no transformers LM)."""
    return all(o.kind != "lm" for o in objectives)


def sample_flops(model, model_cfg, objectives, shapes: dict) -> float:
    """fwd + bwd FLOPs of one sample through ``objectives`` (ObjectiveConfigs).

    ``model`` is a MultiModalModel (real or on the meta device); ``shapes`` maps a modality to its per-sample input
    shape (no batch dim; a missing one = the tower config's native size)."""
    dec = model_cfg.mae_decoder
    total, towers = 0, []
    for o in objectives:
        if o.kind == "mae":
            m = o.modalities[0]
            total += mae_forward_flops(model.towers[m], _mask_ratio(o), shapes.get(m), dec.width, dec.depth,
                                       dec.mlp_ratio)
            continue
        reads = list(o.modalities) if o.kind == "contrastive" else [_source(o)]
        towers += [m for m in reads if m not in towers]
        if o.kind == "caption":
            tower = model.towers[_source(o)]
            n, prefix = num_tokens(tower.cfg, shapes.get(_source(o)) or default_input_shape(tower.cfg))
            text = shapes.get("text") or (model.caption_decoder.max_len,)
            total += caption_decoder_flops(model.caption_decoder, text[0], n + prefix, tower.width)
    for m in towers:
        total += forward_flops(model.towers[m], shapes.get(m))
    return float(train_flops(total))


def micro_batch_flops(module, model_cfg, batch: dict, names, memo: dict | None = None) -> float:
    """fwd + bwd FLOPs of one micro-batch on this rank for the objectives ``names`` that ran, at this batch's
    input shapes. ``memo`` keeps per-sample values by (objectives, shapes): a pretrained text tower's formula reads
    its config file, not something to do every micro-step."""
    inputs = {m: batch[k] for m, k in INPUT_KEY.items() if k in batch}
    if not inputs:
        return 0.0
    shapes = {m: tuple(x.shape[1:]) for m, x in inputs.items()}
    key = (tuple(names), tuple(sorted(shapes.items())))
    memo = {} if memo is None else memo
    if key not in memo:
        objectives = [o.cfg for o in module.objectives if o.name in set(names)]
        memo[key] = sample_flops(module.model, model_cfg, objectives, shapes)
    return memo[key] * next(iter(inputs.values())).shape[0]


def _collate_shapes(run_cfg, model) -> dict:
    """Per-sample input shapes the collate config gives each modality, unset fields from the towers
    (model_zoo.input_sizes: the one direction); a modality left out is decided per batch."""
    from medfm.model_zoo.input_sizes import input_collate

    col, shapes = input_collate(run_cfg.model, run_cfg.data.collate), {}
    for m, tower in model.towers.items():
        cfg = tower.cfg
        if m == "image" and col.image_size:
            shapes[m] = (col.image_channels or cfg.in_chans, *col.image_size)
        elif m == "volume" and col.volume_size:
            shapes[m] = (cfg.in_chans, *col.volume_size)
        elif m == "signal" and col.signal_length:
            shapes[m] = (col.signal_leads or cfg.n_leads, col.signal_length)
        elif m == "ehr":
            shapes[m] = (col.ehr_max_events,)
        elif m == "text":
            shapes[m] = (col.text_max_tokens,)
    return shapes


def plan_mix(run_cfg) -> list[tuple[float, list]]:
    """(share of steps, objective configs that run) per step-plan group: the mix a run of ``run_cfg`` trains on."""
    from medfm.shards.mix import normalize_weights
    from medfm.shards.plan import StepPlan, StepPlanner, _canonical

    plan = run_cfg.data.plan
    if not plan.groups:  # the loader infers one group "all" from the data: every objective runs
        return [(1.0, list(run_cfg.objectives))]
    planner = StepPlanner(plan)
    if plan.policy == "all":
        return [(1.0, active_objectives(run_cfg.objectives, planner(0)))]
    n = len(planner.groups)
    weights = normalize_weights([g.weight for g in planner.groups], "plan.groups weights") \
        if plan.policy == "weighted" else [1.0 / n] * n
    # One plan per group, as StepPlanner gives it on a step that picks the group.
    plans = [StepPlan(-1, _canonical(g.modalities), tuple(dict.fromkeys(g.objectives)), g.name)
             for g in planner.groups]
    return [(w, active_objectives(run_cfg.objectives, p)) for w, p in zip(weights, plans)]


def planned_sample_flops(run_cfg) -> float:
    """fwd + bwd FLOPs of one training sample of ``run_cfg``, known before it runs (sweeps turn a compute budget
    into a sample count with it): :func:`sample_flops` at the collate config's shapes, weighted by the step plan's
    group shares (``round_robin`` exact over whole rounds, ``weighted`` in expectation)."""
    import torch

    from medfm.model_zoo import build_multimodal

    with torch.device("meta"):
        model = build_multimodal(run_cfg.model)
    shapes = _collate_shapes(run_cfg, model)
    return float(sum(w * sample_flops(model, run_cfg.model, objs, shapes) for w, objs in plan_mix(run_cfg)))
