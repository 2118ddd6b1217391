"""What a real start checks, done by ``medfm launch --dry-run`` without weights or a world.

The run's PretrainModule (towers, heads, decoders, objective-owned modules) is instantiated on the meta device, so
nothing is allocated, and then (objectives vs towers was checked when the config loaded: ``RunConfig.validate``
calls ``pretrain.objectives.check_objectives_fit``):

* pretrained sources exist: text towers' ``path`` / ``tokenizer``, ``model.init_from`` and
  ``model.towers.<m>.init_from`` (``model_zoo.init_from.check_sources``), ``lm:`` objectives' ``lm_path``;
* tokenizer vs vocabulary: the tokenizer the loader will use fits the text tower's (and caption decoder's) vocabulary;
* collate shapes vs tower input sizes: one real batch from the configured shards (the real loader, world of one)
  goes through the whole PretrainModule forward on meta — a shape a tower cannot take fails here as it would at step
  one;
* memory: the per-device estimate (ZeRO-3 model states + activations + ZeRO-3 buffers + baseline,
  ``launch.memory.estimate_memory``) against ``zero.device_memory_gib`` when the recipe declares it.

Each problem is one line naming the field; ``run_preflight`` returns them all (the launcher exits 2 on any).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace


def _build_on_meta(cfg):
    """(PretrainModule on meta, problems). Pretrained text towers are built architecture-only (their weights are
    checked to exist, not read)."""
    import torch

    from medfm.model_zoo import build_multimodal
    from medfm.pretrain.objectives import PretrainModule, build_objective

    mcfg = copy.deepcopy(cfg.model)
    for spec in mcfg.towers.values():
        if "path" in spec.overrides or spec.arch == "text_minilm":
            spec.overrides["load_weights"] = False
    with torch.device("meta"):
        model = build_multimodal(mcfg)
        try:
            objectives = [build_objective(o, model) for o in cfg.objectives]
        except (ValueError, OSError) as exc:
            return None, [f"objectives: {exc}"]
    return PretrainModule(model, objectives), []


def _sources(cfg) -> list[str]:
    from medfm.model_zoo.init_from import check_sources
    from medfm.model_zoo.registry import get_spec
    from medfm.model_zoo.text import resolve_local_dir

    problems = check_sources(cfg.model)
    if "text" in cfg.model.towers:
        spec = cfg.model.towers["text"]
        defaults = getattr(get_spec(spec.arch), "defaults", {}) or {}
        for key in ("path", "tokenizer"):
            value = spec.overrides.get(key, defaults.get(key))
            if value:
                try:
                    resolve_local_dir(value)
                except FileNotFoundError as exc:
                    problems.append(f"model.towers.text.{key}: {exc}")
    for i, o in enumerate(cfg.objectives):
        lm = getattr(o, "lm_path", None)
        if lm:
            try:
                resolve_local_dir(lm)
            except FileNotFoundError as exc:
                problems.append(f"objectives[{i}].lm_path: {exc}")
    return problems


def _probe_batch(cfg, module):
    """One collated batch of the configured shards, through the real loader with the run's tokenizer."""
    from medfm.pretrain.train import build_data

    probe = copy.deepcopy(cfg)
    probe.data.num_workers = 0
    probe.data.batch_size = min(probe.data.batch_size, 2)  # shapes are what matters, not the batch
    loader = build_data(probe, SimpleNamespace(module=module), 0, 1)
    return next(iter(loader))


def _vocab_problems(cfg, module, batch) -> list[str]:
    if "text" not in module.model.towers or "text_ids" not in batch:
        return []
    vocab = module.model.towers["text"].hf_config.vocab_size
    top = int(batch["text_ids"].max()) if batch["text_ids"].numel() else -1
    problems = []
    if top >= vocab:
        problems.append(f"train.tokenizer={cfg.train.tokenizer}: token id {top} >= model.towers.text vocab_size "
                        f"{vocab} (tokenizer and text tower do not match)")
    cap = getattr(module.model, "caption_decoder", None)
    cap_vocab = getattr(cap, "vocab_size", None)
    if cap is not None and cap_vocab is not None and top >= cap_vocab:
        problems.append(f"model.caption.vocab_size={cap_vocab}: token id {top} from train.tokenizer="
                        f"{cfg.train.tokenizer} does not fit")
    return problems


