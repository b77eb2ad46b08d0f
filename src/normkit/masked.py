"""Masked statistics for padded sequences: BatchNorm and InstanceNorm of ``(N, C, L)`` whose
statistics count only the real tokens (``mask`` ``(N, L)`` bool, True = real token).

Padded positions enter neither the statistics nor the running statistics, their outputs are 0
and their input gradients 0. The modules reach this through ``forward(x, mask=...)``
(:class:`normkit.BatchNorm1d`, :class:`normkit.InstanceNorm1d`); ``mask=None`` never comes here.

Backends: ``"reference"`` (:class:`normkit.reference.MaskedNormalize`, hand-derived backward) and
``"torch"`` (BatchNorm: ATen's batch_norm on the gathered ``(T, C)`` tokens, scattered back;
InstanceNorm: masked sums with autograd). They live in this small table rather than in the
backend registry, whose ops are exactly :mod:`normkit.functional`'s torch twins; the backend is
still resolved at each call by the same rules (``"auto"`` is ``"torch"``), and a backend without
a masked implementation (``"triton"``) raises :class:`~normkit.backends.BackendError`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks, numerics, reference
from .backends import BackendError, current_backend, get_backend

__all__ = ["masked_batch_norm", "masked_instance_norm"]


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
    if training and int(mask.sum()) < 2:
        raise ValueError(
            f"Expected more than 1 real token per channel when training, got {int(mask.sum())} in a mask "
            f"of shape {list(mask.shape)}: pass a batch with at least 2 True entries in the (N, L) mask"
        )
    args = (input, mask, running_mean, running_var, weight, bias, training, momentum, eps)
    return _resolve("batch_norm", backend)(*args)


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
    if use_input_stats:
        empty = (~mask.any(1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"InstanceNorm1d with a mask needs at least one real token per sample; samples {empty} of the "
                f"(N, L) = {list(mask.shape)} mask are all padding: drop them from the batch"
            )
    args = (input, mask, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    return _resolve("instance_norm", backend)(*args)


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


def _torch_masked_batch_norm(input, mask, running_mean, running_var, weight=None, bias=None, training=False,
                             momentum=0.1, eps=1e-5):
    tokens = input.transpose(1, 2)[mask]  # (T, C): the real tokens, in (n, l) order
    y = F.batch_norm(tokens, running_mean, running_var, weight, bias, training, momentum, eps)
    out = y.new_zeros(input.shape[0], input.shape[2], input.shape[1]).index_put((mask,), y)
    return out.transpose(1, 2)


def _torch_masked_instance_norm(input, mask, running_mean=None, running_var=None, weight=None, bias=None,
                                use_input_stats=True, momentum=0.1, eps=1e-5):
    acc = numerics.acc_dtype(input.dtype)
    x, m = input.to(acc), mask[:, None, :].to(acc)
    if use_input_stats:
        n = m.sum(2, keepdim=True)
        mean = (m * x).sum(2, keepdim=True) / n
        var = (m * (x - mean).square()).sum(2, keepdim=True) / n
        numerics.update_running_stats(running_mean, running_var, mean.flatten(1).mean(0),
                                      numerics.unbiased(var, n).flatten(1).mean(0), momentum)
    else:
        mean, var = running_mean.to(acc)[:, None], running_var.to(acc)[:, None]
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(acc)[:, None]
    if bias is not None:
        y = y + bias.to(acc)[:, None]
    return (m * y).to(input.dtype)


_IMPLS: dict[str, dict[str, Callable[..., Tensor]]] = {
    "torch": {"batch_norm": _torch_masked_batch_norm, "instance_norm": _torch_masked_instance_norm},
    "reference": {"batch_norm": reference.masked_batch_norm, "instance_norm": reference.masked_instance_norm},
}


def _resolve(op: str, backend: str | None) -> Callable[..., Tensor]:
    name = backend if backend is not None else current_backend()
    if name == "auto":
        name = "torch"
    if name not in _IMPLS:
        get_backend(name)  # an unknown name is a ValueError, as everywhere
        raise BackendError(f"normkit backend {name!r} has no masked {op} (backends with one: {sorted(_IMPLS)})")
    return _IMPLS[name][op]
