"""The backends normkit ships, registered with :mod:`normkit.backends`.

* ``"torch"``: ATen's kernels, with the compositions ATen lacks (the fused residual ops, the
  norm + activation ops, ``normalize`` over any dims, the masked norms, the norms of the table
  without a torch twin) written in torch ops.
* ``"reference"``: :mod:`normkit.reference`, the from-scratch implementation.
* ``"triton"`` and ``"numba"``: kernel backends, loaded on first use. Each backend's own module
  (``normkit.ops.<name>.backend``) imports nothing heavy; it says whether the backend could run
  here (``is_available``), which calls it declines (``declared_ops``) and registers the kernels
  (``register``) when the registry first looks the backend up.

:mod:`normkit` imports this module once, after :mod:`normkit.functional`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import blocks, masked, numerics, reference  # noqa: F401  (masked: declares its ops)
from .._layouts import aten_batch_norm_grads, aten_instance_norm_grads
from ..backends import Backend, OpImpl, _never, register_backend, register_lazy_backend
from ..functional import _cudnn, activate
from ..norms import NORMS, NormSpec

__all__: list[str] = []


def _torch_add_layer_norm(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5, residual_dtype=None):
    residual_out = reference._add(x, residual, residual_dtype)
    dt = residual_out.dtype  # normalize the residual stream at its own precision
    weight, bias = (None if p is None else reference._as(p, dt) for p in (weight, bias))
    return reference._as(F.layer_norm(residual_out, normalized_shape, weight, bias, eps), x.dtype), residual_out


def _torch_add_rms_norm(x, residual, normalized_shape, weight=None, eps=None, residual_dtype=None):
    residual_out = reference._add(x, residual, residual_dtype)
    eps = numerics.rms_eps(eps, residual_out.dtype)
    weight = None if weight is None else reference._as(weight, residual_out.dtype)
    return reference._as(F.rms_norm(residual_out, normalized_shape, weight, eps), x.dtype), residual_out


# The add-norms' ordinary call (OpImpl.plain: checked, plain tensors of one dtype and device, no
# residual_dtype): every cast above returns its tensor unchanged, and no argument overrides
# __torch_function__, so this is what users write without normkit, minus torch.nn.functional's
# Python wrapper. (ATen's rms_norm takes eps=None as numerics.default_rms_eps: float32's machine
# epsilon for fp16/bf16 input; tests/test_overhead_session9.py holds it to that.)


def _plain_add_layer_norm(x, residual, normalized_shape, weight, bias, eps, residual_dtype):
    residual_out = x if residual is None else x + residual
    return torch.layer_norm(residual_out, normalized_shape, weight, bias, eps, _cudnn()), residual_out


def _plain_add_rms_norm(x, residual, normalized_shape, weight, eps, residual_dtype):
    residual_out = x if residual is None else x + residual
    return torch.rms_norm(residual_out, normalized_shape, weight, eps), residual_out


def _torch_normalize(input, dims, weight=None, bias=None, eps=1e-5, center=True):
    k = len(dims)
    last = tuple(range(input.dim() - k, input.dim()))
    moved = input.movedim(dims, last)
    shape = moved.shape[-k:]
    if center:
        y = F.layer_norm(moved, shape, weight, bias, eps)
    else:
        # ATen's rms_norm casts a float32 weight to a bf16/fp16 input's dtype; keep the output's
        # dtype the input's, as layer_norm does.
        y = F.rms_norm(moved, shape, None if weight is None else weight.to(moved.dtype), eps)
        if bias is not None:
            y = y + bias.to(y.dtype)
    return y.movedim(last, dims)


def _then_act(norm: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The composition ``activate(act, norm(*args))``, for backends without a fused kernel."""

    def norm_act(*args: object) -> Tensor:
        *norm_args, act = args
        return activate(act, norm(*norm_args))  # type: ignore[arg-type]

    norm_act.__name__ = f"{norm.__name__}_act"
    return norm_act


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