def _forward_problems(module, batch, objective_names) -> list[str]:
    """Each tower's forward (and its MAE and caption paths) on meta with the batch's real shapes: a tower that
    cannot take them fails here as it would at step one. (The losses are not run: they read scalars.)"""
    import torch

    model = module.model
    meta = {k: v.to("meta") if torch.is_tensor(v) else v for k, v in batch.items()}
    shapes = {k: list(v.shape) for k, v in batch.items() if torch.is_tensor(v) and not k.endswith("_present")}
    problems = []
    for m in model.towers:
        if not any(k == m or k.startswith(f"{m}_") for k in batch if k != f"{m}_present"):
            continue
        paths = [("encode", lambda m=m: model.encode(m, meta))]
        if m in model.mae_decoders:
            paths.append(("mae", lambda m=m: model.mae(m, meta, mask_ratio=0.75)))
        if f"caption:{m}" in objective_names and "text_ids" in meta:
            paths.append(("caption", lambda m=m: model.caption_logits(m, meta)))
        for what, fn in paths:
            try:
                with torch.no_grad():
                    fn()
            except NotImplementedError:  # an op without a meta kernel: nothing learned, nothing wrong
                continue
            except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                if "meta tensors" in first:  # data-dependent (.item()): not checkable without data
                    continue
                keys = {k: v for k, v in shapes.items() if k == m or k.startswith(f"{m}_")}
                problems.append(f"data.collate: the {m} tower's {what} cannot take a batch of shapes {keys} "
                                f"({first})")
                break  # one line per tower: its other paths fail for the same reason
    return problems


def _memory_problems(cfg, size, world) -> list[str]:
    """The whole per-device estimate (model states + activations + ZeRO-3 buffers + baseline, launch/memory.py)
    against the declared device memory. The device kind is the one the workers get (launch.world.worker_env)."""
    from medfm.launch.memory import device_kind, estimate_memory
    from medfm.launch.world import worker_env

    declared = getattr(cfg.zero, "device_memory_gib", 0.0)
    if cfg.train.strategy != "zero3" or not declared:
        return []
    lo, hi = world.node_range
    device = device_kind(worker_env(world))
    mem = estimate_memory(cfg, size, world.nproc_per_node, hi, device)
    if mem.total > declared * 2**30:
        g = 2**30
        return [f"zero.device_memory_gib={declared}: the ZeRO-3 estimate needs {mem.total / g:.2f} GiB per device "
                f"(model states {mem.model_states / g:.2f}, activations {sum(mem.activations.values()) / g:.2f}, "
                f"ZeRO-3 buffers {sum(mem.zero3.values()) / g:.2f}, baseline {mem.baseline / g:.2f}); use more "
                "devices, a smaller data.batch_size, train.grad_checkpointing or zero.offload_optimizer=true"]
    return []


def run_preflight(cfg, world) -> list[str]:
    """Every problem a real start would hit (one line each), without weights, a world or a device."""
    from medfm.launch.memory import count_model

    module, problems = _build_on_meta(cfg)
    problems += _sources(cfg)
    if module is None:
        return problems
    try:
        batch = _probe_batch(cfg, module)
    except StopIteration:
        return [*problems, f"data.split={cfg.data.split}: the shards hold no sample of this split"]
    except (ValueError, OSError, KeyError) as exc:
        return [*problems, f"data: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"]
    problems += _vocab_problems(cfg, module, batch)
    problems += _forward_problems(module, batch, {o.name for o in cfg.objectives})
    problems += _memory_problems(cfg, count_model(cfg), world)
    return problems
