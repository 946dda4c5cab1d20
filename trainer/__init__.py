"""The GRPO-style trainer: plain PyTorch a researcher can read and change.

- `loss.py`: advantages, aggregation modes, the clipped policy loss (the objective, one file)
- `filters.py`: staleness, gibberish (zero-advantage groups are dropped in `batching.py`)
- `batching.py`: Trajectories -> samples -> micro-batches packed to a token budget
- `train.py`: `Trainer.step` (one optimiser step) and `Trainer.sft_step` (warm starts)
- `group.py`: `TrainerGroup`, the trainer of a job as N data-parallel Ray actors (rank 0 publishes)
- `publish.py`: publishing each policy version for the workers (HF checkpoint dirs, or Ray's object store)
- `checkpoint.py`: resumable checkpoints (model, optimiser, scheduler, RNG, data cursor)
- `config.py`: `TrainerConfig`, every option with its default and a one-line description

The trainer sees Trajectories and nothing else: it never imports `envs/` or `rollout_workers/`.
"""
