"""Host-side autograd helpers shared by the kernel backends (Triton and numba): what a custom op
needs around it to behave under ``torch.func``, whatever computes it."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch._functorch.utils import unwrap_dead_wrappers

from normkit._checks import PLAIN_TYPES as _PLAIN_TYPES

__all__ = [
    "batched_by_autograd",
    "check_saveable",
    "direct_apply",
    "eager_plain",
    "forward_ad_refusal",
    "graph_vjp",
    "inference_mode",
    "plain_tensors",
    "records_graph",
    "recording",
    "refuse_forward_ad_early",
    "saved_tensor_hooks_active",
    "unpacked_once",
    "vmap_by_loop",
    "without_graph",
]


def direct_apply(function: type[torch.autograd.Function]) -> Callable[..., object]:
    """``function.apply`` for eager calls outside torch.func whose arguments are all positional:
    the C++ apply directly, as ``Function.apply`` itself ends, without its binding of the
    arguments to ``forward``'s signature (``inspect``: 20-36 us a call, measured with the
    launches mocked in ``benchmarks/results/triton_host_cpu.md``)."""
    apply = super(torch.autograd.Function, function).apply

    def call(*args):
        return apply(*unwrap_dead_wrappers(args))

    return call


def eager_plain(*tensors: Tensor | None) -> bool:
    """Whether a call on ``tensors`` runs eagerly on plain tensors, so that a launcher may skip
    its custom op and, without autograd recording, its autograd Function: not traced by
    torch.compile, no torch.func transform active, no forward-mode ``dual_level`` open (a
    tangent needs the Function's refusal), and none of ``tensors`` a functorch wrapper left
    behind by a finished transform (it has no storage to read) or a tensor subclass (a wrapper
    such as a logging or sharded tensor may have no storage either; the custom op hands it to
    the subclass's ``__torch_dispatch__``), not recorded by ``torch.jit.trace`` (its sizes are
    traced values). About half a microsecond."""
    if (torch._C._are_functorch_transforms_active() or fwAD._current_level >= 0 or torch.compiler.is_compiling()
            or torch._C._get_tracing_state() is not None):
        return False
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN_TYPES or wrapped(t)):
            return False
    return True


def batched_by_autograd(grads: tuple[Tensor | None, ...]) -> bool:
    """Whether a backward's upstream gradients come from autograd's own vmap over it
    (``autograd.grad(..., is_grads_batched=True)``, ``jacobian(..., vectorize=True)``; not
    torch.func, whose wrappers the kernels unwrap): batched tensors without storage, which a
    kernel reading by address cannot take."""
    return not torch._C._are_functorch_transforms_active() and not all(
        g is None or torch._C._has_storage(g) for g in grads)


def plain_tensors(args: tuple) -> bool:
    """Whether every tensor among ``args`` is a plain one (not a subclass)."""
    for a in args:
        if isinstance(a, Tensor) and type(a) not in _PLAIN_TYPES:
            return False
    return True


def without_graph(t: Tensor, *inputs: Tensor | None) -> Tensor:
    """``t``, detached where none of ``inputs`` (all it depends on) requires grad: one autograd
    node computing several results ties each to every input, so such a result would otherwise
    require grad and keep a graph it has no gradient through (QK-norm's k_out when only q
    requires grad)."""
    if any(i is not None and i.requires_grad for i in inputs):
        return t
    return t.detach()


def vmap_by_loop(op) -> None:
    """Give the custom op ``op`` a batching rule for ``torch.func.vmap``: one call per batch
    element, the results stacked. Exact (each call is an ordinary call of the op), and what
    per-sample gradients (``vmap(grad(...))``) and ``jacrev`` need: a backward run per
    cotangent sums the weight gradient over that cotangent's rows only. It costs one launch
    per batch element."""

    def rule(info, in_dims, *args):
        outs = [
            op(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims, strict=True)))
            for i in range(info.batch_size)
        ]
        if isinstance(outs[0], Tensor):
            return torch.stack(outs), 0
        return tuple(torch.stack(o) for o in zip(*outs, strict=True)), (0,) * len(outs[0])

    torch.library.register_vmap(op, rule)


def forward_ad_refusal(kernels: str) -> Callable[..., None]:
    """The ``jvp`` of the autograd Functions around ``kernels`` (``"triton"``, ``"numba"``):
    they have a backward formula only, so an error instead of the zero tangents a custom op
    alone would give."""

    def refuse(ctx, *tangents) -> None:
        raise RuntimeError(
            "forward-mode AD (torch.func.jvp, torch.func.jacfwd, torch.autograd.forward_ad) is not "
            f"supported by normkit's {kernels} kernels, which have a backward formula only; use "
            "backend='torch' (or 'reference') for forward-mode derivatives, or reverse mode "
            "(torch.func.grad, vjp, jacrev)"
        )

    return refuse


def refuse_forward_ad_early(refuse: Callable[..., None], *tensors: Tensor | None) -> None:
    """``refuse`` (a :func:`forward_ad_refusal`) before any work, for a launcher that writes
    running statistics before its autograd Function runs: a tensor carrying a forward-mode
    tangent would otherwise meet the error only after the write."""
    if torch.compiler.is_compiling():
        return
    if any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors):
        refuse(None)


def inference_mode() -> bool:
    """``torch.inference_mode()`` is on (autograd records nothing there, even under
    ``torch.enable_grad()``); False while torch.compile traces (dynamo cannot read the mode)."""
    return not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()


def recording(*tensors: Tensor | None) -> bool:
    """Whether autograd records a call on ``tensors`` now: grad mode on outside inference mode
    (which records nothing, even under ``torch.enable_grad()``) and one of them requires grad."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # (a loop, not any() over a generator: asked on every eager call)
        if t is not None and t.requires_grad:
            return not inference_mode()
    return False


def check_saveable(inputs: tuple[Tensor | None, ...], saved: tuple[Tensor | None, ...]) -> None:
    """Raise autograd's error, before anything is computed or written, when autograd will
    record this call (grad mode, an input requiring grad) and a tensor it saves for the
    backward is an inference tensor: ATen's norms check this before they update running
    statistics, and a launcher that only met it at ``save_for_backward`` would already have."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        return
    if any(t is not None and t.requires_grad for t in inputs) and any(
        t is not None and t.is_inference() for t in saved
    ):
        raise RuntimeError(
            "Inference tensors cannot be saved for backward. Please do not use Tensors created in "
            "inference mode in computation tracked by autograd. To work around this, you can make "
            "a clone to get a normal tensor and use it in autograd, or use `torch.no_grad()` "
            "instead of `torch.inference_mode()`."
        )


def records_graph(saved: tuple[Tensor | None, ...], grads: tuple[Tensor | None, ...]) -> bool:
    """Whether a backward running now must build a graph of its own: autograd runs it with
    ``create_graph=True`` (grad mode on) and something it reads requires grad, so its results
    can be differentiated again (gradient penalties, MAML, Hessian-vector products). False for
    a first-order backward, and under a single ``torch.func.grad`` or ``vmap(grad)``: torch.func
    always runs the backward with grad mode on, on tensors tracked by that same transform,
    whose gradient is then taken out of it; only tracking by an outer transform
    (``jacrev(grad)``) or by autograd outside counts."""
    if not torch.is_grad_enabled():
        return False
    tensors = [t for t in (*saved, *grads) if t is not None]
    if not torch._C._are_functorch_transforms_active():
        return any(t.requires_grad for t in tensors)
    level = torch._C._functorch.current_level()
    return any(_tracked_outside(t, level) for t in tensors)


class unpacked_once:  # noqa: N801  (stands in for a ctx, read as one)
    """``ctx`` with its saved tensors unpacked once, for a backward that reads them more than
    once (:func:`records_graph`, then the backward it chooses). Each read of
    ``ctx.saved_tensors`` unpacks them again, and non-reentrant activation checkpointing
    (``torch.utils.checkpoint(..., use_reentrant=False)``) refuses a second unpack: a double
    backward through a checkpointed kernel op raised its CheckpointError. Every other attribute
    is the ctx's own. ``prepare``, if given, is applied to each saved tensor (not None) once."""

    __slots__ = ("_ctx", "saved_tensors")

    def __init__(self, ctx: object, prepare: Callable[[Tensor], Tensor] | None = None) -> None:
        saved = ctx.saved_tensors  # type: ignore[attr-defined]
        if prepare is not None:
            saved = tuple(None if t is None else prepare(t) for t in saved)
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "saved_tensors", saved)

    def __getattr__(self, name: str) -> object:
        return getattr(self._ctx, name)

    def __setattr__(self, name: str, value: object) -> None:
        setattr(self._ctx, name, value)


