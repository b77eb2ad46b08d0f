"""``normkit.functional``: torch.nn.functional's normalization ops, on any normkit backend.

Each function has exactly torch.nn.functional's signature and defaults plus a keyword-only
``backend``. The arguments are checked first (torch's exception types and messages), then the
backend is resolved for this call (see :mod:`normkit.backends`) and computes the result.

Backends here: ``"torch"`` (ATen's kernels), ``"reference"`` (normkit's from-scratch
implementation, :mod:`normkit.reference`) and, where Triton and a GPU are present, ``"triton"``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks, reference
from .backends import Backend, OpImpl, register_backend, register_lazy_backend, resolve

__all__ = [
    "add_layer_norm",
    "add_rms_norm",
    "batch_norm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "local_response_norm",
    "rms_norm",
]


def _shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)


def batch_norm(
    input: Tensor,
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
    """Batch normalization over ``(N, *spatial)`` for each channel of ``(N, C, *spatial)``.

    In training the batch's biased variance normalizes and, when given, ``running_mean`` and
    ``running_var`` are updated in place: ``r = (1 - momentum) * r + momentum * batch``, with
    the unbiased variance for ``running_var``. In eval the running statistics normalize.
    See :class:`torch.nn.BatchNorm2d`.
    """
    _checks.check_batch_norm(input, running_mean, running_var, weight, bias, training, eps)
    args = (input, running_mean, running_var, weight, bias, training, momentum, eps)
    return resolve("batch_norm", backend, *args)(*args)


def instance_norm(
    input: Tensor,
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
    """Instance normalization: each (sample, channel) over its spatial axes.

    With running statistics and ``use_input_stats``, they are updated with the batch average
    of the per-instance statistics. See :class:`torch.nn.InstanceNorm2d`.
    """
    _checks.check_instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, eps)
    args = (input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    return resolve("instance_norm", backend, *args)(*args)


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> Tensor:
    """Layer normalization over the trailing ``normalized_shape`` axes. See :class:`torch.nn.LayerNorm`."""
    normalized_shape = _shape(normalized_shape)
    _checks.check_layer_norm(input, normalized_shape, weight, bias, eps)
    args = (input, normalized_shape, weight, bias, eps)
    return resolve("layer_norm", backend, *args)(*args)


def rms_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    backend: str | None = None,
) -> Tensor:
    """Root-mean-square normalization over the trailing axes (not centred); ``eps=None`` means
    machine epsilon of the statistics' dtype (float32 for fp16/bf16 input, as torch computes it).
    See :class:`torch.nn.RMSNorm`."""
    normalized_shape = _shape(normalized_shape)
    _checks.check_rms_norm(input, normalized_shape, weight, eps)
    args = (input, normalized_shape, weight, eps)
    return resolve("rms_norm", backend, *args)(*args)


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> Tensor:
    """Group normalization: each sample's channels split into ``num_groups`` groups, each group
    normalized over its channels and spatial axes. See :class:`torch.nn.GroupNorm`."""
    _checks.check_group_norm(input, num_groups, weight, bias, eps)
    args = (input, num_groups, weight, bias, eps)
    return resolve("group_norm", backend, *args)(*args)


def local_response_norm(
    input: Tensor,
    size: int,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 1.0,
    *,
    backend: str | None = None,
) -> Tensor:
    """Local response normalization across ``size`` neighbouring channels.
    See :class:`torch.nn.LocalResponseNorm`."""
    _checks.check_local_response_norm(input, size)
    args = (input, size, alpha, beta, k)
    return resolve("local_response_norm", backend, *args)(*args)


def add_layer_norm(
    x: Tensor,
    residual: Tensor | None,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    residual_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Pre-norm residual step: ``residual_out = x + residual``, ``y = layer_norm(residual_out)``.

    Returns ``(y, residual_out)``. ``residual_out`` is stored in ``residual_dtype`` (default
    ``x.dtype``; float32 keeps the residual stream exact under bf16 activations) and ``y`` in
    ``x.dtype``. ``residual=None`` means a zero residual. Gradients reach ``x`` and
    ``residual``. The triton backend does it in one pass; the others compose the two steps.
    """
    normalized_shape = _shape(normalized_shape)
    _check_residual(x, residual)
    _checks.check_layer_norm(x, normalized_shape, weight, bias, eps)
    args = (x, residual, normalized_shape, weight, bias, eps, residual_dtype)
    return resolve("add_layer_norm", backend, *args)(*args)


