"""Vectorizable float32 exp, sigmoid, tanh and erf for the numba kernels, elementwise over a row.

numba has no vector math library here (no SVML): ``np.exp``, ``math.tanh`` and ``math.erf`` are
scalar libm calls per element, which kept gated_rms_norm's forward (silu) and DyT/Derf far from
the memory limit. Each function below is a ``numba.extending.overload``: inside a kernel a float32
row takes the polynomial written here (loops LLVM vectorizes), any other dtype libm per element.
Accuracy: within 1-2 float32 ulps (tested against float64 over the float32 range); NaN and inf
as torch's. The polynomials may fuse a multiply and an add (FMA); every other loop of the
kernels rounds as written.
"""

from __future__ import annotations

import math

import numpy as np
from numba import types
from numba.extending import overload

__all__ = ["erf_rows", "exp_rows", "sigmoid_rows", "tanh_rows"]


def exp_rows(x, c, e, bits):  # pragma: no cover - replaced by the overload inside kernels
    """``e = exp(c * x)`` elementwise (``c`` a power of two: the product is exact). ``e`` must not
    be ``x``: with one array read and written through two names, LLVM's run-time alias check
    sends the loop to its scalar version (measured 8x slower). ``bits``: uint32 scratch."""


# The polynomials of exp_rows, tanh_rows and erf_rows may fuse a multiply and an add into one FMA
# instruction (contraction: one rounding instead of two, never a worse result; measured 1.6x
# faster for exp). Only these functions get the flag: every other loop rounds as written. The
# bits then depend on the CPU having FMA, as the vectorized sums' depend on its vector width.
_CONTRACT = {"fastmath": {"contract"}}


@overload(exp_rows, jit_options=_CONTRACT)
def _exp_rows(x, c, e, bits):
    if e.dtype != types.float32:
        def libm(x, c, e, bits):
            for j in range(x.shape[0]):
                e[j] = np.exp(c * x[j])

        return libm

    # float32: numba has no vector math library here (no SVML), and libm's expf is a scalar call
    # per element (silu made gated_rms_norm's forward 2.5x slower than its plain RMSNorm). This
    # exp vectorizes: exp(x) = 2^n * e^r, n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts,
    # exact products), e^r by Cephes' expf polynomial (|r| <= ln2 / 2: within 1 ulp, measured
    # max relative error of the sigmoid 1.19e-7 against libm's 1.18e-7), 2^n built in the
    # exponent bits (as 2^(n-1) * 2, exact). x is clamped to [-87, ln(FLT_MAX)]: below, exp(x)
    # is under 1e-38 and taken as 0 (flushed where libm would give a subnormal: every caller
    # adds it to 1 or multiplies it into a gradient); above, exp is inf as libm's; NaN stays NaN.
    # The special cases are settled in the first loop, so the second reads only e (in place).
    def vector(x, c, e, bits):
        one = np.float32(1.0)
        c_ = np.float32(c)
        for j in range(x.shape[0]):
            xj = c_ * x[j]
            xc = min(max(xj, np.float32(-87.0)), np.float32(88.72283))
            n = np.floor(xc * np.float32(1.44269504088896341) + np.float32(0.5))
            r = xc - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
            q = np.float32(1.9875691500e-4)
            q = q * r + np.float32(1.3981999507e-3)
            q = q * r + np.float32(8.3334519073e-3)
            q = q * r + np.float32(4.1665795894e-2)
            q = q * r + np.float32(1.6666665459e-1)
            q = q * r + np.float32(5.0000001201e-1)
            p = q * r * r + r + one
            p = np.float32(np.inf) if xj > np.float32(88.72283) else p
            p = np.float32(0.0) if xj < np.float32(-103.97) else p
            e[j] = xj if xj != xj else p
            bits[j] = np.uint32(np.int32(n) + np.int32(126)) << np.uint32(23)  # 2^(n-1): normal up to n = 128
        scale = bits.view(np.float32)
        for j in range(x.shape[0]):
            e[j] = e[j] * scale[j] * np.float32(2.0)

    return vector


def sigmoid_rows(z, s, bits):  # pragma: no cover - replaced by the overload inside kernels
    """``s = 1 / (1 + exp(-z))`` elementwise (``bits``: uint32 scratch of z's length)."""


@overload(sigmoid_rows)
def _sigmoid_rows(z, s, bits):
    if s.dtype != types.float32:
        def libm(z, s, bits):
            for j in range(z.shape[0]):
                s[j] = 1.0 / (1.0 + np.exp(-z[j]))

        return libm

    def vector(z, s, bits):  # the vectorized exp of exp_rows
        one = np.float32(1.0)
        exp_rows(z, -1.0, s, bits)
        for j in range(z.shape[0]):
            s[j] = one / (one + s[j])

    return vector


