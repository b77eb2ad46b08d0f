"""From-scratch reference implementation of every norm: the oracle for everything else.

One primitive does the work. :class:`Normalize` reduces a tensor over ``dims``::

    mean  = E[x]                     (over dims; 0 when not centred, as in RMSNorm)
    var   = E[(x - mean)^2]          (biased, two-pass: never E[x^2] - E[x]^2)
    rstd  = 1 / sqrt(var + eps)
    x_hat = (x - mean) * rstd
    y     = x_hat * weight + bias    (weight, bias broadcast against x)

and its backward is derived by hand. With ``g = dy * weight`` and ``n`` elements per statistic::

    dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))   (centred, batch statistics)
    dx = rstd * (g - x_hat * mean(g * x_hat))             (not centred)
    dx = rstd * g                                         (given statistics: eval BatchNorm)
    dweight = sum(dy * x_hat),  dbias = sum(dy)           (over the broadcast axes)

Every named norm is that primitive on a view chosen by :func:`normkit.norms.layout`, except
ScaleNorm, whose statistic is the L2 norm clamped at eps (:class:`ScaleNormalize`).

:class:`MaskedNormalize` is the same with statistics over the real elements of a 0/1 mask only
(padded sequences: :func:`masked_batch_norm`, :func:`masked_instance_norm`), in
:mod:`normkit.reference_masked`; :func:`local_response_norm` is in :mod:`normkit.reference_lrn`.
Both are re-exported here.

Numerics: statistics and arithmetic in float32 (float64 for float64 input), the parameter
gradients summed in float64; results are cast back to the input's (and parameters') dtype. The
backward recomputes the statistics from the saved input with
differentiable torch ops, so the backward itself can be differentiated (``gradgradcheck``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._checks import VMAP_SHARED_RUNNING_STATS
from .norms import NORMS, layout
from .numerics import _is_batched, acc_dtype, default_rms_eps, rms_eps, unbiased, update_running_stats

__all__ = [
    "LocalResponseNorm",
    "MaskedNormalize",
    "Normalize",
    "acc_dtype",
    "default_rms_eps",
    "add_layer_norm",
    "add_rms_norm",
    "batch_norm",
    "derf",
    "dyt",
    "gated_rms_norm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "local_response_norm",
    "masked_batch_norm",
    "masked_instance_norm",
    "modulated_layer_norm",
    "modulated_rms_norm",
    "normalize",
    "qk_rms_norm",
    "rms_norm",
    "sandwich_rms_norm",
    "scale_norm",
]


def _centre(x: Tensor, dims: tuple[int, ...], center: bool) -> tuple[Tensor, Tensor]:
    """``(x - mean, mean)`` over ``dims``; mean 0 when not centred (RMSNorm).

    The mean is taken of ``x - shift``, with ``shift`` one element of each reduced slice: a
    large common offset (``1e4 + noise``) then cancels exactly (Sterbenz) before any rounding.
    """
    if not center:
        return x, torch.zeros((), dtype=x.dtype, device=x.device)
    shift = x
    for d in dims:
        shift = shift.narrow(d, 0, min(1, x.shape[d]))
    shifted = x - shift
    m = shifted.mean(dims, keepdim=True)
    return shifted - m, shift + m


def _moments(xc: Tensor, dims: tuple[int, ...], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(x_hat, rstd, var)`` of centred values: the two-pass biased variance, ``rstd = 1 /
    sqrt(var + eps)`` and ``x_hat = xc * rstd``.

    Two guards keep finite input finite, where ``xc.square()`` alone would not:

    * a slice whose largest ``|xc|`` passes the fourth root of the dtype's max (2**32 in
      float32), or with ``eps=0`` falls below the square root of its smallest normal (1e-19),
      is divided by a power of two near it first (exact), so its squares neither overflow nor
      underflow: float32 input at ``1e20`` (or ``1e-38`` with ``eps=0``) normalizes as exactly
      as at ``1``. ``var`` itself is then ``inf`` (``0``) where it leaves the dtype's range;
    * ``rstd = 0`` where ``var + eps == 0`` (a constant slice with ``eps=0``), ATen's rule for
      its batch and instance norm: the output is then the bias, not ``0 * inf = NaN``.

    In the ordinary range the scale is 1 and every value is bit-identical to the plain formula.
    """
    info = torch.finfo(xc.dtype)
    amax = xc.detach().abs().amax(dims, keepdim=True) if xc.numel() else xc.detach().abs()
    # (an inf in the slice is left to the plain formula: torch's NaN there and 0 elsewhere)
    rescale = (amax > info.max ** 0.25) & amax.isfinite()
    if eps == 0:  # only without eps can an underflowing variance (|x| < 1e-19 in float32) matter
        rescale |= (amax < info.tiny ** 0.5) & (amax > 0)
    scale = torch.where(rescale, torch.exp2(torch.floor(torch.log2(amax))), torch.ones_like(amax))
    u = xc / scale
    var_u = u.square().mean(dims, keepdim=True)
    # (no eps term when eps is 0: a subnormal scale's reciprocal is inf, and 0 * inf is NaN)
    v = var_u if eps == 0 else var_u + eps / scale / scale
    rstd_u = torch.where(v == 0, torch.zeros_like(v), torch.rsqrt(v))
    return u * rstd_u, rstd_u / scale, var_u * scale * scale


