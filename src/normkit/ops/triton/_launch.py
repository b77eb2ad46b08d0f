"""Host-side helpers shared by the Triton launchers (row norms and BatchNorm)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor

from normkit._environ import EnvWatch
from normkit.ops._autograd import (
    batched_by_autograd,
    check_saveable,
    direct_apply,
    forward_ad_refusal,
    inference_mode,
    records_graph,
    saved_tensor_hooks_active,
    unpacked_once,
    vmap_by_loop,
)
from normkit.ops._autograd import refuse_forward_ad_early as _refuse_early
from normkit.ops.triton.backend import interpreting as interpreted

__all__ = [
    "BLOCK_ENV_VAR",
    "FP_FUSION",
    "block_override",
    "check_saveable",
    "dense",
    "device_of",
    "eager_and_compiled",
    "eager_direct",
    "first_order",
    "cdiv",
    "interpreted",
    "next_power_of_2",
    "planned_for",
    "refuse_forward_ad",
    "refuse_forward_ad_early",
    "sm_count",
    "strides",
    "vmap_by_loop",
]

# Caps a launcher's tile, in elements (a power of two): how the tests reach the chunked paths
# and many programs with small shapes. Read at each launch (a change takes effect on the next
# one; cached between changes: normkit._environ); ``block_n=`` on a launcher wins.
BLOCK_ENV_VAR = "NORMKIT_TRITON_BLOCK_N"
_BLOCK_ENV = EnvWatch(BLOCK_ENV_VAR)


# The launchers' integer arithmetic on the host. triton.cdiv and triton.next_power_of_2 give
# the same values but are Triton constexpr functions, about 2.5 us a call from Python: several
# a launch made them a large share of a small call's host time (issue 15 item 9).
def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers (``triton.cdiv``)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (``triton.next_power_of_2``: 0 for 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


# Every launch passes enable_fp_fusion=FP_FUSION: no multiply-add contraction into FMA, so each
# product and sum rounds as written, as under the CPU interpreter the tests run on. Pinned
# because Triton's default is not stable across releases (issue 15: 3.10 flips it).
FP_FUSION = False


# The SM count grids are sized for when set (the static report plans launches for an sm_90
# without one); otherwise the current CUDA device's.
_PLANNED_SMS: ContextVar[int | None] = ContextVar("normkit_triton_planned_sms", default=None)


@contextlib.contextmanager
def planned_for(sms: int) -> Iterator[None]:
    """Size every grid launched inside the block for a GPU of ``sms`` SMs, whatever the
    tensors' device: how ``normkit.ops.triton.static_report`` sees an H100's grids on a CPU."""
    token = _PLANNED_SMS.set(sms)
    try:
        yield
    finally:
        _PLANNED_SMS.reset(token)


def sm_count(device: torch.device) -> int | None:
    """The SMs the launchers size their grids for: the planned count, else the CUDA device's,
    else None (the CPU interpreter, where a handful of programs is enough)."""
    planned = _PLANNED_SMS.get()
    if planned is not None:
        return planned
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return None


@functools.cache
def _cuda_sms(index: int) -> int:
    # A device's SM count does not change while the process runs.
    return torch.cuda.get_device_properties(index).multi_processor_count


def block_override(block_n: int | None) -> int | None:
    """``block_n``, else ``$NORMKIT_TRITON_BLOCK_N``, else None; checked to be a power of two."""
    if block_n is None:
        env = _BLOCK_ENV.get()
        if env:
            block_n = int(env)
    if block_n is not None and (block_n < 1 or block_n & (block_n - 1)):
        raise ValueError(f"block_n must be a power of two >= 1, got {block_n}")
    return block_n


def device_of(t: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def dense(t: Tensor | None) -> Tensor | None:
    """``t`` with unit stride (a copy only for a strided or expanded view): the kernels read
    weights and biases as ``P + offsets``, so a parameter that is a view with another stride
    (``W[:, 0]``, ``w.expand(C)``, a vmapped slice) must be made dense before the launch."""
    return None if t is None else t.contiguous()


def strides(t3: Tensor) -> tuple[int, int, int]:
    """The strides of an ``(N, C, S)`` view, as the kernels take them."""
    return t3.stride(0), t3.stride(1), t3.stride(2)


# The triton kernels' forward-mode refusal (a jvp for their autograd Functions).
refuse_forward_ad = forward_ad_refusal("triton")


def refuse_forward_ad_early(*tensors: Tensor | None) -> None:
    """:func:`refuse_forward_ad` before a launcher writes running statistics."""
    _refuse_early(refuse_forward_ad, *tensors)


def first_order(op, body: Callable[..., Any] | None = None) -> type[torch.autograd.Function]:
    """An ``autograd.Function`` that calls the backward custom op ``op`` (or its Python
    ``body``): usable inside ``torch.func`` transforms (a bare custom op without an autograd
    formula is not), and differentiating it again raises an error instead of silently
    dropping the term."""

    class FirstOrder(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(*args):
            return (body or op)(*args)

        @staticmethod
        def setup_context(ctx, inputs, output) -> None:
            pass

        @staticmethod
        def backward(ctx, *grads):
            raise RuntimeError(
                f"second-order gradients through normkit's triton kernels ({op._namespace}::{op._name}) are not "
                "supported here: the backward kernels have no derivative, and the eager backward builds "
                "the differentiable graph only when autograd records one (create_graph=True); use "
                "backend='torch' (or 'reference') for double backward under torch.compile"
            )

        jvp = staticmethod(refuse_forward_ad)

    FirstOrder.__name__ = FirstOrder.__qualname__ = f"FirstOrder_{op._name}"
    return FirstOrder


def _recording_layouts(setup: Callable[..., None]) -> Callable[..., None]:
    """``setup`` (a Function's ``setup_context``) that, where saved-tensor hooks are in force,
    also records the strides of each tensor it saves (``ctx.saved_layouts``): an unpack hook may
    hand a tensor back in another layout (``save_on_cpu``, a compression or offload hook), and the
    kernels read saved tensors by address in the layout the forward saved. Without hooks the
    saved tensors come back as they were: nothing is recorded."""

    def setup_context(ctx, inputs, output) -> None:
        if not saved_tensor_hooks_active():
            return setup(ctx, inputs, output)
        save = ctx.save_for_backward

        def save_for_backward(*tensors: Tensor | None) -> None:
            ctx.saved_layouts = [t.stride() for t in tensors if t is not None]
            save(*tensors)

        ctx.save_for_backward = save_for_backward
        try:
            setup(ctx, inputs, output)
        finally:
            del ctx.save_for_backward

    return setup_context


def _unpacked(ctx) -> unpacked_once:
    """``ctx``'s saved tensors unpacked once, each in the layout the forward saved it in (a copy
    only where an unpack hook changed it; one expanded along an axis comes back contiguous)."""
    layouts = getattr(ctx, "saved_layouts", None)
    if layouts is None:
        return unpacked_once(ctx)
    strides = iter(layouts)

    def as_saved(t: Tensor) -> Tensor:
        stride = next(strides)
        if t.stride() == stride:
            return t
        if 0 in stride:
            return t.contiguous()
        return torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t)

    return unpacked_once(ctx, as_saved)


def eager_direct() -> bool:
    """A custom op's Python body may be called directly, skipping the dispatcher (issue 15
    item 9): neither compiled code nor ``torch.jit.trace`` (which must see the op) nor a
    torch.func transform (which needs the op's vmap rule) is running."""
    return (not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()
            and torch._C._get_tracing_state() is None)


def eager_and_compiled(
    fwd_op, setup, bwd, bwd_op, *, graph_backward: Callable[..., Any] | None = None
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The forward and backward calls of a kernel pair. Compiled code calls the custom ops
    ``fwd_op``/``bwd_op`` themselves, whose registered autograd Dynamo traces (it cannot trace
    an ``autograd.Function`` with a custom ``jvp``). Eager code calls an ``autograd.Function``
    (``setup``/``bwd`` its autograd formula, forward mode refused, and :func:`first_order`
    around the backward): under ``torch.func`` one whose forward is the custom op (vmap rules
    generated from the ops' own), otherwise one whose forward is the op's Python body itself,
    the cheapest eager path (no dispatcher round trip, no schema checks: issue 15 item 9).

    ``graph_backward(ctx, *grads)``, with ``bwd``'s signature and results, computes the
    gradients in differentiable torch operations (:mod:`normkit.ops.triton._graph_backward`):
    the eager backward calls it instead of the kernel when it must build a graph
    (``create_graph=True`` with something it reads requiring grad:
    :func:`normkit.ops._autograd.records_graph`), so second and higher derivatives (gradient
    penalties, MAML, Hessian-vector products) are those of the op's torch composition. A
    first-order backward always runs the kernel."""

    def either_backward(ctx, *grads):
        # The saved tensors unpacked once (a checkpointed op's unpack once only), each in the
        # layout the forward saved: the kernels read them by address.
        ctx = _unpacked(ctx)
        if graph_backward is not None:
            if batched_by_autograd(grads):
                return graph_backward(ctx, *grads)
            if torch.is_grad_enabled() and records_graph(ctx.saved_tensors, grads):
                return graph_backward(ctx, *grads)
        return bwd(ctx, *grads)

    def function(fwd, name: str) -> type[torch.autograd.Function]:
        class Kernel(torch.autograd.Function):
            generate_vmap_rule = True
            forward = staticmethod(fwd)
            setup_context = staticmethod(_recording_layouts(setup))
            backward = staticmethod(either_backward)
            jvp = staticmethod(refuse_forward_ad)

        Kernel.__name__ = Kernel.__qualname__ = name
        return Kernel

    # A custom op keeps its Python body as _init_fn (torch.library.CustomOpDef, torch 2.4+).
    fwd_body, bwd_body = fwd_op._init_fn, bwd_op._init_fn
    through_op = function(fwd_op, f"Kernel_{fwd_op._name}")
    direct = function(fwd_body, f"Direct_{fwd_op._name}")
    backward_through_op, backward_direct = first_order(bwd_op), first_order(bwd_op, bwd_body)
    fast_direct, fast_backward_direct = direct_apply(direct), direct_apply(backward_direct)

    # Compiled code and torch.jit.trace (whose sizes are traced values) call the custom ops.
    def forward_call(*args):
        if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
            return fwd_op(*args)
        if torch._C._are_functorch_transforms_active():
            return through_op.apply(*args)
        if inference_mode():  # nothing is recorded, and a Function would try to save
            return fwd_body(*args)
        return fast_direct(*args)

    def backward_call(*args):
        if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
            return bwd_op(*args)
        if torch._C._are_functorch_transforms_active():
            return backward_through_op.apply(*args)
        return fast_backward_direct(*args)

    return forward_call, backward_call
