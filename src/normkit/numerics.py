"""The numerics policy of every normkit backend, written once.

* **Accumulation dtype** (:func:`acc_dtype`): statistics and the normalization are computed in
  float32, or float64 for float64 input; bf16/fp16 input is widened first.
* **Default eps** (:func:`rms_eps`): the named norms default to ``1e-5`` (torch's); RMSNorm's
  ``eps=None`` is machine epsilon of the accumulation dtype (what torch computes).
* **Variance**: the biased variance normalizes; the running variance takes the unbiased one
  (:func:`unbiased`, Bessel's correction ``n / (n - 1)``), as torch does.
* **Running statistics** (:func:`update_running_stats`): ``running = (1 - momentum) * running +
  momentum * batch``, computed in the accumulation dtype and rounded once to the statistics'
  own dtype, all-or-none; statistics that share memory are written in ATen's order.
  ``momentum=None`` on a module is the cumulative average over the batches seen
  (:func:`momentum_factor`).
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
    return 1.0 / (float(num_batches_tracked) + 1.0) if num_batches_tracked is not None else 0.0


def update_running_stats(running_mean: Tensor | None, running_var: Tensor | None, batch_mean: Tensor,
                         batch_var: Tensor, momentum: float, *, inference_ok: bool = True) -> None:
    """``running <- (1 - momentum) * running + momentum * batch`` for both statistics, in place.

    Both new values are computed before either is written, so a failure (a size that does not
    match) leaves both untouched. Each is computed in the accumulation dtype of its running
    statistic and rounded once to its dtype (ATen's order).

    Two ways of writing, ATen's two (``inference_ok`` picks one):

    * ``True``, ATen's batch_norm kernel: it writes through element pointers, channel by
      channel, the mean then the variance, each read from memory as last written. Running
      statistics whose elements share memory (an ``expand``-ed one, one tensor given as both,
      two overlapping views) are accepted and get what that loop gives on one thread (on
      several, ATen's threads race on the shared elements and its result varies from run to
      run); inference tensors are written too, outside inference mode.
    * ``False``, ATen's instance_norm: it copies the new mean in, then the new variance (one
      tensor given as both ends with the variance). A statistic whose elements share memory or
      that is an inference tensor (outside inference mode) is refused with torch's error
      before anything is written, where ATen refuses the variance after writing the mean.

    Under torch.func's ``grad``/``jvp`` the running statistics are tensors captured from
    outside the transform, which it refuses to let anything write; the update is done below
    the transforms on the plain values, as ATen's kernels write them (the statistics carry no
    gradient).
    """
    # (detached: torch.jit.trace does not record no_grad, so a replayed update would otherwise
    # make the running statistics require grad)
    pairs = [(r, b.detach()) for r, b in ((running_mean, batch_mean), (running_var, batch_var)) if r is not None]
    for running, batch in pairs:
        if running.numel() != batch.numel():
            raise RuntimeError(f"running statistics should contain {batch.numel()} elements not {running.numel()}")
    below = not torch.compiler.is_compiling() and not any(_is_batched(r) for r, _ in pairs)
    if below:
        pairs = [(r, _without_grad_wrappers(b)) for r, b in pairs]
    inference = below and not torch.is_inference_mode_enabled() and any(r.is_inference() for r, _ in pairs)
    if inference and not inference_ok:
        raise RuntimeError(INFERENCE_INPLACE)
    # (compiled code has no memory addresses to compare: there, one tensor given as both; under
    # torch.func's grad a running statistic passed in as an input is a wrapper: its memory is the
    # plain tensor's beneath)
    shared = (_shares_memory([_without_grad_wrappers(r) for r, _ in pairs]) if below
              else len(pairs) == 2 and pairs[0][0] is pairs[1][0])
    with torch.no_grad(), (torch._C._DisableFuncTorch() if below else contextlib.nullcontext()):
        with torch.inference_mode() if inference else contextlib.nullcontext():
            if shared and inference_ok:
                _update_channel_by_channel(pairs, momentum)
                return
            if shared:
                for r, _ in pairs:
                    if _has_internal_overlap(r):
                        r.add_(0)  # torch's error for writing such a tensor, raised before it writes
            new = [(b.to(acc_dtype(r.dtype)) * momentum + r.to(acc_dtype(r.dtype)) * (1.0 - momentum)).to(r.dtype)
                   for r, b in pairs]
            for (r, _), value in zip(pairs, new):
                r.copy_(value.view_as(r))


def _update_channel_by_channel(pairs: list[tuple[Tensor, Tensor]], momentum: float) -> None:
    """ATen's batch_norm loop over channels for statistics that share memory: for each channel
    the mean's element, then the variance's, read as last written and rewritten. Each step is
    the arithmetic of the whole-tensor update, so bits agree with it wherever nothing is
    shared. One tensor given as both statistics (the same elements in the same order) has no
    dependence between channels and is done whole, in the same two steps."""
    keep = 1.0 - momentum
    steps = [(r, (b.to(acc_dtype(r.dtype)) * momentum).flatten(), acc_dtype(r.dtype)) for r, b in pairs]
    (rm, _, _), (rv, _, _) = steps[0], steps[-1]
    if len(steps) == 2 and (rm is rv or _same_elements(rm, rv) and not _has_internal_overlap(rm)):
        value = rm
        for _, batch, acc in steps:
            value = (batch.view_as(rm) + value.to(acc) * keep).to(rm.dtype)
        rm.copy_(value)
        return
    cells = [(r.view(-1).unbind(), batch.unbind(), acc, r.dtype) for r, batch, acc in steps]
    for c in range(rm.numel()):
        for flat, batch, acc, dtype in cells:
            cell = flat[c]
            cell.copy_((batch[c] + cell.to(acc) * keep).to(dtype))


def _same_elements(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same memory locations in the same order."""
    return a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()


def _has_internal_overlap(t: Tensor) -> bool:
    """Whether two elements of ``t`` are one memory location (an ``expand``-ed tensor); a
    contiguous tensor never has them, and is answered without the slower test."""
    if t.dim() == 1:  # (the usual running statistic: only a zero stride repeats an element)
        return t.stride()[0] == 0 and t.numel() > 1
    return not t.is_contiguous() and torch._debug_has_internal_overlap(t) == 1


def _shares_memory(stats: list[Tensor]) -> bool:
    """Whether an element of ``stats`` is written twice by one update: one of them with
    elements that share memory, or two whose memory ranges meet (one tensor given as both
    statistics, or overlapping views; views that interleave without sharing an element count
    too, which only costs them the slower update)."""
    if len(stats) == 2 and stats[0].is_contiguous() and stats[1].is_contiguous():  # the common case, quickly
        a, b = stats[0].data_ptr(), stats[1].data_ptr()
        return a < b + stats[1].nbytes and b < a + stats[0].nbytes
    if any(_has_internal_overlap(t) for t in stats):
        return True
    if len(stats) < 2:
        return False
    (lo_a, hi_a), (lo_b, hi_b) = (_byte_range(t) for t in stats)
    return lo_a < hi_b and lo_b < hi_a


def _byte_range(t: Tensor) -> tuple[int, int]:
    """``[first, last)`` bytes of memory that ``t``'s elements lie in (empty for no element)."""
    start = t.data_ptr()
    if t.numel() == 0:
        return start, start
    last = 0
    for n, stride in zip(t.shape, t.stride()):  # (torch's strides are never negative)
        last += (n - 1) * stride
    return start, start + (last + 1) * t.element_size()


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
