"""Masked statistics for padded sequences: BatchNorm and InstanceNorm of ``(N, C, L)`` whose
statistics count only the real tokens (``mask`` ``(N, L)`` bool, True = real token).

Padded positions enter neither the statistics nor the running statistics, their outputs are 0
and their input gradients 0. The modules reach this through ``forward(x, mask=...)``
(:class:`normkit.BatchNorm1d`, :class:`normkit.InstanceNorm1d`); ``mask=None`` never comes here.

Both are ops of the backend registry (``"masked_batch_norm"``, ``"masked_instance_norm"``),
dispatched as every other op: ``"reference"`` (:class:`normkit.reference.MaskedNormalize`,
hand-derived backward) and ``"torch"`` (BatchNorm: ATen's batch_norm on the gathered ``(T, C)``
tokens, scattered back; InstanceNorm: masked sums with autograd; see
:mod:`normkit.ops.builtin`). ``"auto"`` takes the first in its order that has them (``"torch"``);
a backend without them (``"triton"``, ``"numba"``) declines with
:class:`~normkit.backends.BackendError`, and :func:`normkit.support_matrix` shows them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks
from .backends import define_op
from .functional import _dispatch

__all__ = ["masked_batch_norm", "masked_instance_norm"]


@define_op(in_place=("running_mean", "running_var"))
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
    *,
    backend: str | None = None,
) -> Tensor:
    """:func:`normkit.functional.batch_norm` of ``(N, C, L)`` over the real tokens only.

    Statistics per channel over the ``T = mask.sum()`` real tokens; in training ``running_var``
    moves towards their variance unbiased over ``T`` (``T >= 2`` is required, as torch requires
    more than one value per channel). Padded outputs are 0.
    """
    _checks.check_batch_norm(input, running_mean, running_var, weight, bias, training, eps, momentum)
    check_mask(input, mask, "BatchNorm1d")
    if training and not mask.is_meta and int(mask.sum()) < 2:  # (a meta mask has no values to count)
        raise ValueError(
            f"Expected more than 1 real token per channel when training, got {int(mask.sum())} in a mask "
            f"of shape {list(mask.shape)}: pass a batch with at least 2 True entries in the (N, L) mask"
        )
    args = (input, mask, running_mean, running_var, weight, bias, training, momentum, eps)
    return _dispatch("masked_batch_norm", args, backend, None, None)


@define_op(in_place=("running_mean", "running_var"))
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
    *,
    backend: str | None = None,
) -> Tensor:
    """:func:`normkit.functional.instance_norm` of ``(N, C, L)``, each (sample, channel) over its
    real tokens only. With ``use_input_stats`` every sample needs at least one real token."""
    _checks.check_instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, eps, momentum)
    check_mask(input, mask, "InstanceNorm1d")
    if use_input_stats and not mask.is_meta:
        empty = (~mask.any(1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"InstanceNorm1d with a mask needs at least one real token per sample; samples {empty} of the "
                f"(N, L) = {list(mask.shape)} mask are all padding: drop them from the batch"
            )
    args = (input, mask, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    return _dispatch("masked_instance_norm", args, backend, None, None)


def check_mask(input: Tensor, mask: Tensor, where: str) -> None:
    """``mask`` must be a bool ``(N, L)`` tensor on the device of an ``(N, C, L)`` input."""
    if input.dim() != 3:
        raise ValueError(
            f"{where} with a mask needs (N, C, L) input and an (N, L) mask; got {input.dim()}D input of shape "
            f"{list(input.shape)}: pass sequences as (N, C, L), or call without mask"
        )
    expected = [input.shape[0], input.shape[2]]
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or list(mask.shape) != expected:
        got = f"a {mask.dtype} tensor of shape {list(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"{where} mask must be a bool tensor of shape (N, L) = {expected} for input of shape "
            f"{list(input.shape)} (True = real token); got {got}"
        )
    if mask.device != input.device:
        raise ValueError(f"{where} mask is on {mask.device} but the input is on {input.device}: move it there")
