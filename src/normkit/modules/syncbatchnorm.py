"""SyncBatchNorm: BatchNorm whose training statistics are those of the whole distributed batch.

Each rank holds a slice of the batch. In training, every rank computes the per-channel
``(count, mean, M2)`` of its slice (``M2 = sum((x - mean)^2)``, two-pass), one ``all_gather``
exchanges them, and every rank merges them in rank order with Chan et al.'s parallel formula
(1979), so that all ranks normalize with the same statistics::

    n_ab    = n_a + n_b
    delta   = mean_b - mean_a
    mean_ab = mean_a + delta * n_b / n_ab
    M2_ab   = M2_a + M2_b + delta^2 * n_a * n_b / n_ab        var = M2 / n  (biased)

The backward needs two global sums per channel, exchanged in one ``all_reduce``::

    dx = weight * rstd * (dy - sum(dy) / N - x_hat * sum(dy * x_hat) / N)     (N: global count)

while ``dweight = sum(dy * x_hat)`` and ``dbias = sum(dy)`` are the rank's *local* sums, as in
:class:`torch.nn.SyncBatchNorm`: DistributedDataParallel all-reduces parameter gradients itself.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import functional as NF
from ..numerics import acc_dtype, momentum_factor, unbiased, update_running_stats
from ._base import BackendMixin
from ._tracing import module_leaf
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, batch_norm_forward

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


def _local_stats(x: Tensor, work: torch.dtype) -> Tensor:
    """``[3, C]`` float64 rows ``(count, mean, M2)`` of this rank's slice; all 0 for an empty one."""
    channels = x.shape[1]
    dims = [0, *range(2, x.dim())]
    count = x.numel() // channels
    stats = torch.zeros(3, channels, dtype=torch.float64, device=x.device)
    stats[0] = count
    if count > 0:
        xa = x.to(work)
        mean = xa.mean(dims, keepdim=True)
        stats[1] = mean.flatten()
        stats[2] = (xa - mean).square().sum(dims)  # two-pass: never E[x^2] - E[x]^2
    return stats


def _merge(gathered: Tensor) -> tuple[int, Tensor, Tensor]:
    """Chan's merge of ``[world, 3, C]`` rows in rank order: ``(count, mean, biased var)``.

    In float64, in a fixed order, so every rank computes bit-identical statistics.
    """
    n, mean, m2 = 0, torch.zeros_like(gathered[0, 1]), torch.zeros_like(gathered[0, 2])
    for count_b, mean_b, m2_b in gathered:
        n_b = int(count_b[0].item())
        if n_b == 0:  # an empty rank: nothing to merge (and no 0 / 0)
            continue
        n_ab = n + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / n_ab)
        m2 = m2 + m2_b + delta.square() * (n * n_b / n_ab)
        n = n_ab
    return n, mean, m2 / max(n, 1)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode BatchNorm over the batch of every rank of ``group``; see the module docstring."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        eps: float,
        momentum: float,
        group: dist.ProcessGroup,
        world_size: int,
        options: dict,
    ) -> Tensor:
        work = options["stats_dtype"] or acc_dtype(x.dtype)
        local = _local_stats(x, work)
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local, group=group)
        n, mean, var = _merge(torch.stack(gathered))
        if n <= 1:  # every rank sees the same n, so every rank raises: no rank is left waiting
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {n}")
        var_unbiased = unbiased(var, n)
        mean, var = mean.to(work), var.to(work)
        # Normalizing with given statistics is BatchNorm in eval mode: the backend does it, in the
        # working dtype (the statistics are not rounded to a bf16 input's or weight's dtype), and
        # rounds the result once, to its final dtype.
        cast = lambda t: None if t is None else t.to(work)
        y = NF.batch_norm(cast(x), mean, var, cast(weight), cast(bias), False, 0.0, eps,
                          backend=options["backend"], stats_dtype=options["stats_dtype"],
                          out_dtype=options["out_dtype"] or x.dtype)
        # only once nothing can fail any more
        update_running_stats(running_mean, running_var, mean, var_unbiased, momentum)
        ctx.save_for_backward(x, weight, mean, torch.rsqrt(var + eps))
        ctx.count, ctx.group = n, group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        x, weight, mean, rstd = ctx.saved_tensors
        bias_dtype = ctx.bias_dtype
        work = mean.dtype
        view = [1, x.shape[1]] + [1] * (x.dim() - 2)
        dims = [0, *range(2, x.dim())]
        x_hat = (x.to(work) - mean.view(view)) * rstd.view(view)
        dy = dy.to(work)
        # [sum(dy), sum(dy * x_hat)] per channel, summed in float64 (up to millions of terms).
        sums = torch.stack([torch.sum(dy, dims, dtype=torch.float64),
                            torch.sum(dy * x_hat, dims, dtype=torch.float64)])
        dweight = sums[1].to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = sums[0].to(bias_dtype) if bias_dtype is not None and ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:  # as torch: no input gradient asked, no collective
            sums = sums.clone()
            dist.all_reduce(sums, group=ctx.group)
            mean_dy, mean_dy_xhat = (s.to(work).view(view) / ctx.count for s in sums)
            g = rstd.view(view) if weight is None else (weight.to(work) * rstd).view(view)
            dx = (g * (dy - mean_dy - x_hat * mean_dy_xhat)).to(x.dtype)
        return dx, dweight, dbias, None, None, None, None, None, None, None