def add_rms_norm(
    x: Tensor,
    residual: Tensor | None,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    residual_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`add_layer_norm` with RMS normalization. Returns ``(y, residual_out)``."""
    normalized_shape = _shape(normalized_shape)
    _check_residual(x, residual)
    _checks.check_rms_norm(x, normalized_shape, weight, eps)
    args = (x, residual, normalized_shape, weight, eps, residual_dtype)
    return resolve("add_rms_norm", backend, *args)(*args)


def _check_residual(x: Tensor, residual: Tensor | None) -> None:
    if residual is not None and residual.shape != x.shape:
        raise ValueError(
            f"residual must have the shape of x: got x of shape {list(x.shape)} and residual of "
            f"shape {list(residual.shape)}; broadcast or reshape the residual first"
        )


# ---- the built-in backends --------------------------------------------------------------------


def _torch_add_layer_norm(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5, residual_dtype=None):
    residual_out = reference._add(x, residual, residual_dtype)
    dt = residual_out.dtype  # normalize the residual stream at its own precision
    weight, bias = (None if p is None else p.to(dt) for p in (weight, bias))
    return F.layer_norm(residual_out, normalized_shape, weight, bias, eps).to(x.dtype), residual_out


def _torch_add_rms_norm(x, residual, normalized_shape, weight=None, eps=None, residual_dtype=None):
    residual_out = reference._add(x, residual, residual_dtype)
    if eps is None:
        eps = reference.default_rms_eps(residual_out.dtype)
    weight = None if weight is None else weight.to(residual_out.dtype)
    return F.rms_norm(residual_out, normalized_shape, weight, eps).to(x.dtype), residual_out


def _torch_lrn_unsupported(input, size, alpha=1e-4, beta=0.75, k=1.0):
    if (input.device.type == "cpu" and input.dim() > 3 and input.numel() > 0
            and input.dtype in (torch.float16, torch.bfloat16)):
        return f"ATen has no CPU {input.dtype} avg_pool3d, which its local_response_norm uses for 4-D+ input"
    return None


register_backend(
    Backend(
        "torch",
        {
            "batch_norm": OpImpl(F.batch_norm),
            "instance_norm": OpImpl(F.instance_norm),
            "layer_norm": OpImpl(F.layer_norm),
            "rms_norm": OpImpl(F.rms_norm),
            "group_norm": OpImpl(F.group_norm),
            "local_response_norm": OpImpl(F.local_response_norm, _torch_lrn_unsupported),
            "add_layer_norm": OpImpl(_torch_add_layer_norm),
            "add_rms_norm": OpImpl(_torch_add_rms_norm),
        },
        description="PyTorch's own ATen kernels",
    )
)

register_backend(
    Backend(
        "reference",
        {
            "batch_norm": OpImpl(reference.batch_norm),
            "instance_norm": OpImpl(reference.instance_norm),
            "layer_norm": OpImpl(reference.layer_norm),
            "rms_norm": OpImpl(reference.rms_norm),
            "group_norm": OpImpl(reference.group_norm),
            "local_response_norm": OpImpl(reference.local_response_norm),
            "add_layer_norm": OpImpl(reference.add_layer_norm),
            "add_rms_norm": OpImpl(reference.add_rms_norm),
        },
        description="normkit's from-scratch implementation with hand-derived backward",
    )
)


def _load_triton() -> None:
    try:
        from .ops.triton.backend import register
    except ImportError:  # Triton not installed: the backend is simply not there
        return
    register()


def _triton_could_run() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


register_lazy_backend("triton", _load_triton, _triton_could_run)
