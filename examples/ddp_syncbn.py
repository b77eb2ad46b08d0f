"""Train a small CNN with DistributedDataParallel and normkit.SyncBatchNorm, on the CPU (gloo).

    torchrun --nproc_per_node=2 examples/ddp_syncbn.py     # each rank holds half of every batch
    python examples/ddp_syncbn.py --single                 # the same model on the whole batch

Both print the same losses: with SyncBatchNorm the statistics are those of the whole batch, and
DDP averages the gradients of the ranks' mean losses, which is the gradient of the whole batch's
mean loss when the ranks hold equal shares.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn

import normkit
import normkit.parallel

BATCH, STEPS, CLASSES = 16, 5, 4


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, CLASSES),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single", action="store_true", help="one process, the whole batch")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = normkit.convert_sync_batchnorm(make_model())  # outside a process group: BatchNorm
    inputs = torch.randn(STEPS, BATCH, 3, 8, 8)
    targets = torch.randint(0, CLASSES, (STEPS, BATCH))
    rank, world = 0, 1
    if not args.single:
        dist.init_process_group("gloo")  # torchrun's environment: rank, world size, address
        rank, world = dist.get_rank(), dist.get_world_size()
        model = normkit.parallel.DistributedDataParallel(model)  # accepts SyncBatchNorm on the CPU
    share = BATCH // world
    mine = slice(rank * share, (rank + 1) * share)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(STEPS):
        loss = nn.functional.cross_entropy(model(inputs[step, mine]), targets[step, mine])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total = loss.detach() / world
        if world > 1:  # the whole batch's mean loss, to print
            dist.all_reduce(total)
        if rank == 0:
            print(f"step {step} loss {total.item():.8f}")
    if world > 1:
        # every rank done with its collectives, and DDP's reducer gone, before the group goes:
        # gloo's threads are then idle at exit (a rank exiting mid-collective aborts)
        dist.barrier()
        del model, optimizer
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
