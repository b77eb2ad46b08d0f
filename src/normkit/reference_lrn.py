"""Reference local response normalization (AlexNet's): each element divided by a power of
the mean square over a window of neighbouring channels.

No mean is subtracted and no statistic is kept, so it is not the
:class:`normkit.reference.Normalize` primitive; it has its own hand-derived backward
(:class:`LocalResponseNorm`). Numerics as :mod:`normkit.reference`. Re-exported there, where
these names first lived.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .numerics import acc_dtype
from .reference import _without_jvp, apply_traced

__all__ = ["LocalResponseNorm", "local_response_norm"]


def local_response_norm(input: Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> Tensor:
    """``y = x / (k + alpha * mean_window(x^2)) ** beta``, the window spanning ``size`` channels."""
    if input.numel() == 0:
        return input
    if not input.is_floating_point():
        # torch squares and averages integer input in integer arithmetic (the window mean
        # truncates), and only the final division is in floating point.
        mean_sq = _window_sum(input * input, size // 2, (size - 1) // 2).div(size, rounding_mode="trunc")
        return input / (mean_sq * alpha + k).pow(beta)
    return apply_traced(LocalResponseNorm, _LocalResponseNormTraced, input, size, alpha, beta, k)


def _window_sum(t: Tensor, before: int, after: int) -> Tensor:
    """Sum over channel windows ``[c - before, c + after]`` (zero beyond the edges)."""
    channels = t.shape[1]
    padded = torch.nn.functional.pad(t.movedim(1, -1), (before, after)).movedim(-1, 1)
    return sum(padded.narrow(1, i, channels) for i in range(before + after + 1))


class LocalResponseNorm(torch.autograd.Function):
    """Local response normalization across channels with a hand-derived backward.

    With ``s = k + alpha/size * window_sum(x^2)`` and ``y = x * s^-beta``::

        dx = dy * s^-beta - (2 alpha beta / size) * x * window_sum^T(dy * x * s^(-beta-1))

    where ``window_sum^T`` (the adjoint) sums over the mirrored window. Forward mode:
    ``dy = dx * s^-beta - beta * x * s^(-beta-1) * ds`` with ``ds = 2 alpha/size * window_sum(x * dx)``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:  # type: ignore[override]
        xa = x.to(acc_dtype(x.dtype))
        s = k + alpha / size * _window_sum(xa.square(), size // 2, (size - 1) // 2)
        return (xa * s.pow(-beta)).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, size, alpha, beta, k = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        ctx.params = (size, alpha, beta, k)

    @staticmethod
    def jvp(ctx, dx: Tensor, *_) -> Tensor:  # type: ignore[override]
        """``dy = dx * s^-beta - beta * x * s^(-beta-1) * (2 alpha / size) * window_sum(x * dx)``."""
        (x,) = ctx.saved_tensors
        size, alpha, beta, k = ctx.params
        acc = acc_dtype(x.dtype)
        xa, dxa = x.to(acc), dx.to(acc)
        before, after = size // 2, (size - 1) // 2
        s = k + alpha / size * _window_sum(xa.square(), before, after)
        ds = 2 * alpha / size * _window_sum(xa * dxa, before, after)
        return (dxa * s.pow(-beta) - beta * xa * s.pow(-beta - 1) * ds).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        size, alpha, beta, k = ctx.params
        acc = acc_dtype(x.dtype)
        xa, dy = x.to(acc), dy.to(acc)
        s = k + alpha / size * _window_sum(xa.square(), size // 2, (size - 1) // 2)
        u = dy * xa * s.pow(-beta - 1)
        dx = dy * s.pow(-beta) - (2 * alpha * beta / size) * xa * _window_sum(u, (size - 1) // 2, size // 2)
        return dx.to(x.dtype), None, None, None, None


_LocalResponseNormTraced = _without_jvp(LocalResponseNorm)
