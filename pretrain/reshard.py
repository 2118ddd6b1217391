"""Resume a ZeRO-3 checkpoint at another world size: DeepSpeed's universal checkpoint, made on demand.

ZeRO-3 partitions (parameters, fp32 master weights, Adam moments) are per rank, so a checkpoint written by W ranks
cannot be loaded by W' != W directly. On such a resume rank 0 converts ``<tag>/`` once with DeepSpeed's
``ds_to_universal`` (every file read weights_only, see model_zoo.checkpoint_io) into ``<tag>_universal/``
(per-parameter fp32 + exp_avg + exp_avg_sq, world-size free; the name does not match ``stepN``, so pruning and
"latest" never see it), and every rank loads it with ``load_universal``, which re-partitions for the new world.
Client state (JSON) is global except the RNG: a rank the old world did not have takes rank ``r % W``'s.
The loader continues the same global batch sequence when ``batch_size * world_size`` is unchanged
(``global_batch_for`` picks the per-rank batch that keeps it).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from medfm.model_zoo import checkpoint_io as layout
from medfm.pretrain import collectives

UNIVERSAL_SUFFIX = "_universal"


def universal_dir(root: Path, tag: str) -> Path:
    return Path(root) / f"{tag}{UNIVERSAL_SUFFIX}"


def convert(root: Path, tag: str) -> Path:
    """``<tag>/`` -> ``<tag>_universal/`` (once; written beside and renamed into place, so a crash never leaves a
    half-converted directory that looks finished)."""
    out = universal_dir(root, tag)
    if (out / layout.COMPLETE).is_file():
        return out
    from deepspeed.checkpoint import ds_to_universal

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(Path(root) / tag), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with layout.weights_only_loads():
        ds_to_universal.main(args)
    stray = Path(root) / "latest_universal"  # ds_to_universal's own pointer (at the temporary name): not ours
    if stray.is_file() and stray.read_text().strip() == tmp.name:
        stray.unlink()
    (tmp / layout.COMPLETE).write_text((Path(root) / tag / layout.COMPLETE).read_text())
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def load_other_world(engine, root: Path, tag: str, saved_world: int, rank: int) -> dict:
    """Load checkpoint ``tag`` written by ``saved_world`` ranks into this engine's world; returns the client
    state this rank resumes with. A collective (rank 0 converts, everyone loads)."""
    err = None
    if rank == 0:
        try:
            convert(root, tag)
        except (ValueError, OSError, RuntimeError, AssertionError, KeyError) as exc:
            err = f"checkpoint {Path(root) / tag}: cannot convert the world-size-{saved_world} partitions ({exc})"
    err = collectives.broadcast_object(err)
    if err:
        raise ValueError(err)
    ds = engine.ds
    ds.checkpoint_engine = layout.weights_only_checkpoint_engine(ds._config)
    ds._config.load_universal_checkpoint = True
    try:
        with layout.weights_only_loads():
            load_path, _ = ds.load_checkpoint(str(root), tag=universal_dir(root, tag).name)
    finally:
        ds._config.load_universal_checkpoint = False
    if load_path is None:
        raise ValueError(f"checkpoint {universal_dir(root, tag)}: DeepSpeed found nothing to load")
    client = layout.read_client(root, tag, rank if rank < saved_world else rank % saved_world)
    return client


def per_rank_batch(global_batch: int, grad_accum: int, world: int) -> int | None:
    """The per-rank batch that keeps ``global_batch`` at ``world`` ranks, or None when it does not divide."""
    per = global_batch // (grad_accum * world) if grad_accum * world else 0
    return per if per and per * grad_accum * world == global_batch else None


def keep_global_batch(cfg, world: int) -> None:
    """On a ZeRO-3 resume at another world size, set the per-rank batch that keeps the loader's global batch (so
    the same global batch sequence continues); ConfigError (one line) when it does not divide over ``world``."""
    from medfm.schema import ConfigError

    if not cfg.checkpoint.resume or cfg.train.strategy != "zero3":
        return
    root = Path(cfg.run_dir) / "checkpoints"
    try:
        tag = layout.resolve_tag(root, cfg.checkpoint.resume)
        saved = layout.read_complete(root, tag)["world_size"]
        global_batch = layout.read_client(root, tag, 0)["loader"]["global_batch"]
    except (ValueError, KeyError, OSError):
        return  # the resume itself reports what is wrong
    if saved == world or cfg.data.batch_size * world == global_batch:
        return
    per = per_rank_batch(global_batch, 1, world)
    if per is None:
        raise ConfigError(f"checkpoint {root / tag}: its global batch {global_batch} (world size {saved}) does not "
                          f"divide over {world} ranks; resume with a world size that divides it")
    if collectives.rank_world()[0] == 0:
        print(f"medfm: resuming {tag} of world size {saved} at world size {world}: data.batch_size "
              f"{cfg.data.batch_size} -> {per} (global batch {global_batch} kept)", flush=True)
    cfg.data.batch_size = per
    if cfg.train.micro_batch:  # the deprecated mirror follows (RunConfig.micro_batch reads data.batch_size)
        cfg.train.micro_batch = per
