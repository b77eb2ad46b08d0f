"""BatchNorm1d/2d/3d and their Lazy variants: drop-ins for torch.nn's, on any normkit backend."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .. import _checks
from .. import functional as NF
from ..masked import masked_batch_norm
from ..numerics import momentum_factor
from ._base import BackendMixin
from ._lazy import MaterializeOnSuccess
from ._tracing import PLAIN_TENSORS, module_leaf

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
]


@module_leaf
def batch_norm_forward(
    module: nn.modules.batchnorm._BatchNorm, input: Tensor, mask: Tensor | None = None, *, act: str | None = None
) -> Tensor:
    """torch's ``_BatchNorm.forward`` semantics, with one difference: ``num_batches_tracked`` is
    incremented only after the call succeeds, so a failed call leaves every buffer untouched.
    With a ``mask`` (``(N, L)`` bool, True = real token) the statistics count the real tokens
    only (:func:`normkit.masked.masked_batch_norm`); with ``act``, the output is
    :func:`normkit.functional.batch_norm_act`'s.

    It is one function of the module (wrapped as a leaf for ``torch.fx`` symbolic tracing,
    which cannot trace the shape checks and the ``momentum=None`` average).
    """
    module._check_input_dim(input)
    training, tracked = module.training, module.training and module.track_running_stats
    counter = module.num_batches_tracked if tracked else None
    check_counter(counter)
    factor = momentum_factor(module.momentum, counter)
    # (each buffer and parameter read once: a module's buffer is a __getattr__ call away)
    running_mean, running_var = module.running_mean, module.running_var
    use_batch_stats = training or (running_mean is None and running_var is None)
    keep_stats = not training or module.track_running_stats
    args = (
        running_mean if keep_stats else None,
        running_var if keep_stats else None,
        module.weight,
        module.bias,
        use_batch_stats,
        factor,
        module.eps,
    )
    if act is not None:
        out = NF.batch_norm_act(input, *args, act=act, **module.call_options())
    elif mask is None and module.backend is None and module.stats_dtype is None and module.out_dtype is None:
        out = _batch_norm(input, *args)  # the default call: no options to pass
    elif mask is None:
        out = NF.batch_norm(input, *args, **module.call_options())
    else:
        out = masked_batch_norm(input, mask, *args, backend=module.call_options(masked=True)["backend"])
    if counter is not None:
        counter.add_(1)
    return out


# batch_norm without torch's arity check (the forward passes the right number of arguments)
_batch_norm = NF.batch_norm.__wrapped__  # type: ignore[attr-defined]
_batch_norm_forward = batch_norm_forward.__wrapped__  # type: ignore[attr-defined]  # (the leaf's function)


def check_counter(counter: Tensor | None) -> None:
    """Raise, before any statistic is written, what the increment of ``counter`` after the call
    would raise (:func:`normkit._checks.check_counter_writable`), where it could raise at all:
    an inference tensor, a buffer under a ``torch.func`` transform, a tensor that requires grad
    or a tensor subclass. A plain integer tensor outside these takes the add, and the trial (a
    kernel launch, ~3 us a call) is skipped; compiled code never tries it."""
    if counter is None or torch.compiler.is_compiling():
        return
    if (
        type(counter) is not Tensor
        or counter.requires_grad
        or counter.is_inference()
        or torch._C._functorch.maybe_current_level() is not None
    ):
        _checks.check_counter_writable(counter)


class NormBaseMixin(BackendMixin):
    """The one constructor of normkit's BatchNorm and InstanceNorm classes and their Lazy
    variants (torch's ``_NormBase`` family).

    torch's arguments go to the torch.nn class as they are, so their defaults, their checks and
    their error messages are torch's own; normkit's keyword-only options come after them. Each
    class's signature is its torch twin's followed by these options, made when the class is
    defined, so ``help()`` and :func:`inspect.signature` show the whole of it and a default
    torch changes is changed here too.
    """

    def __init__(
        self,
        *args: Any,
        backend: str | None = None,
        stats_dtype: torch.dtype | None = None,
        out_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._init_backend(backend, stats_dtype, out_dtype)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A class with a constructor of its own (Ghost, Renorm, ...) or inheriting a signed one
        # keeps it.
        if issubclass(cls, nn.Module) and cls.__init__ is NormBaseMixin.__init__:
            cls.__init__ = _signed_init(cls)  # type: ignore[method-assign]


def _signed_init(cls: type[NormBaseMixin]) -> Callable[..., None]:
    """:meth:`NormBaseMixin.__init__` with the signature of ``cls``: its torch twin's
    parameters, then normkit's keyword-only options."""
    init = NormBaseMixin.__init__
    options = [p for p in inspect.signature(init, eval_str=True).parameters.values() if p.kind is p.KEYWORD_ONLY]
    twin = inspect.signature(cls.torch_base())
    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)

    @functools.wraps(init)
    def __init__(self: NormBaseMixin, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)

    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    signature = twin.replace(parameters=[this, *twin.parameters.values(), *options])
    __init__.__signature__ = signature  # type: ignore[attr-defined]
    return __init__


