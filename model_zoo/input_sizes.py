"""What a tower's config fixes about its input, and the loader collate fields that follow from it.

One direction: the towers state the input sizes (``img_size``, ``in_chans``, ``n_leads``,
``max_position_embeddings`` live with the weights, in every checkpoint and release); the collate fields follow.

* A collate field left unset is derived from the tower (``derived_collate``): evaluation sizes its batches so,
  and the a-priori FLOPs (pretrain/step_flops.py, which the scaling sweep uses) and the memory estimate count at
  that shape.
* A collate field a run config states must agree with its tower (``collate_mismatch``, called by
  ``RunConfig.validate``): one line naming both fields. ``text_max_tokens`` is a truncation length, so it only has
  to fit the text tower's positions.
"""

from __future__ import annotations

import dataclasses

from medfm.model_zoo.registry import model_config


def tower_collate_fields(modality: str, tcfg) -> dict[str, tuple[str, object]]:
    """``{collate field: (tower field, value)}`` that the tower config ``tcfg`` of ``modality`` fixes."""
    out: dict[str, tuple[str, object]] = {}
    if tcfg is None:
        return out
    size = getattr(tcfg, "img_size", None)
    if modality == "image":
        if size is not None:
            out["image_size"] = ("img_size", [int(size), int(size)] if isinstance(size, int) else [int(s) for s in size])
        if getattr(tcfg, "in_chans", None) is not None:
            out["image_channels"] = ("in_chans", int(tcfg.in_chans))
    elif modality == "volume" and size is not None:
        out["volume_size"] = ("img_size", [int(s) for s in size])
    elif modality == "signal" and getattr(tcfg, "n_leads", None) is not None:
        out["signal_leads"] = ("n_leads", int(tcfg.n_leads))
    return out


def tower_configs(model_cfg) -> dict:
    """``{modality: typed tower config}`` of a MultiModalConfig, without building any module."""
    return {m: model_config(spec.arch, **spec.overrides) for m, spec in model_cfg.towers.items()}


def derived_collate(towers: dict, collate: dict | None = None) -> dict:
    """Collate fields (a dict of CollateConfig fields) with every field the towers fix filled in where unset.
    ``towers`` maps modality -> tower config."""
    out = dict(collate or {})
    for modality, tcfg in towers.items():
        for name, (_, value) in tower_collate_fields(modality, tcfg).items():
            if out.get(name) is None:
                out[name] = value
    return out


def input_collate(model_cfg, collate):
    """The CollateConfig a tower actually sees: ``collate`` (a CollateConfig) with unset fields from the towers."""
    filled = derived_collate(tower_configs(model_cfg), dataclasses.asdict(collate))
    return dataclasses.replace(collate, **{k: v for k, v in filled.items() if getattr(collate, k) is None})


def collate_mismatch(model_cfg, collate) -> str | None:
    """The first collate field stated against its tower, as one line naming both fields; None when they agree."""
    for modality, tcfg in tower_configs(model_cfg).items():
        for name, (field, value) in tower_collate_fields(modality, tcfg).items():
            stated = getattr(collate, name)
            if stated is None:
                continue
            if (list(stated) if isinstance(stated, (list, tuple)) else stated) != value:
                return (f"data.collate.{name}={_show(stated)} disagrees with model.towers.{modality} {field}="
                        f"{_show(getattr(tcfg, field))} (the tower fixes its input; leave data.collate.{name} unset to follow it)")
        positions = getattr(tcfg, "max_position_embeddings", None)
        if modality == "text" and getattr(tcfg, "path", None) is None and positions is not None \
                and collate.text_max_tokens > positions:
            return (f"data.collate.text_max_tokens={collate.text_max_tokens} exceeds model.towers.text "
                    f"max_position_embeddings={positions} (the tower has no position for the extra tokens)")
    return None


def _show(value) -> str:
    return f"[{', '.join(map(str, value))}]" if isinstance(value, (list, tuple)) else str(value)
