"""The norms of today's transformer and diffusion blocks, on any normkit backend.

Re-exported by :mod:`normkit.functional`; each function takes the keyword-only call options of
every normkit op (``backend``, ``stats_dtype``, ``out_dtype``) and checks its arguments before a
backend is chosen, so a refused call changes nothing.

* :func:`modulated_layer_norm`, :func:`modulated_rms_norm`: adaLN (DiT, SD3, Flux),
  ``norm(x) * (1 + scale) + shift`` with ``shift``/``scale`` broadcast per sample or per token.
* :func:`gated_rms_norm`: Mamba2's gated, grouped RMSNorm.
* :func:`qk_rms_norm`: the query and key norms of Qwen3, Gemma3 and OLMo2 in one call.
* :func:`sandwich_rms_norm`: the post-norm + residual + next pre-norm of Gemma 2/3 blocks.
* :func:`dyt`, :func:`derf`: normalization-free drop-ins (no statistics: an elementwise squash).

None of these has a torch.nn twin: the ``"torch"`` backend runs them as the composition of torch
ops that users write today, and the float64 :mod:`normkit.reference` is the oracle of the tests.

Numerics, on every backend: statistics in float32 (float64 for float64 input), the result
rounded once to the input's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _checks, numerics
from .backends import define_op
from .functional import _dispatch, _float, _public

__all__ = [
    "derf",
    "dyt",
    "gated_rms_norm",
    "modulated_layer_norm",
    "modulated_rms_norm",
    "qk_rms_norm",
    "sandwich_rms_norm",
]


def _check_input(op: str, input: Tensor, name: str = "input") -> int:
    """A floating-point tensor with at least one dim; returns its last dim's size."""
    if input.dim() < 1:
        raise ValueError(f"{op} normalizes the last dim of {name}, which needs at least 1 dim; got a 0-dim tensor")
    _checks._check_floating(input, op)
    return input.shape[-1]


def _check_vector(op: str, name: str, p: Tensor | None, size: int) -> None:
    if p is not None and tuple(p.shape) != (size,):
        raise RuntimeError(f"{op}: expected {name} of shape [{size}] (the input's last dim), but got {name} of "
                           f"shape {list(p.shape)}")
    if p is not None and not p.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {p.dtype}")


def _check_broadcast(op: str, name: str, t: Tensor, input: Tensor) -> None:
    """``t`` broadcasts to ``input``'s shape without growing it (per sample ``(N, 1, D)``, per
    token ``(N, L, D)``, ...)."""
    try:
        shape = torch.broadcast_shapes(t.shape, input.shape)
    except RuntimeError:
        shape = None
    if shape != input.shape:
        raise RuntimeError(f"{op}: {name} of shape {list(t.shape)} must broadcast to the input's shape "
                           f"{list(input.shape)} (per sample: (N, 1, D); per token: (N, L, D))")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def _check_eps(op: str, eps: float | None) -> None:
    if eps is not None and eps < 0:
        raise ValueError(f"{op} eps must be non-negative, but got {eps}")