def _torch_lrn_unsupported(input, size, alpha=1e-4, beta=0.75, k=1.0):
    if (input.device.type == "cpu" and input.dim() > 3 and input.numel() > 0
            and input.dtype in (torch.float16, torch.bfloat16)):
        return f"ATen has no CPU {input.dtype} avg_pool3d, which its local_response_norm uses for 4-D+ input"
    return None


def _reference_complex_unsupported(*args, **kwargs):
    # torch's rms_norm is composite, so complex input runs there; the reference's statistics
    # are real (it would drop the imaginary part), so it declines rather than be wrong. (The
    # same for every norm not centred, whose torch op is a composition that runs complex.)
    if any(isinstance(a, Tensor) and a.is_complex() for a in (*args, *kwargs.values())):
        return "complex input: the reference computes real statistics only; use backend='torch'"
    return None


def _guarded(fn: Callable[..., Tensor], guard: Callable[[Tensor], Tensor]) -> Callable[..., Tensor]:
    """``guard(fn(...))``: torch's function with the guard on its output (see
    :func:`normkit._layouts.aten_batch_norm_grads`)."""

    def run(*args: object, **kwargs: object) -> Tensor:
        return guard(fn(*args, **kwargs))

    run.__name__ = fn.__name__
    return run


def _table_ops(impl: Callable[[NormSpec], OpImpl]) -> dict[str, OpImpl]:
    """One op per row of :data:`normkit.norms.NORMS`."""
    return {name: impl(spec) for name, spec in NORMS.items()}


register_backend(
    Backend(
        "torch",
        {
            **_table_ops(lambda spec: OpImpl(spec.torch_op)),
            # with the guard on the layout of the upstream gradient ATen's backward reads
            "batch_norm": OpImpl(_guarded(F.batch_norm, aten_batch_norm_grads)),
            "instance_norm": OpImpl(_guarded(F.instance_norm, aten_instance_norm_grads)),
            "local_response_norm": OpImpl(F.local_response_norm, _torch_lrn_unsupported),
            "add_layer_norm": OpImpl(_torch_add_layer_norm, plain=_plain_add_layer_norm),
            "add_rms_norm": OpImpl(_torch_add_rms_norm, plain=_plain_add_rms_norm),
            "normalize": OpImpl(_torch_normalize),
            "batch_norm_act": OpImpl(_then_act(_guarded(F.batch_norm, aten_batch_norm_grads))),
            "group_norm_act": OpImpl(_then_act(F.group_norm)),
            "masked_batch_norm": OpImpl(_torch_masked_batch_norm),
            "masked_instance_norm": OpImpl(_torch_masked_instance_norm),
            **{op: OpImpl(fn) for op, fn in blocks.COMPOSITION.items() if op not in NORMS},  # QK, sandwich
        },
        description="PyTorch's own ATen kernels",
    )
)

register_backend(
    Backend(
        "reference",
        {
            **_table_ops(lambda spec: OpImpl(getattr(reference, spec.name),
                                             _never if spec.centered else _reference_complex_unsupported)),
            "local_response_norm": OpImpl(reference.local_response_norm),
            "add_layer_norm": OpImpl(reference.add_layer_norm),
            "add_rms_norm": OpImpl(reference.add_rms_norm, _reference_complex_unsupported),
            "normalize": OpImpl(reference.normalize),
            "batch_norm_act": OpImpl(_then_act(reference.batch_norm)),
            "group_norm_act": OpImpl(_then_act(reference.group_norm)),
            "masked_batch_norm": OpImpl(reference.masked_batch_norm),
            "masked_instance_norm": OpImpl(reference.masked_instance_norm),
            **{op: OpImpl(fn) for op, fn in blocks.REFERENCE.items() if op not in NORMS},  # QK, sandwich
        },
        description="normkit's from-scratch implementation with hand-derived backward",
    )
)


def _register_kernels(name: str) -> None:
    """The lazy registration of kernel backend ``name`` (its ``backend`` module imports none of
    its dependencies: those are imported by its ``register``, on first use)."""
    import importlib  # noqa: PLC0415

    entry = importlib.import_module(f"normkit.ops.{name}.backend")
    register_lazy_backend(name, entry.register, entry.is_available, declared=entry.declared_ops)


_register_kernels("triton")
_register_kernels("numba")
