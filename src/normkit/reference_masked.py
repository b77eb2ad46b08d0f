"""Reference norms over the real elements of a 0/1 mask only (padded sequences).

:class:`MaskedNormalize` is :class:`normkit.reference.Normalize` with every mean taken over the
elements where the mask is 1: :func:`masked_batch_norm` over the real tokens of a batch,
:func:`masked_instance_norm` over each sample's. Padded positions output 0 and get no gradient.
Numerics as :mod:`normkit.reference`. Re-exported there, where these names first lived.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .numerics import acc_dtype, unbiased, update_running_stats
from .reference import _param, _without_jvp, apply_traced

__all__ = ["MaskedNormalize", "masked_batch_norm", "masked_instance_norm"]


class MaskedNormalize(torch.autograd.Function):
    """:class:`Normalize` counting only the elements where ``mask`` is 1 (sequences with padding).

    With ``m`` the 0/1 mask broadcast against ``x`` and ``n = sum(m)`` over ``dims``::

        mean  = sum(m * x) / n
        var   = sum(m * (x - mean)^2) / n          (biased, over the real elements only)
        x_hat = m * (x - mean) * rstd              (0 at padded positions)
        y     = m * (x_hat * weight + bias)        (padded outputs are 0)

    Backward, with ``g = m * dy * weight`` (padded upstream gradients are ignored)::

        dx = m * rstd * (g - sum(g) / n - x_hat * sum(g * x_hat) / n)   (batch statistics)
        dx = m * rstd * g                                               (given statistics)
        dweight = sum(dy * x_hat),  dbias = sum(m * dy)

    so a padded position gets ``dx = 0`` and enters no sum. Forward mode, with ``dx, dw, db``
    the tangents (the mask has none)::

        dx_hat = m * rstd * (dx - sum(m * dx) / n - x_hat * sum(x_hat * dx) / n)   (batch statistics)
        dx_hat = m * rstd * dx                                                     (given statistics)
        dy     = m * (dx_hat * weight + x_hat * dw + db)

    Returns ``(y, mean, var)`` as :class:`Normalize` does; ``n`` must be at least 1 for every
    statistic (checked by callers).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor,
        m: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        dims: tuple[int, ...],
        eps: float,
        given_mean: Tensor | None,
        given_var: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        acc = acc_dtype(x.dtype)
        xa, m = x.to(acc), m.to(acc)
        mean, var = _masked_stats(xa, m, dims, given_mean, given_var)
        x_hat = m * (xa - mean) * torch.rsqrt(var + eps)
        y = x_hat
        if weight is not None:
            y = y * weight.to(acc)
        if bias is not None:
            y = y + bias.to(acc)
        return (m * y).to(x.dtype), mean, var

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, m, weight, bias, dims, eps, given_mean, given_var = inputs
        ctx.save_for_backward(x, m, weight, bias, given_mean, given_var)
        ctx.save_for_forward(x, m, weight, bias, given_mean, given_var)
        ctx.dims, ctx.eps = dims, eps
        ctx.mark_non_differentiable(output[1], output[2])

    @staticmethod
    def jvp(ctx, dx: Tensor | None, _dm: None, dweight: Tensor | None, dbias: Tensor | None, *_):  # type: ignore[override]
        x, m, weight, bias, given_mean, given_var = ctx.saved_tensors
        dims, eps = ctx.dims, ctx.eps
        acc = acc_dtype(x.dtype)
        xa, m = x.to(acc), m.to(acc)
        mean, var = _masked_stats(xa, m, dims, given_mean, given_var)
        rstd = torch.rsqrt(var + eps)
        x_hat = m * (xa - mean) * rstd
        dy = torch.zeros_like(x_hat)
        if dx is not None:
            dxa = m * dx.to(acc)
            if given_var is not None:
                dx_hat = rstd * dxa
            else:
                n = m.sum(dims, keepdim=True)
                dx_hat = (
                    m
                    * rstd
                    * (dxa - dxa.sum(dims, keepdim=True) / n - x_hat * (x_hat * dxa).sum(dims, keepdim=True) / n)
                )
            dy = dy + (dx_hat * weight.to(acc) if weight is not None else dx_hat)
        if dweight is not None:
            dy = dy + x_hat * dweight.to(acc)
        if dbias is not None:
            dy = dy + m * dbias.to(acc)
        return dy.to(x.dtype), None, None

    @staticmethod
    def backward(ctx, dy: Tensor, _dmean: Tensor, _dvar: Tensor):  # type: ignore[override]
        x, m, weight, bias, given_mean, given_var = ctx.saved_tensors
        dims, eps = ctx.dims, ctx.eps
        acc = acc_dtype(x.dtype)
        xa, dy = x.to(acc), m * dy.to(acc)
        mean, var = _masked_stats(xa, m, dims, given_mean, given_var)
        rstd = torch.rsqrt(var + eps)
        x_hat = m * (xa - mean) * rstd
        g = dy * weight.to(acc) if weight is not None else dy

        dx = None
        if ctx.needs_input_grad[0]:
            if given_var is not None:
                dx = g * rstd
            else:
                n = m.sum(dims, keepdim=True)
                dx = m * rstd * (g - g.sum(dims, keepdim=True) / n - x_hat * (g * x_hat).sum(dims, keepdim=True) / n)
            dx = dx.to(x.dtype)
        dweight = dbias = None
        if weight is not None and ctx.needs_input_grad[2]:
            dweight = (dy * x_hat).double().sum_to_size(weight.shape).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[3]:
            dbias = dy.double().sum_to_size(bias.shape).to(bias.dtype)
        return dx, None, dweight, dbias, None, None, None, None


