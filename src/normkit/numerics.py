"""The numerics policy of every normkit backend, written once.

* **Accumulation dtype** (:func:`acc_dtype`): statistics and the normalization are computed in
  float32, or float64 for float64 input; bf16/fp16 input is widened first.
* **Default eps** (:func:`rms_eps`): the named norms default to ``1e-5`` (torch's); RMSNorm's
  ``eps=None`` is machine epsilon of the accumulation dtype (what torch computes).
* **Variance**: the biased variance normalizes; the running variance takes the unbiased one
  (:func:`unbiased`, Bessel's correction ``n / (n - 1)``), as torch does.
* **Running statistics** (:func:`update_running_stats`): ``running = (1 - momentum) * running +
  momentum * batch``, computed in the accumulation dtype and rounded once to the statistics'
  own dtype, all-or-none. ``momentum=None`` on a module is the cumulative average over the
  batches seen (:func:`momentum_factor`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ._checks import INFERENCE_INPLACE

__all__ = [
    "acc_dtype",
    "default_rms_eps",
    "momentum_factor",
    "rms_eps",
    "unbiased",
    "update_running_stats",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_rms_eps(dtype: torch.dtype) -> float:
    """RMSNorm's ``eps=None``: machine epsilon of the dtype the statistics are computed in
    (float32 for fp16/bf16 input, as torch 2.13 does; its docs say the input's dtype)."""
    return torch.finfo(acc_dtype(dtype)).eps


def rms_eps(eps: float | None, dtype: torch.dtype) -> float:
    """``eps``, or RMSNorm's default for input of ``dtype`` when it is None."""
    return default_rms_eps(dtype) if eps is None else eps


def unbiased(var: Tensor, n: int | Tensor) -> Tensor:
    """Bessel's correction of a biased variance over ``n`` values: ``var * n / (n - 1)``
    (``var`` itself where ``n <= 1``). The running variance is unbiased, the normalizing one
    is not."""
    if isinstance(n, Tensor):
        return torch.where(n > 1, var * n / (n - 1).clamp(min=1), var)
    return var * (n / (n - 1)) if n > 1 else var


def momentum_factor(momentum: float | None, num_batches_tracked: Tensor | None) -> float:
    """The factor a module's running update uses: ``momentum``, or for ``momentum=None`` the
    cumulative average ``1 / (batches seen + 1)`` (this batch included; ``0`` without a
    counter, as torch)."""
    if momentum is not None:
        return momentum
    return 1.0 / float(num_batches_tracked + 1) if num_batches_tracked is not None else 0.0


def update_running_stats(running_mean: Tensor | None, running_var: Tensor | None, batch_mean: Tensor,
                         batch_var: Tensor, momentum: float, *, inference_ok: bool = True) -> None:
    """``running <- (1 - momentum) * running + momentum * batch`` for both statistics, in place.

    Both new values are computed before either is written, so a failure (a size that does not
    match) leaves both untouched. Each is computed in the accumulation dtype of its running
    statistic and rounded once to its dtype (ATen's order).

    Under torch.func's ``grad``/``jvp`` the running statistics are tensors captured from
    outside the transform, which it refuses to let anything write; the update is done below
    the transforms on the plain values, as ATen's kernels write them (the statistics carry no
    gradient). Running statistics that are inference tensors, outside inference mode, are
    written as ATen's batch_norm kernel writes them where ``inference_ok``; otherwise torch's
    in-place error (its instance_norm's) is raised before any write.
    """
    pairs = [(r, b) for r, b in ((running_mean, batch_mean), (running_var, batch_var)) if r is not None]
    for running, batch in pairs:
        if running.numel() != batch.numel():
            raise RuntimeError(f"running statistics should contain {batch.numel()} elements not {running.numel()}")
    below = not torch.compiler.is_compiling() and not any(_is_batched(r) for r, _ in pairs)
    if below:
        pairs = [(r, _without_grad_wrappers(b)) for r, b in pairs]
    inference = below and not torch.is_inference_mode_enabled() and any(r.is_inference() for r, _ in pairs)
    if inference and not inference_ok:
        raise RuntimeError(INFERENCE_INPLACE)
    with torch.no_grad(), (torch._C._DisableFuncTorch() if below else contextlib.nullcontext()):
        new = [(b.to(acc_dtype(r.dtype)) * momentum + r.to(acc_dtype(r.dtype)) * (1.0 - momentum)).to(r.dtype)
               for r, b in pairs]
        with torch.inference_mode() if inference else contextlib.nullcontext():
            for (r, _), value in zip(pairs, new):
                r.copy_(value.view_as(r))


def _without_grad_wrappers(t: Tensor) -> Tensor:
    """``t`` without torch.func's grad/jvp wrappers (a vmap level is kept)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t) and not functorch.is_batchedtensor(t):
        t = functorch.get_unwrapped(t)
    return t


def _is_batched(t: Tensor) -> bool:
    """Whether ``t`` is batched by a ``torch.func.vmap`` at any level (under its grad wrappers)."""
    if torch.compiler.is_compiling():  # dynamo cannot trace the functorch queries; it sees no vmap here
        return False
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False
