"""One rank of the data-parallel test (started by torchrun from test_train.py): train on the
shared batches with gloo, then rank 0 saves the weights.

    python -m torch.distributed.run --nproc-per-node=2 tests/trainer/ddp_worker.py MODEL BATCHES.json OUT.safetensors
"""

import json
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from cwm_rl.types import Trajectory
from trainer.config import TrainerConfig
from trainer.train import Trainer


def main(model_dir: str, batches_path: str, out: str) -> None:
    dist.init_process_group("gloo")
    config = TrainerConfig.model_validate({"optim": {"lr": 1e-2, "eps": 1.0}, "filters": {"max_staleness": 100}})
    trainer = Trainer(config, model_dir, device="cpu")
    for batch in json.loads(open(batches_path).read()):
        result = trainer.step([Trajectory.model_validate(t) for t in batch])
        assert not result.skipped, result.metrics
    if dist.get_rank() == 0:
        save_file({k: v.detach().clone().contiguous() for k, v in trainer.model.state_dict().items()}, out)
    print(f"rank {dist.get_rank()} trained {trainer.step_count} steps, world {dist.get_world_size()}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:])
