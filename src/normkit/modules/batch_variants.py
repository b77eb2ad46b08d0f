"""BatchNorm variants for small or unrepresentative batches: Ghost BatchNorm (statistics per
virtual batch) and Batch Renormalization (batch statistics corrected towards the running ones).

Both subclass normkit's BatchNorm, so ``state_dict``, ``repr`` fields and eval mode are
BatchNorm's, and a BatchNorm checkpoint loads as is.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as NF
from ..numerics import acc_dtype, momentum_factor
from ._base import REQUIRED
from ._tracing import module_leaf
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, batch_norm_forward, check_counter

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
]


# ---- Ghost BatchNorm ---------------------------------------------------------------------------


@module_leaf
def ghost_batch_norm_forward(module: _GhostBatchNorm, input: Tensor) -> Tensor:
    """BatchNorm of each chunk of ``virtual_batch_size`` samples in turn (one ``torch.fx`` leaf)."""
    if not (module.training or module.running_mean is None):
        return batch_norm_forward(module, input)
    module._check_input_dim(input)
    if input.numel() == 0:
        return batch_norm_forward(module, input)
    # The last chunk is checked before the first one updates a buffer, so a failed call changes
    # none (a bad full-size chunk fails in the first chunk's own checks, before any update).
    spatial = input[0, 0].numel()
    if spatial * (input.shape[0] % module.virtual_batch_size) == 1:
        raise ValueError(
            f"GhostBatchNorm's last virtual batch has 1 value per channel ({input.shape[0]} samples of shape "
            f"{list(input.shape[1:])} in chunks of virtual_batch_size={module.virtual_batch_size}): pass a batch "
            "size whose remainder is not 1, or another virtual_batch_size"
        )
    chunks = input.split(module.virtual_batch_size)
    # cat may not see a channels_last layout in chunks of one sample: keep the input's.
    return NF.keep_layout(input, torch.cat([batch_norm_forward(module, chunk) for chunk in chunks]))



def _check_virtual(virtual_batch_size: int) -> None:
    if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
        raise ValueError(f"virtual_batch_size must be a positive int; got {virtual_batch_size!r}")


class _GhostBatchNorm:
    """Ghost BatchNorm (Hoffer et al., 2017, "Train longer, generalize better"): in training the
    batch is split into chunks of ``virtual_batch_size`` samples (the last may be smaller) and
    each chunk is batch-normalized with its own statistics, exactly as BatchNorm applied to each
    chunk in turn. Eval mode is BatchNorm's (running statistics).

    Args: ``num_features``, ``virtual_batch_size``, then as :class:`torch.nn.BatchNorm2d`
    (``eps``, ``momentum``, ``affine``, ``track_running_stats``, ``device``, ``dtype``), plus
    keyword-only ``bias`` and ``backend``.

    Running statistics: updated once per virtual batch, torch-style, so ``num_batches_tracked``
    counts virtual batches and a batch of ``k`` chunks moves them ``k`` momentum steps. This is
    what the chunks' own statistics mean (each is one small batch, as a small-batch BatchNorm
    would see it), it keeps ``momentum=None`` (the cumulative average) exact, and
    ``virtual_batch_size >= N`` is then exactly BatchNorm. The last chunk must have more than
    one value per channel.
    """

    virtual_batch_size: int
    _init_attributes = {"virtual_batch_size": REQUIRED}  # see BackendMixin.adopt

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"  # type: ignore[misc]

    def __init__(self, num_features: int, virtual_batch_size: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 bias: bool = True, backend: str | None = None,
                 stats_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None) -> None:
        _check_virtual(virtual_batch_size)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         backend=backend, stats_dtype=stats_dtype, out_dtype=out_dtype)
        self.virtual_batch_size = virtual_batch_size

    def forward(self, input: Tensor) -> Tensor:
        return ghost_batch_norm_forward(self, input)


class GhostBatchNorm1d(_GhostBatchNorm, BatchNorm1d):
    __doc__ = _GhostBatchNorm.__doc__


class GhostBatchNorm2d(_GhostBatchNorm, BatchNorm2d):
    __doc__ = _GhostBatchNorm.__doc__


# ---- Batch Renormalization ---------------------------------------------------------------------


@module_leaf
def batch_renorm_forward(module: _BatchRenorm, input: Tensor) -> Tensor:
    """Batch Renormalization in training, BatchNorm otherwise (one ``torch.fx`` leaf).

    ``((x - mu_B) / sigma_B * r + d) * w + b`` is BatchNorm with weight ``w * r`` and bias
    ``b + w * d``: with ``r`` and ``d`` constants, that BatchNorm's gradients are the renormalized
    layer's, so every backend's batch_norm computes it (and updates the running statistics).
    """
    if not module.training or not module.track_running_stats:
        return batch_norm_forward(module, input)
    module._check_input_dim(input)
    if input.numel() == 0:
        return batch_norm_forward(module, input)
    r, d = module.renorm_factors(input)
    dtype = (module.weight if module.weight is not None else module.running_var).dtype
    r, d = r.to(dtype), d.to(dtype)
    weight = r if module.weight is None else module.weight * r
    bias = d if module.weight is None else module.weight * d
    if module.bias is not None:
        bias = bias + module.bias
    counter = module.num_batches_tracked
    check_counter(counter)
    factor = momentum_factor(module.momentum, counter)
    out = NF.batch_norm(input, module.running_mean, module.running_var, weight, bias, True, factor, module.eps,
                        **module.call_options())
    counter.add_(1)
    return out



def _check_renorm(r_max: float, d_max: float, warmup_steps: int) -> None:
    if r_max < 1.0 or d_max < 0.0 or warmup_steps < 0:
        raise ValueError(
            f"BatchRenorm needs r_max >= 1, d_max >= 0 and warmup_steps >= 0; got r_max={r_max}, "
            f"d_max={d_max}, warmup_steps={warmup_steps}"
        )


class _BatchRenorm:
    """Batch Renormalization (Ioffe, 2017): in training::

        y = ((x - mu_B) / sigma_B * r + d) * weight + bias
        r = clamp(sigma_B / sigma_run, 1 / r_max, r_max)
        d = clamp((mu_B - mu_run) / sigma_run, -d_max, d_max)

    with ``sigma = sqrt(var + eps)`` (``var_B`` the batch's biased variance, ``var_run`` the
    running one) and ``r``, ``d`` treated as constants in the backward (stop-gradient). Eval mode
    is BatchNorm's. With ``r_max=1, d_max=0`` it is BatchNorm.

    Args: as :class:`torch.nn.BatchNorm2d`, plus keyword-only ``bias``, ``r_max`` (>= 1),
    ``d_max`` (>= 0), ``warmup_steps`` and ``backend``. Warm-up: at step
    ``t = num_batches_tracked`` (before this batch) the limits used are
    ``1 + (r_max - 1) * min(t / warmup_steps, 1)`` and ``d_max * min(t / warmup_steps, 1)``, so
    the layer starts as BatchNorm while the running statistics are still meaningless.
    ``track_running_stats=False`` leaves nothing to renormalize towards: plain BatchNorm.

    Numerics: ``r`` and ``d`` from float32 statistics (float64 for float64 input); running
    statistics updated as BatchNorm's (torch-style momentum, unbiased variance).
    """

    r_max: float
    d_max: float
    warmup_steps: int
    _init_attributes = {"r_max": 3.0, "d_max": 5.0, "warmup_steps": 0}  # see BackendMixin.adopt

    def renorm_limits(self) -> tuple[Tensor, Tensor]:
        """The ``(r_max, d_max)`` in force now (after warm-up: the constructor's), as tensors."""
        step = self.num_batches_tracked.double()  # type: ignore[attr-defined]
        ramp = (step / self.warmup_steps).clamp(max=1.0) if self.warmup_steps else torch.ones_like(step)
        return 1.0 + (self.r_max - 1.0) * ramp, self.d_max * ramp

    def renorm_factors(self, input: Tensor) -> tuple[Tensor, Tensor]:
        """``(r, d)`` per channel for a training batch ``input``, detached, in the accumulation dtype."""
        acc = acc_dtype(input.dtype)
        dims = [0, *range(2, input.dim())]
        with torch.no_grad():
            var_b, mean_b = torch.var_mean(input.to(acc), dims, correction=0)
            sigma_b = torch.sqrt(var_b + self.eps)  # type: ignore[attr-defined]
            sigma_run = torch.sqrt(self.running_var.to(acc) + self.eps)  # type: ignore[attr-defined]
            r_lim, d_lim = (t.to(acc) for t in self.renorm_limits())
            r = torch.clamp(sigma_b / sigma_run, 1.0 / r_lim, r_lim)
            mean_run = self.running_mean.to(acc)  # type: ignore[attr-defined]
            d = torch.clamp((mean_b - mean_run) / sigma_run, -d_lim, d_lim)
        return r, d

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}"  # type: ignore[misc]
        return f"{text}, warmup_steps={self.warmup_steps}" if self.warmup_steps else text

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 0, backend: str | None = None,
                 stats_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None) -> None:
        _check_renorm(r_max, d_max, warmup_steps)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         backend=backend, stats_dtype=stats_dtype, out_dtype=out_dtype)
        self.r_max, self.d_max, self.warmup_steps = float(r_max), float(d_max), int(warmup_steps)

    def forward(self, input: Tensor) -> Tensor:
        return batch_renorm_forward(self, input)


class BatchRenorm1d(_BatchRenorm, BatchNorm1d):
    __doc__ = _BatchRenorm.__doc__


class BatchRenorm2d(_BatchRenorm, BatchNorm2d):
    __doc__ = _BatchRenorm.__doc__


class BatchRenorm3d(_BatchRenorm, BatchNorm3d):
    __doc__ = _BatchRenorm.__doc__