class Normalize(torch.autograd.Function):
    """``y = (x - mean) * rstd * weight + bias`` over ``dims``, with a hand-derived backward and
    forward-mode derivative.

    Returns ``(y, mean, var)``; ``mean`` and ``var`` (biased, in the accumulation dtype, shaped
    to broadcast against ``x``) are not differentiable. When ``given_mean``/``given_var`` are
    passed the statistics are those constants (BatchNorm in eval mode) instead of the batch's.

    Forward mode (``jvp``), with ``dx, dw, db`` the input tangents::

        dx_hat = rstd * (dx - mean(dx) - x_hat * mean(dx * x_hat))   (centred, batch statistics)
        dx_hat = rstd * (dx - x_hat * mean(dx * x_hat))              (not centred)
        dx_hat = rstd * dx                                           (given statistics)
        dy     = dx_hat * weight + x_hat * dw + db

    The forward is plain tensor code and ``setup_context`` holds the bookkeeping, so torch.func
    transforms work (``vmap`` by the generated rule: the function is run on the per-sample view).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        dims: tuple[int, ...],
        eps: float,
        center: bool,
        given_mean: Tensor | None,
        given_var: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        acc = acc_dtype(x.dtype)
        xa = x.to(acc)
        if given_var is None:
            xc, mean = _centre(xa, dims, center)
            x_hat, _, var = _moments(xc, dims, eps)
        else:
            # copies: an output that is a saved input as-is is refused with setup_context
            mean, var = given_mean.to(acc, copy=True), given_var.to(acc, copy=True)
            x_hat = (xa - mean) * torch.rsqrt(var + eps)
        y = x_hat
        if weight is not None:
            y = y * weight.to(acc)
        if bias is not None:
            y = y + bias.to(acc)
        return y.to(x.dtype), mean, var

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, weight, bias, dims, eps, center, given_mean, given_var = inputs
        ctx.save_for_backward(x, weight, bias, given_mean, given_var)
        ctx.save_for_forward(x, weight, bias, given_mean, given_var)
        ctx.dims, ctx.eps, ctx.center = dims, eps, center
        ctx.mark_non_differentiable(output[1], output[2])

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dweight: Tensor | None, dbias: Tensor | None, *_):  # type: ignore[override]
        x, weight, bias, given_mean, given_var = ctx.saved_tensors
        dims, eps, center = ctx.dims, ctx.eps, ctx.center
        acc = acc_dtype(x.dtype)
        x_hat, rstd = _x_hat(x.to(acc), dims, eps, center, given_mean, given_var)
        dy = torch.zeros_like(x_hat)
        if dx is not None:
            dxa = dx.to(acc)
            if given_var is not None:  # the statistics are constants: y is affine in x
                dx_hat = rstd * dxa
            elif center:
                dx_hat = rstd * (dxa - dxa.mean(dims, keepdim=True) - x_hat * (dxa * x_hat).mean(dims, keepdim=True))
            else:
                dx_hat = rstd * (dxa - x_hat * (dxa * x_hat).mean(dims, keepdim=True))
            dy = dy + (dx_hat * weight.to(acc) if weight is not None else dx_hat)
        if dweight is not None:
            dy = dy + x_hat * dweight.to(acc)
        if dbias is not None:
            dy = dy + dbias.to(acc)
        return dy.to(x.dtype), None, None

    @staticmethod
    def backward(ctx, dy: Tensor, _dmean: Tensor, _dvar: Tensor):  # type: ignore[override]
        x, weight, bias, given_mean, given_var = ctx.saved_tensors
        dims, eps, center = ctx.dims, ctx.eps, ctx.center
        acc = acc_dtype(x.dtype)
        dy = dy.to(acc)
        batch_stats = given_var is None
        x_hat, rstd = _x_hat(x.to(acc), dims, eps, center, given_mean, given_var)
        g = dy * weight.to(acc) if weight is not None else dy

        dx = None
        if ctx.needs_input_grad[0]:
            if not batch_stats:
                dx = g * rstd
            elif center:
                dx = rstd * (g - g.mean(dims, keepdim=True) - x_hat * (g * x_hat).mean(dims, keepdim=True))
            else:
                dx = rstd * (g - x_hat * (g * x_hat).mean(dims, keepdim=True))
            dx = dx.to(x.dtype)
        # The parameter gradients sum over every broadcast axis (N x spatial for BatchNorm: up to
        # millions of terms), so they are summed in float64, as ATen's CPU kernels do for float32.
        dweight = dbias = None
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = (dy * x_hat).double().sum_to_size(weight.shape).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            dbias = dy.double().sum_to_size(bias.shape).to(bias.dtype)
        return dx, dweight, dbias, None, None, None, None, None


def _x_hat(xa: Tensor, dims: tuple[int, ...], eps: float, center: bool, given_mean: Tensor | None,
           given_var: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(x_hat, rstd)`` recomputed from the saved input, with differentiable ops (the backward
    and the jvp are themselves differentiable)."""
    if given_var is None:
        x_hat, rstd, _ = _moments(_centre(xa, dims, center)[0], dims, eps)
        return x_hat, rstd
    rstd = torch.rsqrt(given_var.to(xa.dtype) + eps)
    return (xa - given_mean.to(xa.dtype)) * rstd, rstd


