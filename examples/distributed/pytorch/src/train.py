"""An all_reduce over every process of the job, with the env:// rendezvous."""
import os

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank())])
dist.all_reduce(t)
print(
    f"rank {dist.get_rank()} of {dist.get_world_size()} (node {os.environ['NODE_RANK']}, "
    f"local rank {os.environ['LOCAL_RANK']}): sum of ranks = {int(t.item())}, "
    f"master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
    flush=True,
)
dist.destroy_process_group()