def _check_scalar(op: str, name: str, t: Tensor) -> None:
    if t.numel() != 1:
        raise RuntimeError(f"{op}: expected {name} to be one number (a tensor of 1 element), but got {name} of "
                           f"shape {list(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


@define_op()
@_public
def modulated_layer_norm(
    input: Tensor,
    shift: Tensor,
    scale: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
    stats_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Adaptive (modulated) LayerNorm of DiT, SD3 and Flux blocks (Peebles & Xie, 2023, adaLN):

    ``y = layer_norm(x, weight, bias, eps) * (1 + scale) + shift`` over the last dim.

    Args:
        input: ``(*, D)``.
        shift, scale: tensors that broadcast to ``input``'s shape, usually ``(N, 1, D)`` (one
            modulation per sample, from the conditioning embedding) or ``(N, L, D)`` (per token).
        weight, bias: ``(D,)`` or None (DiT's norm has no affine of its own: ``None``).
        eps: added to the variance (``1e-6``, DiT's).

    Gradients reach ``input``, ``shift``, ``scale``, ``weight`` and ``bias``; those of ``shift``
    and ``scale`` are summed over the axes they were broadcast along.

    Numerics: the statistics, the normalization and the modulation in float32 (float64 for
    float64 input), rounded once to the input's dtype (the composition users write rounds the
    norm's output first).
    """
    _checks.check_args("modulated_layer_norm", ("input", "Tensor", input), ("shift", "Tensor", shift),
                       ("scale", "Tensor", scale), ("weight", "Tensor?", weight), ("bias", "Tensor?", bias),
                       ("eps", "float", eps))
    d = _check_input("modulated_layer_norm", input)
    _check_broadcast("modulated_layer_norm", "shift", shift, input)
    _check_broadcast("modulated_layer_norm", "scale", scale, input)
    _check_vector("modulated_layer_norm", "weight", weight, d)
    _check_vector("modulated_layer_norm", "bias", bias, d)
    _check_eps("modulated_layer_norm", eps)
    _checks._check_devices(input, shift, scale, weight, bias)
    args = (input, shift, scale, weight, bias, float(eps))
    return _dispatch("modulated_layer_norm", args, backend, stats_dtype, out_dtype)


@define_op()
@_public
def modulated_rms_norm(
    input: Tensor,
    shift: Tensor,
    scale: Tensor,
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    backend: str | None = None,
    stats_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """:func:`modulated_layer_norm` with RMS normalization (not centred):

    ``y = rms_norm(x, weight, eps) * (1 + scale) + shift`` over the last dim.

    ``eps=None`` is machine epsilon of the statistics' dtype, as :func:`normkit.functional.rms_norm`.
    Arguments, gradients and numerics as :func:`modulated_layer_norm`.
    """
    _checks.check_args("modulated_rms_norm", ("input", "Tensor", input), ("shift", "Tensor", shift),
                       ("scale", "Tensor", scale), ("weight", "Tensor?", weight), ("eps", "float?", eps))
    d = _check_input("modulated_rms_norm", input)
    _check_broadcast("modulated_rms_norm", "shift", shift, input)
    _check_broadcast("modulated_rms_norm", "scale", scale, input)
    _check_vector("modulated_rms_norm", "weight", weight, d)
    _check_eps("modulated_rms_norm", eps)
    _checks._check_devices(input, shift, scale, weight)
    if stats_dtype is not None:  # the formula's eps does not move with the precision
        eps = numerics.rms_eps(eps, input.dtype)
    args = (input, shift, scale, weight, _float(eps))
    return _dispatch("modulated_rms_norm", args, backend, stats_dtype, out_dtype)


@define_op()
@_public
def gated_rms_norm(
    input: Tensor,
    gate: Tensor | None,
    weight: Tensor | None = None,
    eps: float = 1e-6,
    *,
    group_size: int | None = None,
    norm_before_gate: bool = False,
    backend: str | None = None,
    stats_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Gated RMSNorm of Mamba2, Bamba and Falcon-H1 (Dao & Gu, 2024), per group of channels.

    With ``norm_before_gate=False`` (Mamba2's): ``y = rms_norm(x * silu(gate)) * weight``; with
    True: ``y = rms_norm(x) * weight * silu(gate)``. The RMS statistic is taken over each group of
    ``group_size`` consecutive channels of the last dim (``None``: the whole last dim, one group).
    ``gate=None`` is plain (grouped) RMSNorm.

    Args:
        input: ``(*, D)``.
        gate: ``input``'s shape, or None.
        weight: ``(D,)`` or None.
        eps: added to the mean square (``1e-6``, Mamba2's).
        group_size: a divisor of ``D``, or None for ``D``.

    Numerics: the gate, the statistics and the normalization in float32 (float64 for float64
    input), as HF's ``MambaRMSNormGated``; the result rounded once to the input's dtype.
    """
    _checks.check_args("gated_rms_norm", ("input", "Tensor", input), ("gate", "Tensor?", gate),
                       ("weight", "Tensor?", weight), ("eps", "float", eps))
    d = _check_input("gated_rms_norm", input)
    if gate is not None:
        if gate.shape != input.shape:
            raise RuntimeError(f"gated_rms_norm: expected gate of the input's shape {list(input.shape)}, but got "
                               f"gate of shape {list(gate.shape)}")
        _checks._check_floating(gate, "gated_rms_norm")
    _check_vector("gated_rms_norm", "weight", weight, d)
    _check_eps("gated_rms_norm", eps)
    if group_size is not None and (not _checks._is_int(group_size) or int(group_size) <= 0
                                   or d % int(group_size)):
        raise ValueError(f"gated_rms_norm: group_size must be a positive divisor of the last dim {d} (or None), "
                         f"but got {group_size!r}")
    if type(norm_before_gate) is not bool:
        raise TypeError(f"gated_rms_norm: norm_before_gate must be a bool, not {type(norm_before_gate).__name__}")
    _checks._check_devices(input, gate, weight)
    group = d if group_size is None else int(group_size)
    args = (input, gate, weight, float(eps), group, norm_before_gate)
    return _dispatch("gated_rms_norm", args, backend, stats_dtype, out_dtype)


@define_op(input="q", results=("q", "k"))
@_public
def qk_rms_norm(
    q: Tensor,
    k: Tensor,
    q_weight: Tensor | None,
    k_weight: Tensor | None,
    eps: float | None = None,
    *,
    backend: str | None = None,
    stats_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """QK-norm (Qwen3, Gemma3, OLMo2): ``(rms_norm(q, q_weight), rms_norm(k, k_weight))`` over the
    last (head) dim, both in one call (one launch each way on the kernel backends).

    Args:
        q: ``(*, Hq, D)``; k: ``(*, Hk, D)`` (grouped-query attention: ``Hk`` may differ from
            ``Hq``, and so may the leading dims).
        q_weight, k_weight: ``(D,)`` or None.
        eps: ``None`` is machine epsilon of the statistics' dtype.

    Returns ``(q_out, k_out)``, each in its input's dtype. Numerics as :func:`normkit.functional.rms_norm`.
    """
    _checks.check_args("qk_rms_norm", ("q", "Tensor", q), ("k", "Tensor", k), ("q_weight", "Tensor?", q_weight),
                       ("k_weight", "Tensor?", k_weight), ("eps", "float?", eps))
    d = _check_input("qk_rms_norm", q, "q")
    if _check_input("qk_rms_norm", k, "k") != d:
        raise RuntimeError(f"qk_rms_norm: q and k must have the same head dim (last dim), but got q of shape "
                           f"{list(q.shape)} and k of shape {list(k.shape)}")
    _check_vector("qk_rms_norm", "q_weight", q_weight, d)
    _check_vector("qk_rms_norm", "k_weight", k_weight, d)
    _check_eps("qk_rms_norm", eps)
    _checks._check_devices(q, k, q_weight, k_weight)
    if stats_dtype is not None:
        eps = numerics.rms_eps(eps, q.dtype)
    args = (q, k, q_weight, k_weight, _float(eps))
    return _dispatch("qk_rms_norm", args, backend, stats_dtype, out_dtype)


@define_op(input="hidden", results=("hidden", "residual"), kept=("residual",))
@_public
def sandwich_rms_norm(
    hidden: Tensor,
    residual: Tensor,
    post_weight: Tensor | None,
    next_weight: Tensor | None,
    eps: float | None = None,
    *,
    weight_offset: float = 0.0,
    backend: str | None = None,
    stats_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Sandwich norm step of Gemma 2/3 blocks: the sublayer's post-norm, the residual add and the
    next sublayer's pre-norm, in one pass each way::

        residual_out = residual + rms_norm(hidden, post_weight + weight_offset)
        y = rms_norm(residual_out, next_weight + weight_offset)

    Args:
        hidden: the sublayer's output ``(*, D)``; residual: the residual stream, same shape.
        post_weight, next_weight: ``(D,)`` or None.
        eps: ``None`` is machine epsilon of the statistics' dtype.
        weight_offset: added to both weights (``1.0`` for Gemma, whose weights start at 0).

    Returns ``(y, residual_out)``: ``y`` in ``hidden``'s dtype, ``residual_out`` in
    ``residual``'s. The gradient of ``residual_out`` flows back into ``residual`` unchanged and
    into ``hidden`` through the post-norm.

    Numerics, as Gemma 3's decoder layer: each norm in float32 (float64 for float64 input), its
    weight taken as ``weight_offset + weight`` in float32; the post-norm's output is rounded to
    ``hidden``'s dtype before the add, the sum rounded to ``residual``'s. A weight of None
    scales by nothing, whatever ``weight_offset``.
    """
    _checks.check_args("sandwich_rms_norm", ("hidden", "Tensor", hidden), ("residual", "Tensor", residual),
                       ("post_weight", "Tensor?", post_weight), ("next_weight", "Tensor?", next_weight),
                       ("eps", "float?", eps))
    d = _check_input("sandwich_rms_norm", hidden, "hidden")
    if residual.shape != hidden.shape:
        raise ValueError(f"sandwich_rms_norm: residual must have the shape of hidden: got hidden of shape "
                         f"{list(hidden.shape)} and residual of shape {list(residual.shape)}")
    _checks._check_floating(residual, "sandwich_rms_norm")
    _check_vector("sandwich_rms_norm", "post_weight", post_weight, d)
    _check_vector("sandwich_rms_norm", "next_weight", next_weight, d)
    _check_eps("sandwich_rms_norm", eps)
    if not _checks._is_float(weight_offset):
        raise TypeError(f"sandwich_rms_norm: weight_offset must be a float, not {type(weight_offset).__name__}")
    _checks._check_devices(hidden, residual, post_weight, next_weight)
    if stats_dtype is not None:
        eps = numerics.rms_eps(eps, hidden.dtype)
    args = (hidden, residual, post_weight, next_weight, _float(eps), float(weight_offset))
    return _dispatch("sandwich_rms_norm", args, backend, stats_dtype, out_dtype)


def _check_free(op: str, input: Tensor, scalars: Sequence[tuple[str, Tensor]], weight: Tensor | None,
                bias: Tensor | None) -> None:
    _check_input(op, input)
    for name, t in scalars:
        _check_scalar(op, name, t)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.dim() > input.dim() or p.shape != input.shape[input.dim() - p.dim():]):
            raise RuntimeError(f"{op}: expected {name} of the input's trailing shape (its normalized_shape), but "
                               f"got {name} of shape {list(p.shape)} for an input of shape {list(input.shape)}")
        if p is not None and not p.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {p.dtype}")
    _checks._check_devices(input, *(t for _, t in scalars), weight, bias)


@define_op()
@_public
def dyt(
    input: Tensor,
    alpha: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    backend: str | None = None,
    stats_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Dynamic Tanh (Zhu, Chen, He, LeCun & Liu, 2025, "Transformers without Normalization"):
    ``y = weight * tanh(alpha * x) + bias``, elementwise; no statistics.

    Args:
        input: ``(*, *normalized_shape)``.
        alpha: one learnable number (a one-element tensor).
        weight, bias: ``normalized_shape`` (the input's trailing dims) or None.

    Numerics: computed in float32 (float64 for float64 input), rounded once; the gradients of
    ``alpha``, ``weight`` and ``bias`` are sums over the input in float32.
    """
    _checks.check_args("dyt", ("input", "Tensor", input), ("alpha", "Tensor", alpha),
                       ("weight", "Tensor?", weight), ("bias", "Tensor?", bias))
    _check_free("dyt", input, (("alpha", alpha),), weight, bias)
    return _dispatch("dyt", (input, alpha, weight, bias), backend, stats_dtype, out_dtype)


@define_op()
@_public
def derf(
    input: Tensor,
    alpha: Tensor,
    shift: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    backend: str | None = None,
    stats_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Dynamic erf (Chen et al., 2025, arXiv 2512.10938, "Stronger Normalization-Free
    Transformers"): ``y = weight * erf(alpha * x + shift) + bias``, elementwise; no statistics.

    Args:
        input: ``(*, *normalized_shape)``.
        alpha, shift: one learnable number each (one-element tensors).
        weight, bias: ``normalized_shape`` (the input's trailing dims) or None.

    Numerics as :func:`dyt`.
    """
    _checks.check_args("derf", ("input", "Tensor", input), ("alpha", "Tensor", alpha), ("shift", "Tensor", shift),
                       ("weight", "Tensor?", weight), ("bias", "Tensor?", bias))
    _check_free("derf", input, (("alpha", alpha), ("shift", shift)), weight, bias)
    return _dispatch("derf", (input, alpha, shift, weight, bias), backend, stats_dtype, out_dtype)