def apply_traced(fn: type[torch.autograd.Function], traced: type[torch.autograd.Function], *args: object):
    """``fn.apply(*args)``; under torch.compile ``traced.apply`` (``fn`` without its jvp: see
    :func:`_without_jvp`), a tensor given in two slots (tied weights, ``shift is scale``) passed as
    a view of itself in the later ones: dynamo refuses one tensor as two inputs of a Function.
    Inside ``torch.inference_mode()`` (autograd records nothing there, even under
    ``torch.enable_grad()``) the Function runs under ``no_grad``: recording it would save
    inference tensors, which autograd refuses."""
    if not torch.compiler.is_compiling():
        if torch.is_inference_mode_enabled() and torch.is_grad_enabled():
            with torch.no_grad():
                return fn.apply(*args)
        return fn.apply(*args)
    distinct: list[object] = []
    for a in args:
        if isinstance(a, Tensor) and any(a is b for b in distinct):
            a = a.view_as(a)
        distinct.append(a)
    return traced.apply(*distinct)


def _normalize_apply(*args: object):
    """:class:`Normalize` (under torch.compile its twin without jvp)."""
    return apply_traced(Normalize, _NormalizeTraced, *args)


def _param(p: Tensor | None, shape: Sequence[int]) -> Tensor | None:
    return None if p is None else p.reshape(shape)