def _masked_stats(
    xa: Tensor, m: Tensor, dims: tuple[int, ...], given_mean: Tensor | None, given_var: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of the real elements (two-pass), or the given statistics."""
    if given_var is not None:
        return given_mean.to(xa.dtype, copy=True), given_var.to(xa.dtype, copy=True)  # never an input as-is
    n = m.sum(dims, keepdim=True)
    mean = (m * xa).sum(dims, keepdim=True) / n
    return mean, (m * (xa - mean).square()).sum(dims, keepdim=True) / n


def _masked_apply(
    input: Tensor,
    mask: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    dims: tuple[int, ...],
    eps: float,
    batch_stats: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """:class:`MaskedNormalize` of ``(N, C, L)`` over ``dims``, per channel parameters, with the
    batch's statistics or (``batch_stats`` False) the running ones."""
    view = (1, input.shape[1], 1)
    given = (None, None) if batch_stats else (running_mean.reshape(view), running_var.reshape(view))
    args = (input, mask[:, None, :], _param(weight, view), _param(bias, view), dims, eps, *given)
    return apply_traced(MaskedNormalize, _MaskedNormalizeTraced, *args)


def masked_batch_norm(
    input: Tensor,
    mask: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """BatchNorm of ``(N, C, L)`` over the real tokens only (``mask`` ``(N, L)``, True = real):
    batch norm of the ``(T, C)`` tokens, running variance unbiased over ``T``; padded outputs 0."""
    y, mean, var = _masked_apply(input, mask, running_mean, running_var, weight, bias, (0, 2), eps, training)
    if training:
        n = int(mask.sum())
        update_running_stats(running_mean, running_var, mean.flatten(), unbiased(var, n).flatten(), momentum)
    return y


def masked_instance_norm(
    input: Tensor,
    mask: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """InstanceNorm of ``(N, C, L)``, each (sample, channel) over its real tokens only; running
    statistics move towards the batch average of the per-sample mean and unbiased variance (each
    unbiased over its own real count); padded outputs 0."""
    y, mean, var = _masked_apply(input, mask, running_mean, running_var, weight, bias, (2,), eps, use_input_stats)
    if use_input_stats:
        n = mask[:, None, :].sum(2, keepdim=True).to(var.dtype)
        update_running_stats(
            running_mean, running_var, mean.flatten(1).mean(0), unbiased(var, n).flatten(1).mean(0), momentum
        )
    return y


_MaskedNormalizeTraced = _without_jvp(MaskedNormalize)
