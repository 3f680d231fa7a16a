"""A torchrun script in the style of PyTorch's DDP tutorials (lab 00 runs it, so do the
tests): it reads torchrun's environment, parses its arguments, creates and destroys the
process group itself, imports its model from beside it and saves a snapshot to a relative
path.

    torchrun --nproc-per-node 2 train.py 3 --batch-size 20
"""

import argparse
import os

import torch
import torch.distributed as dist
from model import HIDDEN, ToyModel
from torch import nn, optim
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP


def main(epochs: int, batch_size: int) -> None:
    env = {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    assert os.environ["MASTER_ADDR"] and int(os.environ["MASTER_PORT"]) > 0
    init_process_group(backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    print(f"rank {rank} of {world}, env {env}, hidden {HIDDEN}")
    torch.manual_seed(0)
    model = DDP(ToyModel())
    optimizer = optim.SGD(model.parameters(), lr=0.01)
    data = torch.Generator().manual_seed(1)
    for epoch in range(epochs):
        x = torch.randn(batch_size, 10, generator=data)
        y = torch.randn(batch_size, 5, generator=data)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x[rank::world]), y[rank::world])
        loss.backward()
        optimizer.step()
        print(f"epoch {epoch} loss {loss.item():.6f}")
    if rank == 0:
        torch.save(model.module.state_dict(), "snapshot.pt")
        print("saved snapshot.pt")
    destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="a DDP toy")
    parser.add_argument("epochs", type=int)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--exit-code", type=int, default=0, help="rank 1 exits with this")
    args = parser.parse_args()
    main(args.epochs, args.batch_size)
    if args.exit_code and int(os.environ["RANK"]) == 1:
        raise SystemExit(args.exit_code)
