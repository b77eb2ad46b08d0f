"""The ``@triton.jit`` helpers every normkit kernel shares (row norms and BatchNorm): the
rounding of a result to its output dtype, the fused activations and their gradients, and the
numerics of the statistics (power-of-two scaling, rstd, Chan's merge of partial moments).

Numerics, pinned here once for every kernel:

* ``rstd = 1 / sqrt(var + eps)`` with IEEE-rounded square root and division (``sqrt_rn``,
  ``div_rn``), not the approximate forms a GPU compiles ``1.0 / tl.sqrt`` to.
* Moments are taken in units of a power of two (``pow2_floor``), which commutes with rounding.
* Chan's merge never forms ``E[x^2] - E[x]^2``.
* relu propagates NaN (``relu(NaN) = NaN``) and passes the gradient there, as torch's.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["ACT_CODES", "activate", "activate_grad", "cast_to", "chan_merge", "pow2_floor", "rstd_of"]

# The activations a kernel can apply after the affine, as the ``ACT`` compile-time flag.
# "gelu" is the exact (erf) form, torch.nn.functional.gelu's default.
ACT_CODES: dict[str | None, int] = {None: 0, "relu": 1, "silu": 2, "gelu": 3}


@triton.jit
def cast_to(x, P, RNE_BY_HAND: tl.constexpr):
    """fp32 ``x`` in the element type of pointer ``P``, rounded to nearest even.

    ``RNE_BY_HAND`` (set under ``TRITON_INTERPRET=1`` only): Triton's CPU interpreter truncates
    fp32 -> bf16 where the GPU rounds to nearest; rounding the bits first makes the truncation
    exact, so the interpreter's results are the GPU's. On the GPU this code is not compiled."""
    if RNE_BY_HAND and P.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(P.dtype.element_ty)


@triton.jit
def activate(z, ACT: tl.constexpr):
    """``act(z)`` for the activation coded ``ACT`` (identity for 0)."""
    if ACT == 1:
        z = tl.where(z < 0.0, 0.0, z)  # not tl.maximum (maxnum: relu(NaN) would be 0)
    elif ACT == 2:
        z = z * tl.sigmoid(z)
    elif ACT == 3:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))  # 1/sqrt(2)
    return z


@triton.jit
def activate_grad(dy, z, ACT: tl.constexpr):
    """``dy * act'(z)``: the gradient at the activation's input. As torch's threshold_backward,
    relu passes dy unless z <= 0 (so relu'(0) = 0 and a NaN input keeps its gradient)."""
    if ACT == 1:
        dy = tl.where(z <= 0.0, 0.0, dy)
    elif ACT == 2:
        s = tl.sigmoid(z)
        dy = dy * (s * (1.0 + z * (1.0 - s)))
    elif ACT == 3:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        dy = dy * (cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z))  # 1/sqrt(2 pi)
    return dy


@triton.jit
def pow2_floor(a):
    """The largest power of two <= ``a`` (> 0, normal), exactly: a's exponent bits; 1 for 0
    or a subnormal (whose squares vanish in fp32 anyway), and 1 for inf or NaN: a tile holding
    an inf is left unscaled, as torch computes it (``x / inf`` would turn its finite elements
    into ``inf * 0 = NaN``, where RMSNorm gives ``x * rsqrt(inf) = 0``)."""
    e = a.to(tl.int32, bitcast=True) & 0x7F800000
    return tl.where((e == 0) | (e == 0x7F800000), 1.0, e.to(tl.float32, bitcast=True))


@triton.jit
def rstd_of(var_s, scale, eps):
    """``1 / sqrt(var + eps)`` for ``var = var_s * scale^2`` (scale a power of two), without
    forming var where it would overflow; IEEE-rounded square root and division; 0 where
    ``var + eps == 0`` (ATen's rule).

    With ``eps=0`` var is never formed either: below ``|x| ~ 1e-19`` it underflows fp32 (to 0,
    and the rule above would give silent zeros). Then ``rstd = (1 / scale) / sqrt(var_s)``,
    which in the ordinary range is bit for bit ``1 / sqrt(var_s * scale^2)`` (power-of-two
    scaling commutes with the rounded square root and division)."""
    inv = tl.math.div_rn(1.0, scale)
    big = (scale >= 1.0) | (eps == 0.0)
    v = tl.where(big, var_s + (eps * inv) * inv, var_s * scale * scale + eps)
    rstd = tl.math.div_rn(tl.where(big, inv, 1.0), tl.math.sqrt_rn(v))
    return tl.where(v == 0.0, 0.0, rstd)


@triton.jit
def chan_merge(mean, m2, scale, count, mean_bs, m2_bs, scale_b, n_b):
    """Chan's merge of the running ``(count, mean, m2 in units of scale^2)`` with a tile's
    ``(n_b, mean_bs * scale_b, m2_bs * scale_b^2)``, at the larger of the two scales.
    ``delta * (delta * w)``: the first merge (count 0) adds exactly 0."""
    new_scale = tl.maximum(scale, scale_b)
    r_old = scale / new_scale
    r_b = scale_b / new_scale
    total = count + n_b
    mean_b = mean_bs * scale_b
    delta = (mean_b - mean) / new_scale
    m2 = m2 * (r_old * r_old) + m2_bs * (r_b * r_b) + delta * (delta * (count * n_b / total))
    mean += (mean_b - mean) * (n_b / total)
    return mean, m2, new_scale, total