class _BatchNormMixin(NormBaseMixin):
    def forward(self, input: Tensor) -> Tensor:
        if type(input) in PLAIN_TENSORS:  # not traced by fx: the leaf's tracer test is not needed
            return _batch_norm_forward(self, input)
        return batch_norm_forward(self, input)


class BatchNorm1d(_BatchNormMixin, nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` on normkit's backends: (N, C) or (N, C, L), statistics over
    N (and L) per channel.

    ``y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias``  (Ioffe & Szegedy, 2015)

    Args: as :class:`torch.nn.BatchNorm1d`, plus keyword-only ``backend`` (``None``: resolved at
    each call), ``stats_dtype`` and ``out_dtype`` (see :mod:`normkit.functional`).

    ``forward(x, mask=None)``: for padded sequences, ``mask`` is an ``(N, L)`` bool tensor (True =
    real token) for ``x`` of shape ``(N, C, L)``. The statistics (and the running statistics,
    ``running_var`` unbiased over the real count) are those of the real tokens only, exactly
    BatchNorm of the unpadded tokens; padded outputs and their input gradients are 0. A bad mask
    (shape, dtype, 2-D input, fewer than 2 real tokens in training) raises ``ValueError`` and
    changes no buffer. ``mask=None`` is the plain (fx-traceable, compilable) path.

    Numerics: statistics in float32 (float64 for float64 input); the biased variance normalizes,
    the unbiased one updates ``running_var``; ``running = (1 - momentum) * running + momentum *
    batch``, or with ``momentum=None`` the cumulative average over ``num_batches_tracked``.
    """

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        return batch_norm_forward(self, input, mask)


class BatchNorm2d(_BatchNormMixin, nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` on normkit's backends: (N, C, H, W), statistics over
    (N, H, W) per channel. See :class:`BatchNorm1d` for the formula and numerics."""


class BatchNorm3d(_BatchNormMixin, nn.BatchNorm3d):
    """:class:`torch.nn.BatchNorm3d` on normkit's backends: (N, C, D, H, W), statistics over
    (N, D, H, W) per channel. See :class:`BatchNorm1d` for the formula and numerics."""


class LazyBatchNorm1d(MaterializeOnSuccess, _BatchNormMixin, nn.LazyBatchNorm1d):
    """:class:`torch.nn.LazyBatchNorm1d`: ``num_features`` is read from ``input.size(1)`` at the
    first call, and the module becomes a normkit :class:`BatchNorm1d`."""

    cls_to_become = BatchNorm1d  # type: ignore[assignment]


class LazyBatchNorm2d(MaterializeOnSuccess, _BatchNormMixin, nn.LazyBatchNorm2d):
    """:class:`torch.nn.LazyBatchNorm2d`: becomes a normkit :class:`BatchNorm2d` at the first call."""

    cls_to_become = BatchNorm2d  # type: ignore[assignment]


class LazyBatchNorm3d(MaterializeOnSuccess, _BatchNormMixin, nn.LazyBatchNorm3d):
    """:class:`torch.nn.LazyBatchNorm3d`: becomes a normkit :class:`BatchNorm3d` at the first call."""

    cls_to_become = BatchNorm3d  # type: ignore[assignment]