def _normalize(
    name: str,
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    normalized_ndim: int = 0,
    num_groups: int = 1,
    given: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run :class:`Normalize` on the view that the table of norms gives for ``name``, centred
    where its row is."""
    view, dims, param_view = layout(name, input.shape, normalized_ndim=normalized_ndim, num_groups=num_groups)
    center = NORMS[name].centered
    given_mean, given_var = ((None, None) if given is None
                             else (given[0].reshape(param_view), given[1].reshape(param_view)))
    y, mean, var = _normalize_apply(
        input.reshape(view), _param(weight, param_view), _param(bias, param_view),
        dims, eps, center, given_mean, given_var,
    )
    return y.reshape(input.shape), mean, var


def _check_vmap_running(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None) -> None:
    """Under vmap, unbatched running statistics cannot take a per-sample update: torch's batch
    rule for batch_norm raises this, before any write; so does the reference."""
    stats = [t for t in (running_mean, running_var) if t is not None]
    if stats and _is_batched(input) and not all(_is_batched(t) for t in stats):
        raise RuntimeError(VMAP_SHARED_RUNNING_STATS)


def normalize(
    input: Tensor,
    dims: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    center: bool = True,
) -> Tensor:
    """:class:`Normalize` over any ``dims`` (non-negative, no repeats); ``weight`` and ``bias``
    are shaped like the normalized dims *in the order given*, as ``normalized_shape`` is."""
    order = sorted(range(len(dims)), key=lambda i: dims[i])
    param_view = [1] * input.dim()
    for d in dims:
        param_view[d] = input.shape[d]

    def view(p: Tensor | None) -> Tensor | None:
        return None if p is None else p.permute(order).reshape(param_view)

    return _normalize_apply(input, view(weight), view(bias), tuple(sorted(dims)), eps, center, None, None)[0]


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    if input.numel() == 0:
        # As ATen: an empty batch gives an empty output and updates nothing, whatever the
        # parameters look like; well-formed parameters still get their (zero) gradients.
        if input.dim() < 2:
            return input.clone()
        channels = input.shape[1]
        keep = lambda p: p if p is not None and p.numel() == channels else None
        return _normalize("batch_norm", input, keep(weight), keep(bias), eps)[0]
    if not training:
        y, _, _ = _normalize("batch_norm", input, weight, bias, eps, given=(running_mean, running_var))
        return y
    _check_vmap_running(input, running_mean, running_var)
    y, mean, var = _normalize("batch_norm", input, weight, bias, eps)
    n = input.numel() // input.shape[1]
    update_running_stats(running_mean, running_var, mean.flatten(), unbiased(var, n).flatten(), momentum)
    return y


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    return _normalize("layer_norm", input, weight, bias, eps, normalized_ndim=len(normalized_shape))[0]


def rms_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    eps = rms_eps(eps, input.dtype)
    return _normalize("rms_norm", input, weight, None, eps, normalized_ndim=len(normalized_shape))[0]


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    return _normalize("group_norm", input, weight, bias, eps, num_groups=num_groups)[0]


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    if input.numel() == 0:
        return input.clone()
    if not use_input_stats:
        y, _, _ = _normalize("instance_norm", input, weight, bias, eps, given=(running_mean, running_var))
        return y
    _check_vmap_running(input, running_mean, running_var)
    y, mean, var = _normalize("instance_norm", input, weight, bias, eps)
    # Each instance's statistics update the running ones; torch averages them over the batch,
    # and copies the results in (inference_ok=False: its write, not batch_norm's).
    n = input[0, 0].numel()
    update_running_stats(running_mean, running_var, mean.flatten(1).mean(0), unbiased(var, n).flatten(1).mean(0),
                         momentum, inference_ok=False)
    return y


def _l2_norm(xa: Tensor) -> Tensor:
    """``||x||_2`` over the last dim (kept). A row whose largest ``|x|`` passes the fourth root of
    the dtype's max, or falls below the square root of its smallest normal, is divided by a power
    of two near it first (exact), so its squares neither overflow nor underflow (as
    :func:`_moments`); in the ordinary range the plain formula, bit for bit."""
    if xa.shape[-1] == 0:
        return xa.new_zeros(xa.shape[:-1] + (1,))
    info = torch.finfo(xa.dtype)
    amax = xa.detach().abs().amax(-1, keepdim=True)
    rescale = ((amax > info.max ** 0.25) | ((amax < info.tiny ** 0.5) & (amax > 0))) & amax.isfinite()
    scale = torch.where(rescale, torch.exp2(torch.floor(torch.log2(amax))), torch.ones_like(amax))
    return (xa / scale).square().sum(-1, keepdim=True).sqrt() * scale


class ScaleNormalize(torch.autograd.Function):
    """ScaleNorm's ``y = g * x / max(||x||_2, eps)`` over the last dim, with a hand-derived
    backward and forward-mode derivative.

    With ``n = ||x||_2``, ``r = 1 / max(n, eps)`` and ``u = x * r`` (a unit row where ``n > eps``)::

        dx = g * r * (dy - u * sum(dy * u))     (n > eps; the sum over the row)
        dx = g * r * dy                         (n <= eps: r is the constant 1 / eps)
        dg = sum(dy * u)                        (over every element)

    Forward mode: ``dy = g * r * (dx - u * sum(u * dx)) + u * dg`` (the projection only where
    ``n > eps``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, g: Tensor | None, eps: float) -> Tensor:  # type: ignore[override]
        acc = acc_dtype(x.dtype)
        xa = x.to(acc)
        y = xa / _l2_norm(xa).clamp(min=eps)
        return (y if g is None else y * g.to(acc)).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, g, eps = inputs
        ctx.save_for_backward(x, g)
        ctx.save_for_forward(x, g)
        ctx.eps = eps

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dg: Tensor | None, _deps: None) -> Tensor:  # type: ignore[override]
        x, g = ctx.saved_tensors
        acc = acc_dtype(x.dtype)
        u, r, active = _unit_rows(x.to(acc), ctx.eps)
        dy = torch.zeros_like(u)
        if dx is not None:
            dxa = dx.to(acc)
            dy = r * (dxa - torch.where(active, u * (u * dxa).sum(-1, keepdim=True), 0.0))
            dy = dy if g is None else dy * g.to(acc)
        if dg is not None:
            dy = dy + u * dg.to(acc)
        return dy.to(x.dtype)

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        x, g = ctx.saved_tensors
        acc = acc_dtype(x.dtype)
        dya = dy.to(acc)
        u, r, active = _unit_rows(x.to(acc), ctx.eps)
        dx = dg = None
        if ctx.needs_input_grad[0]:
            gdy = dya if g is None else dya * g.to(acc)
            dx = (r * (gdy - torch.where(active, u * (gdy * u).sum(-1, keepdim=True), 0.0))).to(x.dtype)
        if g is not None and ctx.needs_input_grad[1]:
            dg = (dya * u).double().sum_to_size(g.shape).to(g.dtype)  # one sum over every element: float64
        return dx, dg, None


