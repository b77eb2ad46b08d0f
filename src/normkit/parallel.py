"""Data-parallel training with normkit's SyncBatchNorm on the CPU.

``torch.nn.parallel.DistributedDataParallel`` refuses every ``torch.nn.SyncBatchNorm`` in a CPU
module ("SyncBatchNorm layers only work with GPU modules"), because torch's own SyncBatchNorm
kernels are GPU-only. :class:`normkit.SyncBatchNorm` runs on any device and process-group
backend (gloo on the CPU), and it *is* a ``torch.nn.SyncBatchNorm``, so DDP's check refuses it
too. :class:`DistributedDataParallel` here is DDP with that check applied only to the layers it
is true of: torch's own SyncBatchNorm still raises torch's error in a CPU module, normkit's is
accepted. On GPUs it is exactly torch's DDP.

Example (``torchrun --nproc_per_node=2 train.py``; ``examples/ddp_syncbn.py`` in full)::

    import torch.distributed as dist
    import normkit

    dist.init_process_group("gloo")
    model = normkit.convert_sync_batchnorm(make_model())  # BatchNorm -> normkit.SyncBatchNorm
    model = normkit.parallel.DistributedDataParallel(model)
"""

from __future__ import annotations

from torch import nn

from .modules import SyncBatchNorm

__all__ = ["DistributedDataParallel"]


class DistributedDataParallel(nn.parallel.DistributedDataParallel):
    """:class:`torch.nn.parallel.DistributedDataParallel` that accepts :class:`normkit.SyncBatchNorm`
    in CPU modules. Same arguments and behaviour as torch's; only the SyncBatchNorm device check
    differs (it lives in a private method of torch's class, ``_passing_sync_batchnorm_handle``,
    called once from the constructor; tests pin it for the torch version normkit declares)."""

    def _passing_sync_batchnorm_handle(self, module: nn.Module) -> None:
        torch_only = nn.ModuleList(m for m in module.modules()
                                   if isinstance(m, nn.SyncBatchNorm) and not isinstance(m, SyncBatchNorm))
        super()._passing_sync_batchnorm_handle(torch_only)  # torch's error for torch's own layers