class SyncBatchNorm(BackendMixin, nn.SyncBatchNorm):
    """:class:`torch.nn.SyncBatchNorm` on normkit's backends, on any device and process group
    backend (gloo on the CPU, NCCL on GPUs).

    ``y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias``  (Ioffe & Szegedy, 2015), with
    ``E`` and ``Var`` over the batch of every rank of ``process_group`` (default: the world).

    Args: as :class:`torch.nn.SyncBatchNorm`, plus keyword-only ``backend``, ``stats_dtype``,
    ``out_dtype`` (see :class:`normkit.BatchNorm1d`).

    Shape: ``(N, C, *)``, at least 2-D. Ranks may hold different ``N``, or none at all: an empty
    rank gives an empty output and still takes part in both collectives, so it must still call
    ``forward`` and ``backward``.

    In eval mode, outside an initialized process group, or with a group of one rank, it is
    exactly :class:`normkit.BatchNorm1d` (no communication).

    Numerics: each rank's ``(count, mean, M2)`` is computed in ``stats_dtype`` (default float32,
    float64 for float64 input), exchanged and merged in float64 (Chan's formula, rank order:
    identical on every rank). The biased variance normalizes; ``running_var`` gets the unbiased
    one over the global count; ``momentum=None`` is the cumulative average over
    ``num_batches_tracked``, incremented only after a successful call. One ``all_gather`` of
    ``[world, 3, C]`` in the forward, one ``all_reduce`` of ``[2, C]`` in the backward. Every
    rank must hold the same ``C``. Mismatched counts cannot be seen without one more collective:
    gloo aborts the process, NCCL waits for the group's timeout; run with
    ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` for a ``RuntimeError`` on every rank naming the shapes.

    On CPU modules, torch's ``DistributedDataParallel`` refuses every ``torch.nn.SyncBatchNorm``
    (torch's kernels are GPU-only); wrap the model in
    :class:`normkit.parallel.DistributedDataParallel` instead, which accepts normkit's layer and
    still refuses torch's (``examples/ddp_syncbn.py`` trains with it).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 bias: bool = True, backend: str | None = None,
                 stats_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype,
                         bias=bias)
        self._init_backend(backend, stats_dtype, out_dtype)

    def _sync_group(self) -> tuple[dist.ProcessGroup, int] | None:
        """The group to synchronize over, and its size; ``None`` when there is nothing to sync."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        world_size = dist.get_world_size(group)
        return (group, world_size) if world_size > 1 else None

    def forward(self, input: Tensor) -> Tensor:
        return sync_batch_norm_forward(self, input)

    def _synced_forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        sync = self._sync_group()
        if sync is None:
            return batch_norm_forward(self, input)
        if input.shape[1] != self.num_features:
            raise ValueError(f"expected input with {self.num_features} channels (input.size(1)), "
                             f"got {input.shape[1]}: every rank of the group must pass the same C")
        if self.eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        counter = self.num_batches_tracked if self.track_running_stats else None
        factor = momentum_factor(self.momentum, counter)
        keep = self.track_running_stats
        out = _SyncBatchNormFunction.apply(
            input, self.weight, self.bias,
            self.running_mean if keep else None, self.running_var if keep else None,
            self.eps, factor, *sync, self.call_options(),
        )
        if counter is not None:
            counter.add_(1)
        return out


@module_leaf
def sync_batch_norm_forward(module: SyncBatchNorm, input: Tensor) -> Tensor:
    """The forward of :class:`SyncBatchNorm`, one ``torch.fx`` leaf (it reads shapes and the
    process group, which a Proxy cannot): in a traced model the group is looked up when the
    graph runs, as torch's SyncBatchNorm, a leaf module for fx, does."""
    return module._synced_forward(input)


# The classes whose forward is plain BatchNorm: converting them changes only the statistics.
_PLAIN_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, BatchNorm1d, BatchNorm2d, BatchNorm3d)


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Turn, in place, every BatchNorm1d/2d/3d of ``model`` (torch's or normkit's) into a normkit
    :class:`SyncBatchNorm` synchronized over ``process_group``; returns ``model``.

    A class swap, as :func:`normkit.convert`: the same Parameter and buffer objects (device,
    dtype, ``requires_grad``), hooks, training mode, and the normkit module's ``backend``,
    ``stats_dtype``, ``out_dtype``. Subclasses with their own ``forward`` (BatchRenorm,
    GhostBatchNorm, BatchNormAct2d, ...) and Lazy modules not yet initialized are left alone.
    """
    for m in model.modules():
        if type(m) in _PLAIN_BATCH_NORMS:
            m.__class__ = SyncBatchNorm
            m.process_group = process_group
    return model