def _tracked_outside(t: Tensor, level: int) -> bool:
    """``t`` is differentiated by a torch.func level below ``level`` or by plain autograd."""
    ft = torch._C._functorch
    while ft.is_functorch_wrapped_tensor(t):
        if ft.is_gradtrackingtensor(t) and ft.maybe_get_level(t) < level:
            return True
        t = ft.get_unwrapped(t)
    return t.requires_grad


def graph_vjp(
    fn: Callable[..., Tensor | tuple[Tensor, ...]], args: tuple[object, ...], grads: tuple[Tensor | None, ...]
) -> tuple[Tensor | None, ...]:
    """The vector-Jacobian product of ``fn`` at ``args`` with the cotangents ``grads`` (one per
    result of ``fn``, None for none), itself differentiable (a graph back to ``args`` and
    ``grads``): one entry per argument, the gradient of each Tensor argument that requires grad
    (zeros where no result depends on it), None for the others. ``fn`` must be written in
    differentiable torch operations (the composition a kernel's backward stands for).

    ``torch.func.vjp``, not ``torch.autograd.grad``: an argument may be a result of the node
    whose backward is running (a saved output, such as an add-norm's ``residual_out``), and a
    reentrant ``autograd.grad`` towards it runs that node's backward again, without end."""
    wrt = [i for i, a in enumerate(args) if isinstance(a, Tensor) and a.requires_grad]
    if not wrt:
        return (None,) * len(args)
    if _saved_tensor_hooks() is not None and not torch._C._are_functorch_transforms_active():
        return _graph_vjp_under_hooks(fn, args, grads, wrt)

    def of(*primals: Tensor) -> tuple[Tensor, ...]:
        full = list(args)
        for i, p in zip(wrt, primals, strict=True):
            full[i] = p
        outs = fn(*full)
        return outs if isinstance(outs, tuple) else (outs,)

    with torch.enable_grad():
        outs, pullback = torch.func.vjp(of, *(args[i] for i in wrt))
        found = pullback(
            tuple(torch.zeros_like(o) if g is None else g.to(o.dtype) for o, g in zip(outs, grads, strict=True))
        )
    got = dict(zip(wrt, found, strict=True))
    return tuple(got.get(i) for i in range(len(args)))


