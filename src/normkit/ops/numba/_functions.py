"""The autograd Functions around normkit's numba kernels, for their launchers
(:mod:`normkit.ops.numba.row_norm`, :mod:`.channel_norm`, :mod:`.blocks`).

API:

* vmap rules and the forward-mode refusal come from :mod:`normkit.ops._autograd`, shared with
  the triton backend.
* :func:`autograd_pair` ``(fwd_op, setup_context, backward, bwd_op)``: an autograd.Function
  around a ``torch.library`` forward op, its backward op wrapped for ``torch.func``; compiled
  code calls the custom ops directly (their fake implementations keep ``fullgraph=True``).
  Without autograd recording an eager call runs the op's implementation alone.
* :func:`eager_function` ``(name, forward, backward, graph_backward)``: a leaner Function for
  eager calls on plain tensors, no custom op at all (the row norms at small shapes, where
  each microsecond shows).

No kernel lives here: editing this file changes no compiled code (though it still refreshes
the on-disk cache's stamp, as any file of this package does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from normkit.ops._autograd import (
    batched_by_autograd,
    direct_apply,
    eager_plain,
    forward_ad_refusal,
    plain_tensors,
    recording,
    records_graph,
    unpacked_once,
)

__all__ = ["autograd_pair", "eager_function", "refuse_forward_ad"]

# The numba kernels' forward-mode refusal (a jvp for their autograd Functions).
refuse_forward_ad = forward_ad_refusal("numba")


def autograd_pair(
    fwd_op, setup, backward, bwd_op, fwd_impl=None, bwd_impl=None, *, graph_backward=None
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``(forward_call, backward_call)`` for a pair of custom ops: eager code goes through an
    ``autograd.Function`` (works under torch.func; forward mode raises), compiled code calls
    the ops, whose autograd formula is registered with ``torch.library.register_autograd``.

    ``graph_backward(ctx, *grads)``, with ``backward``'s signature and results, computes the
    gradients in differentiable torch operations: the eager backward calls it instead of the
    kernel when it must build a graph (``create_graph=True`` with something it reads requiring
    grad: gradient penalties, MAML, Hessian-vector products; see
    :func:`normkit.ops._autograd.records_graph`), so second and higher derivatives are exact.
    A first-order backward always runs the kernel. Without it a second derivative raises
    instead of silently dropping terms.

    ``fwd_impl``/``bwd_impl``, the ops' own Python implementations, are called directly in
    eager code outside torch.func transforms: the same kernels without the custom-op dispatch
    (tens of microseconds a call, and seconds once per process: torch imports dynamo at a
    custom op's first call)."""
    torch.library.register_autograd(fwd_op, backward, setup_context=setup)
    direct_fwd = _direct(fwd_op, fwd_impl)
    direct_bwd = _direct(bwd_op, bwd_impl)
    run_backward = _kernel_or_graph(backward, graph_backward)

    class Forward(torch.autograd.Function):
        generate_vmap_rule = True
        setup_context = staticmethod(setup)
        jvp = staticmethod(refuse_forward_ad)

        @staticmethod
        def forward(*args):
            return direct_fwd(*args)

        backward = staticmethod(run_backward)

    class Backward(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(*args):
            return direct_bwd(*args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, *grads):
            raise RuntimeError(
                f"second-order gradients through normkit's numba kernels ({bwd_op._name}) are not "
                "supported; use backend='torch' (or 'reference') for double backward"
            )

        jvp = staticmethod(refuse_forward_ad)

    fast_fwd, fast_bwd = direct_apply(Forward), direct_apply(Backward)

    def forward_call(*args):
        if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
            return fwd_op(*args)
        if torch._C._are_functorch_transforms_active():
            return Forward.apply(*args)
        if fwd_impl is not None and _untracked(args):
            return fwd_impl(*args)
        return fast_fwd(*args)

    def backward_call(*args):
        if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
            return bwd_op(*args)
        if torch._C._are_functorch_transforms_active():
            return Backward.apply(*args)
        if bwd_impl is not None and _untracked(args):
            return bwd_impl(*args)
        return fast_bwd(*args)

    return forward_call, backward_call


def eager_function(
    name: str,
    forward: Callable[..., Any],
    backward: Callable[..., Any],
    graph_backward: Callable[..., Any] | None = None,
) -> Callable[..., Any]:
    """The C++ apply of an autograd Function named ``name`` for eager calls on plain tensors:
    ``forward(ctx, *args)`` runs the kernels and saves what ``backward(ctx, *grads)`` reads,
    without a custom op, so a call costs the Function alone (the custom ops and
    :func:`autograd_pair`'s Function serve torch.compile and torch.func). ``graph_backward``
    as :func:`autograd_pair`'s: the backward when it must build a graph. Forward mode
    raises.

    Call it only where :func:`~normkit.ops._autograd.eager_plain` holds for every tensor
    argument: that check already refuses the functorch wrappers a finished transform leaves
    behind, so the apply skips the unwrapping :func:`~normkit.ops._autograd.direct_apply`
    does (9 arguments: about 1 us a call)."""

    run_backward = _kernel_or_graph(backward, graph_backward, by_address=True)

    function = type(
        name,
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward),
            "backward": staticmethod(run_backward),
            "jvp": staticmethod(refuse_forward_ad),
        },
    )
    return super(torch.autograd.Function, function).apply


def _kernel_or_graph(
    backward: Callable[..., Any], graph_backward: Callable[..., Any] | None, by_address: bool = False
) -> Callable[..., Any]:
    """A Function's backward: ``backward(ctx, *grads)`` (the kernel), or ``graph_backward``
    where autograd needs a graph of the backward itself (:func:`records_graph`) or, for a
    ``backward`` reading its gradients by address (``by_address``), where they have no storage."""

    def run(ctx, *grads):
        if by_address and graph_backward is not None and batched_by_autograd(grads):
            return graph_backward(ctx, *grads)
        if graph_backward is not None and torch.is_grad_enabled():
            ctx = unpacked_once(ctx)  # (a checkpointed op's tensors unpack once only)
            if records_graph(ctx.saved_tensors, grads):
                return graph_backward(ctx, *grads)
        return backward(ctx, *grads)

    return run


def _untracked(args: tuple) -> bool:
    """An eager call on ``args`` that autograd would not record (grad mode off, as in every
    first-order backward, inference mode, or no tensor requiring grad) and :func:`eager_plain`: its autograd
    Function would only add its cost (4-8 us a call), so the launcher runs the kernel itself."""
    tensors = [a for a in args if isinstance(a, Tensor)]
    if recording(*tensors):
        return False
    return eager_plain(*tensors)


def _direct(op, impl):
    """``impl`` where no torch.func transform is active and every tensor is a plain one, else
    ``op`` (whose vmap rule handles batched tensors, and which hands a tensor subclass to its
    ``__torch_dispatch__``)."""
    if impl is None:
        return op

    def call(*args):
        if torch._C._are_functorch_transforms_active() or not plain_tensors(args):
            return op(*args)
        return impl(*args)

    return call
