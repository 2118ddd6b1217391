"""The DeepSpeed config dict, generated from the RunConfig (never hand-written, so the two cannot disagree)."""

from __future__ import annotations


def deepspeed_config(cfg, world_size: int) -> dict:
    """ZeRO-3 config for ``cfg`` (a RunConfig) in a world of ``world_size`` ranks.

    The optimizer and LR schedule are built by medfm (torch AdamW + warmup/cosine LambdaLR) and handed to
    ``deepspeed.initialize``, so they are identical under ``strategy: ddp``; DeepSpeed owns partitioning,
    accumulation, clipping and checkpoints.
    """
    t, z = cfg.train, cfg.zero
    zero = {
        "stage": 3,
        "stage3_param_persistence_threshold": z.stage3_param_persistence_threshold,
        "stage3_prefetch_bucket_size": z.stage3_prefetch_bucket_size,
        "stage3_max_live_parameters": z.stage3_max_live_parameters,
        "stage3_max_reuse_distance": z.stage3_max_reuse_distance,
        "reduce_bucket_size": z.reduce_bucket_size,
        "overlap_comm": z.overlap_comm,
        "contiguous_gradients": z.contiguous_gradients,
        # Consolidation goes through zero_to_fp32 (exact fp32 master weights), not a 16-bit gather at save time.
        "stage3_gather_16bit_weights_on_model_save": False,
    }
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if z.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum(world_size),
        "train_batch_size": cfg.global_batch(world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        # torch AdamW also with offload: DeepSpeedCPUAdam would need a C++ JIT build at start.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # medfm logs; keep DeepSpeed's own step prints off
        "wall_clock_breakdown": False,
    }