_saved_tensor_hooks = functools.partial(torch._C._autograd._top_saved_tensors_default_hooks, False)


def saved_tensor_hooks_active() -> bool:
    """Whether ``torch.autograd.graph.saved_tensors_hooks`` (``save_on_cpu``, non-reentrant
    checkpointing, offloading) are in force: saved tensors may come back from their unpack hook
    in another layout."""
    return _saved_tensor_hooks() is not None


def _graph_vjp_under_hooks(fn, args, grads, wrt: list[int]) -> tuple[Tensor | None, ...]:
    """:func:`graph_vjp` where saved-tensor hooks are in force (``save_on_cpu``, offloading),
    which ``torch.func`` refuses: ``torch.autograd.grad`` with ``create_graph``, taken at views
    of the arguments, so that it stops there and never reruns the node whose backward is
    running (an argument may be that node's saved output)."""
    with torch.enable_grad():
        full = list(args)
        for i in wrt:
            full[i] = args[i].view_as(args[i])
        outs = fn(*full)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, torch.zeros_like(o) if g is None else g.to(o.dtype))
                 for o, g in zip(outs, grads, strict=True) if o.requires_grad]
        found = torch.autograd.grad([o for o, _ in pairs], [full[i] for i in wrt], [g for _, g in pairs],
                                    create_graph=True, allow_unused=True, materialize_grads=True)
    got = dict(zip(wrt, found, strict=True))
    return tuple(got.get(i) for i in range(len(args)))