def tanh_rows(u, s, t, bits):  # pragma: no cover - replaced by the overload inside kernels
    """``s = tanh(u)`` elementwise (``s``, ``t`` (scratch) and ``u`` three arrays; ``bits``:
    uint32 scratch of u's length)."""


def _libm_or(vector, scalar):
    """The overload of a ``(u, s, t, bits)`` squash: ``vector`` for float32 rows, else ``scalar``
    (libm) per element."""
    def typer(u, s, t, bits):
        if s.dtype == types.float32:
            return vector

        def libm(u, s, t, bits):
            for j in range(u.shape[0]):
                s[j] = scalar(u[j])

        return libm

    return typer


def _tanh_vector(u, s, t, bits):
    # float32 tanh (libm's tanhf is a scalar call per element, as expf): Cephes' tanhf split, both
    # sides computed and one selected per element (so the loops vectorize): |u| < 0.625, the
    # odd polynomial u + u^3 P(u^2); beyond, (1 - e) / (1 + e) with e = exp(-2|u|) from
    # exp_rows (in (0, 0.29]: no cancellation), the sign of u. Measured within 2 ulp of float64
    # tanh over the float32 range; +-inf -> +-1, NaN stays NaN.
    one = np.float32(1.0)
    for j in range(u.shape[0]):
        t[j] = abs(u[j])
    exp_rows(t, -2.0, s, bits)
    for j in range(u.shape[0]):
        x = u[j]
        z = x * x
        p = np.float32(-5.70498872745e-3)
        p = p * z + np.float32(2.06390887954e-2)
        p = p * z + np.float32(-5.37397155531e-2)
        p = p * z + np.float32(1.33314422036e-1)
        p = p * z + np.float32(-3.33332819422e-1)
        near = p * z * x + x
        # tanh(-0) = -0, but -0 * 0 * p is +0 (p(0) < 0) and -0 + +0 is +0: keep x itself there
        near = x if z == np.float32(0.0) else near
        e = s[j]
        far = (one - e) / (one + e)
        far = far if x >= np.float32(0.0) else -far
        s[j] = near if abs(x) < np.float32(0.625) else far


overload(tanh_rows, jit_options=_CONTRACT)(_libm_or(_tanh_vector, np.tanh))


def erf_rows(u, s, t, bits):  # pragma: no cover - replaced by the overload inside kernels
    """``s = erf(u)`` elementwise (arguments as :func:`tanh_rows`)."""


def _erf_vector(u, s, t, bits):
    # float32 erf, vectorized as tanh's (both sides computed, one selected). Fitted here by least
    # squares in float64 on Chebyshev nodes (coefficients rounded to float32, errors measured
    # with float32 Horner evaluation against float64 erf): |u| < 0.9, erf(u) = u + u * P(u^2)
    # (P(0) = 2/sqrt(pi) - 1: the leading term stays exact; within 1 ulp); 0.9 <= |u|,
    # erf(u) = 1 - exp(Q(|u|) - u^2) with Q(a) = log(erfc(a)) + a^2 a degree-8 polynomial in
    # a - 2.45 on [0.9, 4] (within 1.3 ulp with an exact exp; exp_rows adds one), |u| clamped to
    # 4, where float32 erf is 1 already. +-inf -> +-1; NaN stays NaN.
    one = np.float32(1.0)
    for j in range(u.shape[0]):
        a = min(abs(u[j]), np.float32(4.0))
        r = a - np.float32(2.45)
        q = np.float32(1.610223e-06)
        q = q * r + np.float32(-1.3952066e-05)
        q = q * r + np.float32(8.218188e-05)
        q = q * r + np.float32(-0.00044408365)
        q = q * r + np.float32(0.0022731367)
        q = q * r + np.float32(-0.011302238)
        q = q * r + np.float32(0.057768155)
        q = q * r + np.float32(-0.35837385)
        q = q * r + np.float32(-1.5390396)
        t[j] = q - a * a
    exp_rows(t, 1.0, s, bits)
    for j in range(u.shape[0]):
        x = u[j]
        z = x * x
        p = np.float32(8.508397e-05)
        p = p * z + np.float32(-0.00081744866)
        p = p * z + np.float32(0.0052037532)
        p = p * z + np.float32(-0.026860463)
        p = p * z + np.float32(0.11283714)
        p = p * z + np.float32(-0.37612635)
        p = p * z + np.float32(0.12837917)
        near = x * p + x
        far = one - s[j]
        far = far if x >= np.float32(0.0) else -far
        far = x if x != x else far
        s[j] = near if abs(x) < np.float32(0.9) else far


overload(erf_rows, jit_options=_CONTRACT)(_libm_or(_erf_vector, math.erf))
