"""medfm.pretrain: objectives, the DeepSpeed ZeRO-3 / DDP engine, checkpoints, tracking and the training loop.

    losses.py      ClipLoss, SigLipLoss, CoCaLoss, MultiPairLoss, mae_loss, caption_loss (+ gather rules)
    objectives.py  ObjectiveConfig, mae:/contrastive:/caption:/lm: objectives, PretrainModule
    config.py      RunConfig (data, model, objectives, optim, train, zero, checkpoint, tracking, eval),
                   load_run_config(path, overrides)
    ds_config.py   deepspeed_config(run_config, world_size)
    engine.py      Engine (strategy zero3 | ddp), init_distributed()
    train.py       run(run_config) -> RunResult: Trainer (train / train_step / log_step / maybe_checkpoint)
    metrics.py     TrainMetrics: the loop's losses, tokens, FLOPs, MFU, samples per step and in total
    checkpoint.py  CheckpointManager (+ consolidate(), model_state_dict() re-exported from model_zoo.checkpoint_io)
    step_flops.py  the one FLOP definition (model_zoo.flops formulas): per micro-batch (trainer), a priori (sweeps)
    faults.py      MEDFM_FAULT fault injection for restart tests (kill-after-checkpoint, kill-in-save)
    tracking.py    Tracker (mlflow on rank 0, metrics.jsonl, progress bar)
    cli.py         `medfm pretrain CONFIG.yaml [key=value ...]`, `medfm pretrain consolidate` (old: pretrain-consolidate)

Submodules are imported on use, so ``import medfm.pretrain`` stays cheap (no DeepSpeed import).
"""
