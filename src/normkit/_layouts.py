"""Memory layouts around ATen's norms: the channels_last output a channels_last input gets
(:func:`keep_layout`), canonical strides for an input ATen's batch_norm backward gets wrong
(:func:`canonical_strides`), and the guards that hand ATen's batch_norm and instance_norm
backward their upstream gradient in a layout it gets right (:func:`aten_batch_norm_grads`,
:func:`aten_instance_norm_grads`). Used by :mod:`normkit.functional` and the ``"torch"``
backend."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import numerics


def canonical_strides(x: Tensor) -> Tensor:
    """``x``, or where it is dense in channels_last(_3d) order with other strides than that
    format's on its size-1 axes, the same memory viewed with the format's own strides (autograd
    intact). torch 2.13's CPU batch_norm backward computes a wrong input gradient (errors of
    order 1) for such an input, e.g. ``torch.randn(1, 4, 1, 5).permute(3, 2, 1, 0).contiguous()
    .permute(3, 2, 1, 0)``, strides (1, 1, 4, 4); with the format's strides it is right."""
    fmt = _CHANNELS_LAST.get(x.dim())
    if fmt is None or not x.is_contiguous(memory_format=fmt):
        return x
    # the format's strides: channels fastest, then the spatial axes from the last, then the batch
    order = (1, *range(x.dim() - 1, 1, -1), 0)
    strides = [0] * x.dim()
    step = 1
    for d in order:
        strides[d] = step
        step *= x.shape[d]
    if list(x.stride()) == strides:
        return x
    return x.as_strided(x.shape, strides)


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def keep_layout(x: Tensor, y: Tensor) -> Tensor:
    """``y`` in ``x``'s memory format: a channels_last(_3d) input gives a channels_last(_3d)
    output whatever the backend (ATen's instance_norm and layer_norm return contiguous output
    for it, and a kernel may have read a copy). Costs a copy only where the layout was lost.
    Under ``torch.func.vmap`` ``y`` stays as it is (vmap refuses a channels_last copy, and a
    sample has no memory format of its own)."""
    if x.dim() not in (4, 5) or x.is_contiguous() or y.shape != x.shape:
        return y
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    if x.is_contiguous(memory_format=fmt) and not y.is_contiguous(memory_format=fmt) and not numerics._is_batched(y):
        return y.contiguous(memory_format=fmt)
    return y


# torch 2.13's CPU backward of batch_norm and instance_norm computes wrong gradients (errors of
# order 1 in dx, dweight and dbias, no error raised) for some layouts of the upstream gradient:
# batch_norm for one dense in channels_last order whose size-1 axes have other strides than that
# format's (an input x contiguous, its gradient e.g. ``g.permute(3, 2, 1, 0).contiguous()
# .permute(3, 2, 1, 0)`` of shape (1, 4, 1, 5)); instance_norm for a channels_last gradient of a
# batch of one (InstanceNorm2d on a channels_last image: all three gradients wrong) and for some
# permuted ones. The forward is right. ATen's output hands its backward the gradient in a layout
# it gets right (the same values): through a hook in eager mode (about a microsecond), through
# an autograd Function under torch.compile (traced: dynamo does not take a hook on an
# intermediate tensor into a full graph; Inductor's own backward is right, aot_eager's is ATen's).
def aten_batch_norm_grads(y: Tensor) -> Tensor:
    """``y``, ATen's batch_norm output, with its upstream gradient, where not contiguous, viewed
    with canonical strides (:func:`canonical_strides`, no copy) before ATen's backward reads it.
    Only an output with a size-1 axis can receive such a gradient. Not while ``torch.jit.trace``
    records (a hook is no part of a trace, and reading the output would be)."""
    if torch.jit.is_tracing() or not y.requires_grad or 1 not in y.shape:
        return y
    if torch.compiler.is_compiling():
        return _GradThrough.apply(y, _canonical_grad)
    y.register_hook(_canonical_grad)
    return y


def aten_instance_norm_grads(y: Tensor) -> Tensor:
    """``y``, ATen's instance_norm output (contiguous), with its upstream gradient made contiguous
    too (a copy only where it was not) before ATen's backward reads it (not while
    ``torch.jit.trace`` records)."""
    if torch.jit.is_tracing() or not y.requires_grad:
        return y
    if torch.compiler.is_compiling():
        return _GradThrough.apply(y, _contiguous)
    y.register_hook(_contiguous)
    return y


def _contiguous(g: Tensor | None) -> Tensor | None:
    return None if g is None else g.contiguous()  # None: an undefined gradient, passed on


def _canonical_grad(g: Tensor | None) -> Tensor | None:
    # a contiguous gradient (ATen gets it right) stays as it is: restrided, a (N, C, 1, 1) one
    # would take ATen's channels_last kernel, which rounds otherwise than torch's own call
    return g if g is None or g.is_contiguous() else canonical_strides(g)


class _GradThrough(torch.autograd.Function):
    """The identity, its backward passing ``fix(gradient)``."""

    @staticmethod
    def forward(ctx, y: Tensor, fix: Callable[[Tensor], Tensor]) -> Tensor:  # type: ignore[override]
        ctx.fix = fix
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return ctx.fix(g), None