def _unit_rows(xa: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(u, r, n > eps)`` of ScaleNorm recomputed from the saved input with differentiable ops."""
    n = _l2_norm(xa)
    r = 1 / n.clamp(min=eps)
    return xa * r, r, n > eps


def scale_norm(input: Tensor, g: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """``g * x / max(||x||_2, eps)`` over the last dim (:class:`ScaleNormalize`)."""
    return apply_traced(ScaleNormalize, _ScaleNormalizeTraced, input, g, eps)


def add_layer_norm(
    x: Tensor,
    residual: Tensor | None,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    residual_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """``residual_out = x + residual`` (in ``residual_dtype``), ``y = layer_norm(residual_out)``."""
    residual_out = _add(x, residual, residual_dtype)
    return layer_norm(residual_out, normalized_shape, weight, bias, eps).to(x.dtype), residual_out


def add_rms_norm(
    x: Tensor,
    residual: Tensor | None,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    residual_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """``residual_out = x + residual`` (in ``residual_dtype``), ``y = rms_norm(residual_out)``."""
    residual_out = _add(x, residual, residual_dtype)
    return rms_norm(residual_out, normalized_shape, weight, eps).to(x.dtype), residual_out


def _add(x: Tensor, residual: Tensor | None, residual_dtype: torch.dtype | None) -> Tensor:
    dtype = residual_dtype or x.dtype
    out = _as(x, dtype)
    return out if residual is None else out + _as(residual, dtype)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, which is ``t`` itself where the dtype is already ``dtype``: that case
    skips the dispatcher (about a microsecond a call at small shapes)."""
    return t if t.dtype == dtype else t.to(dtype)


def _without_jvp(fn: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """``fn`` without its jvp, for torch.compile: dynamo refuses to trace an autograd Function
    that defines one (forward-mode AD stays eager-only there)."""
    return type(fn.__name__, (fn,), {"jvp": torch.autograd.Function.jvp, "__doc__": fn.__doc__})


_NormalizeTraced = _without_jvp(Normalize)
_ScaleNormalizeTraced = _without_jvp(ScaleNormalize)


# The norms of today's blocks (normkit.functional_blocks): their math lives in normkit.blocks, one
# file per family, and is this module's too (imported last: those files use the helpers above).
from .blocks.gated import gated_rms_norm  # noqa: E402
from .blocks.modulated import modulated_layer_norm, modulated_rms_norm  # noqa: E402
from .blocks.norm_free import derf, dyt  # noqa: E402
from .blocks.qk_sandwich import qk_rms_norm, sandwich_rms_norm  # noqa: E402

# The norms that are not the primitive above live in their own modules (they use its helpers,
# hence imported last), re-exported here.
from .reference_lrn import LocalResponseNorm, local_response_norm  # noqa: E402
from .reference_masked import MaskedNormalize, masked_batch_norm, masked_instance_norm  # noqa: E402
