"""``normkit.functional``: torch.nn.functional's normalization ops, on any normkit backend.

Each function has exactly torch.nn.functional's signature and defaults plus keyword-only
``backend``, ``stats_dtype`` and ``out_dtype``. The arguments are checked first (torch's
exception types and messages), then the backend is resolved for this call (see
:mod:`normkit.backends`) and computes the result.

Precision controls, on every op and every backend:

* ``stats_dtype``: float32 or float64, the dtype the statistics and the normalization are
  computed in. ``None`` (default) is float32, float64 for float64 input. Another choice runs
  the op on the input and parameters cast to it (running statistics are updated in it and
  written back in their own dtype); only the rounding changes, never the formula (RMSNorm's
  ``eps=None`` stays the input's default).
* ``out_dtype``: the dtype of the result (``None``: the input's). The op then runs at the
  statistics' precision and rounds once to ``out_dtype`` (a bf16 input with
  ``out_dtype=torch.float32`` gives the unrounded float32 result). For the fused residual ops
  it applies to ``y``; ``residual_out`` keeps ``residual_dtype``.

Memory format: every op returns its result in its input's memory format (a channels_last or
channels_last_3d input gives such an output on every backend; ATen's own ``instance_norm`` and
``layer_norm`` return contiguous output there).

Backends here: ``"torch"`` (ATen's kernels), ``"reference"`` (normkit's from-scratch
implementation, :mod:`normkit.reference`) and, where Triton and a GPU are present, ``"triton"``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import handle_torch_function

from . import _checks, numerics
from ._layouts import aten_batch_norm_grads, aten_instance_norm_grads, canonical_strides, keep_layout
from .backends import OPS, auto_choice, define_op, resolve

__all__ = [
    "add_layer_norm",
    "add_rms_norm",
    "batch_norm",
    "batch_norm_act",
    "derf",
    "dyt",
    "gated_rms_norm",
    "group_norm",
    "group_norm_act",
    "instance_norm",
    "layer_norm",
    "local_response_norm",
    "modulated_layer_norm",
    "modulated_rms_norm",
    "normalize",
    "qk_rms_norm",
    "rms_norm",
    "sandwich_rms_norm",
    "scale_norm",
]


# The activations of the norm + activation ops, by name; None is the identity. "gelu" is the
# exact (erf) form.
ACTIVATIONS: dict[str | None, Callable[[Tensor], Tensor] | None] = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    None: None,
}


def check_act(act: str | None) -> None:
    """Raise ValueError unless ``act`` names one of :data:`ACTIVATIONS`."""
    if not isinstance(act, (str, type(None))) or act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {list(ACTIVATIONS)}")


def activate(act: str | None, y: Tensor) -> Tensor:
    """``act(y)``; the identity for ``act=None``."""
    fn = ACTIVATIONS[act]
    return y if fn is None else fn(y)


def _public(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as a public op, behaving as torch.nn.functional's functions do at their door:

    * too many positional arguments raise Python's TypeError in the words torch's twin gets
      (torch's functions have no keyword-only arguments, so Python's message for them never adds
      the "(and 1 keyword-only argument)" that ``backend=`` would add here);
    * the call takes part in torch's ``__torch_function__`` protocol: where an argument overrides
      it (a ``torch.fx`` Proxy, a tensor subclass) or a torch function mode is in force, the
      override receives this public function and the arguments as given. ``torch.fx`` records
      the call as one ``call_function`` node, a subclass sees one call instead of the torch ops
      inside it. Every argument is asked (plain tensors and Python scalars are answered in a
      few nanoseconds), so a Proxy passed as ``weight`` or by keyword is seen too.

    ``__wrapped__`` is ``fn`` itself: the modules' default forward calls it on plain tensors."""
    params = inspect.signature(fn).parameters.values()
    positional = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    most = len(positional)
    least = sum(p.default is inspect.Parameter.empty for p in positional)
    takes = f"{least}" if least == most else f"from {least} to {most}"

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if len(args) > most:
            raise TypeError(f"{fn.__name__}() takes {takes} positional arguments but {len(args)} were given")
        if _has_torch_function(args) or (kwargs and _has_torch_function(tuple(kwargs.values()))):
            return handle_torch_function(call, (*args, *kwargs.values()), *args, **kwargs)
        return fn(*args, **kwargs)

    return call


_has_torch_function = torch._C._has_torch_function  # (torch.overrides.has_torch_function, one lookup less)


def _shape(normalized_shape: Sequence[int]) -> tuple[int, ...]:
    """A checked ``normalized_shape`` (ints, NumPy ints or 0-dim integer tensors) as ints. A bare
    int is torch's TypeError, raised by the checks before this."""
    return tuple(map(int, normalized_shape))


@define_op(in_place=("running_mean", "running_var"))
@_public
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
    stats_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Batch normalization over ``(N, *spatial)`` for each channel of ``(N, C, *spatial)``.

    In training the batch's biased variance normalizes and, when given, ``running_mean`` and
    ``running_var`` are updated in place: ``r = (1 - momentum) * r + momentum * batch``, with
    the unbiased variance for ``running_var``. In eval the running statistics normalize.
    See :class:`torch.nn.BatchNorm2d`.
    """
    if type(input) in _PLAIN and not input.is_contiguous():
        input = canonical_strides(input)
    tensors = (input, running_mean, running_var, weight, bias)
    aten = _settled_on_aten("batch_norm", backend, stats_dtype, out_dtype, tensors)
    # In eval ATen only reads the running statistics: as layer_norm, no state to protect. In
    # training it writes them, and refuses a few calls only after that: those take normkit's
    # checks first (_checks.batch_norm_refuses_first).
    if aten is not None and (
        training is False
        or (training is True and _checks.batch_norm_refuses_first(*tensors))
    ):
        if training:  # torch.nn.functional.batch_norm's own Python checks, in its order
            _checks.verify_batch_size(input.size())
        _checks.check_batch_norm_eps(training, eps)
        return aten(input, running_mean, running_var, weight, bias, training, momentum, eps)
    plain = _checks.check_batch_norm(input, running_mean, running_var, weight, bias, training, eps, momentum)
    if not plain:
        momentum, eps = float(momentum), float(eps)
    args = (input, running_mean, running_var, weight, bias, training, momentum, eps)
    return _dispatch("batch_norm", args, backend, stats_dtype, out_dtype, plain)


@define_op(in_place=("running_mean", "running_var"))
@_public
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
    stats_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Instance normalization: each (sample, channel) over its spatial axes.

    With running statistics and ``use_input_stats``, they are updated with the batch average
    of the per-instance statistics. See :class:`torch.nn.InstanceNorm2d`.
    """
    if running_mean is None and running_var is None:  # no state to update: as layer_norm
        aten = _settled_on_aten("instance_norm", backend, stats_dtype, out_dtype, (input, weight, bias))
        if aten is not None and input.numel():  # (an empty batch is normkit's own, below)
            _checks.check_instance_norm_python(input, use_input_stats)
            return aten(input, None, None, weight, bias, use_input_stats, momentum, eps)
    plain = _checks.check_instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, eps, momentum)
    if not plain:
        momentum, eps = float(momentum), float(eps)
    args = (input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    if not plain and input.numel() == 0:  # (a plain call's input is never empty)
        # An empty input: the empty output, running statistics untouched, on every backend (on
        # an empty batch ATen averages no instances into them, writing NaN, and fails on affine
        # parameters).
        backend = "reference"
    return _dispatch("instance_norm", args, backend, stats_dtype, out_dtype, plain)


@define_op()
@_public
def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
    stats_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Layer normalization over the trailing ``normalized_shape`` axes. See :class:`torch.nn.LayerNorm`."""
    aten = _settled_on_aten("layer_norm", backend, stats_dtype, out_dtype, (input, weight, bias))
    if aten is not None:
        return aten(input, normalized_shape, weight, bias, eps)
    plain = _checks.plain_trailing(input, normalized_shape, type(eps) is float, weight, bias)
    if not plain:
        _checks.check_layer_norm(input, normalized_shape, weight, bias, eps)
        normalized_shape, eps = _shape(normalized_shape), float(eps)
    elif type(normalized_shape) is not tuple:  # a list or torch.Size: the backends get a tuple
        normalized_shape = tuple(normalized_shape)
    args = (input, normalized_shape, weight, bias, eps)
    return _dispatch("layer_norm", args, backend, stats_dtype, out_dtype, plain, asked=True)


@define_op()
@_public
def rms_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    backend: str | None = None,
    stats_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Root-mean-square normalization over the trailing axes (not centred); ``eps=None`` means
    machine epsilon of the statistics' dtype (float32 for fp16/bf16 input, as torch computes it).
    See :class:`torch.nn.RMSNorm`."""
    aten = _settled_on_aten("rms_norm", backend, stats_dtype, out_dtype, (input, weight))
    if aten is not None:
        return aten(input, normalized_shape, weight, eps)
    plain = _checks.plain_trailing(input, normalized_shape, eps is None or type(eps) is float, weight)
    if not plain:
        _checks.check_rms_norm(input, normalized_shape, weight, eps)
        normalized_shape, eps = _shape(normalized_shape), _float(eps)
    elif type(normalized_shape) is not tuple:  # (as in layer_norm)
        normalized_shape = tuple(normalized_shape)
    if stats_dtype is not None:  # the formula's eps does not move with the precision
        eps = numerics.rms_eps(eps, input.dtype)
    args = (input, normalized_shape, weight, eps)
    return _dispatch("rms_norm", args, backend, stats_dtype, out_dtype, plain, asked=True)


@define_op()
@_public
def scale_norm(
    input: Tensor,
    g: Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
    stats_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """ScaleNorm (Nguyen & Salazar, 2019, "Transformers without Tears"): each row of the last
    dim scaled to length ``g``, ``y = g * x / max(||x||_2, eps)``.

    ``g`` is one learnable number (a one-element tensor; ``None``: 1, plain L2 normalization).
    torch has no twin (``F.normalize(x, dim=-1, eps=eps) * g`` computes the same); see
    :class:`normkit.ScaleNorm`.

    Numerics: the norm and the scaling in float32 (float64 for float64 input), a row with an
    extreme ``|x|`` rescaled by a power of two first (no overflow of the squares); output in
    the input's dtype.
    """
    _checks.check_args("scale_norm", ("input", "Tensor", input), ("g", "Tensor?", g), ("eps", "float", eps))
    if input.dim() < 1:
        raise ValueError("scale_norm needs an input with at least 1 dim (it normalizes the last); got a 0-dim tensor")
    if g is not None and g.numel() != 1:
        raise RuntimeError(f"Expected g to be one number (a tensor of 1 element), but got g of shape {list(g.shape)}")
    if eps < 0:
        raise ValueError(f"scale_norm eps must be non-negative, but got {eps}")
    _checks._check_devices(input, g)
    _checks._check_floating(input, "scale_norm")
    return _dispatch("scale_norm", (input, g, float(eps)), backend, stats_dtype, out_dtype)


@define_op()
@_public
def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
    stats_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Group normalization: each sample's channels split into ``num_groups`` groups, each group
    normalized over its channels and spatial axes. See :class:`torch.nn.GroupNorm`."""
    aten = _settled_on_aten("group_norm", backend, stats_dtype, out_dtype, (input, weight, bias))
    if aten is not None:
        _checks.check_group_norm_python(input, num_groups)
        return aten(input, num_groups, weight, bias, eps)
    plain = _checks.check_group_norm(input, num_groups, weight, bias, eps)
    if not plain:
        num_groups, eps = int(num_groups), float(eps)
    return _dispatch("group_norm", (input, num_groups, weight, bias, eps), backend, stats_dtype, out_dtype, plain)


@define_op(in_place=("running_mean", "running_var"))
@_public
def batch_norm_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    act: str | None = "relu",
    backend: str | None = None,
    stats_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """``act(batch_norm(input, ...))``, with ``act`` one of ``"relu"``, ``"silu"``, ``"gelu"``
    (exact erf form) or ``None``; arguments and running statistics as :func:`batch_norm`.

    The triton backend does it in one pass each way: the activation is applied before the
    output is stored, and the backward recomputes the activation's input from x and the
    statistics, so the normalized tensor never goes to memory. The other backends compose
    the norm and torch's activation (the norm's output rounded to the input's dtype first).
    """
    check_act(act)
    _checks.check_batch_norm(input, running_mean, running_var, weight, bias, training, eps, momentum)
    if type(input) in _PLAIN and not input.is_contiguous():
        input = canonical_strides(input)
    args = (input, running_mean, running_var, weight, bias, training, float(momentum), float(eps), act)
    return _dispatch("batch_norm_act", args, backend, stats_dtype, out_dtype)


@define_op()
@_public
def group_norm_act(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    act: str | None = "silu",
    backend: str | None = None,
    stats_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """``act(group_norm(input, ...))``: as :func:`batch_norm_act`, for :func:`group_norm`
    (default ``act="silu"``, the diffusion U-Net block's)."""
    check_act(act)
    _checks.check_group_norm(input, num_groups, weight, bias, eps)
    args = (input, int(num_groups), weight, bias, float(eps), act)
    return _dispatch("group_norm_act", args, backend, stats_dtype, out_dtype)


@define_op()
@_public
def local_response_norm(
    input: Tensor,
    size: int,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 1.0,
    *,
    backend: str | None = None,
    stats_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Local response normalization across ``size`` neighbouring channels.
    See :class:`torch.nn.LocalResponseNorm`."""
    _checks.check_local_response_norm(input, size, alpha, beta, k)
    args = (input, int(size), alpha, beta, k)
    if out_dtype is None:
        out_dtype = _lrn_dtype_under_autocast(input)
    return _dispatch("local_response_norm", args, backend, stats_dtype, out_dtype)


def _lrn_dtype_under_autocast(input: Tensor) -> torch.dtype | None:
    """The dtype torch's local_response_norm gives ``input`` under the autocast in force, where
    it is not the input's (else None). CPU autocast runs avg_pool3d, which it uses for 4-D+
    input, in float32, so a bf16/fp16 input gives a float32 result. Asked of torch itself, on a
    one-element input of the same rank, so it follows torch's autocast policy on any device;
    every backend then computes in that dtype (the input widened exactly) and rounds once."""
    if not input.is_floating_point() or input.device.type == "meta":
        return None
    if not torch.is_autocast_enabled(input.device.type):
        return None
    dtype = F.local_response_norm(input.new_zeros((1,) * input.dim()), 1).dtype
    return None if dtype == input.dtype else dtype


@define_op()
@_public
def normalize(
    input: Tensor,
    dims: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    center: bool = True,
    backend: str | None = None,
    stats_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """The one primitive behind every norm: normalize ``input`` over any set of ``dims``.

    ``y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias``, the statistics taken over ``dims``
    separately for every index of the other axes; ``center=False`` skips the mean
    (``y = x / sqrt(E[x^2] + eps) * weight + bias``, RMS normalization). ``weight`` and ``bias``
    have the sizes of the normalized dims *in the order given* (as LayerNorm's
    ``normalized_shape``): ``dims=(1,)`` on ``(N, C, H, W)`` takes ``(C,)`` parameters.

    Every named norm is a preset of it (for ``x`` of shape ``(N, C, *spatial)``, ``s`` the
    spatial dims ``2..x.dim()-1``, ``k = len(normalized_shape)``)::

        layer_norm(x, shape, w, b)       == normalize(x, range(-k, 0), w, b)
        rms_norm(x, shape, w, eps)       == normalize(x, range(-k, 0), w, None, eps, center=False)
        instance_norm(x) (no affine)     == normalize(x, s)
        batch_norm(x, training=True)     == normalize(x, (0, *s)) * w[:, None, ...] + b[:, None, ...]
        group_norm(x, G) (no affine)     == normalize(x.view(N, G, -1), (2,)).view_as(x)
        LayerNorm2d / RMSNorm2d          == normalize(x, (1,), w, b)  (channels at every pixel)

    (BatchNorm and InstanceNorm have per-channel parameters on a *kept* axis, GroupNorm needs a
    view: those presets keep their own functions, which also update running statistics.)

    Backends: ``"reference"`` (:class:`normkit.reference.Normalize` over ``dims``) and
    ``"torch"`` (the dims moved last, then ATen's layer_norm / rms_norm, moved back: a
    channels_last input gives a channels_last output).

    Numerics: as the named norms: float32 statistics (float64 for float64 input), biased
    variance, output in the input's dtype.
    """
    dims = _check_normalize(input, dims, weight, bias, eps)
    args = (input, dims, weight, bias, eps, center)
    return _dispatch("normalize", args, backend, stats_dtype, out_dtype)


def _check_normalize(
    input: Tensor, dims: int | Sequence[int], weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[int, ...]:
    """``dims`` as distinct non-negative ints, after checking the call; raises before any work."""
    if isinstance(dims, (int, Sequence)) and not isinstance(dims, (bool, str)):
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
    else:
        raise TypeError(f"normalize dims must be ints (an int or a sequence of them); got {dims!r}")
    nd = input.dim()
    if not dims:
        raise ValueError("normalize needs at least one dim to reduce over; got dims=()")
    for d in dims:
        if not isinstance(d, int) or isinstance(d, bool):
            raise TypeError(f"normalize dims must be ints; got {dims!r}")
        if not -nd <= d < nd:
            raise IndexError(f"Dimension out of range (expected to be in range of [{-nd}, {nd - 1}], but got {d})")
    dims = tuple(d % nd for d in dims)
    if len(set(dims)) != len(dims):
        raise ValueError(f"normalize dims must be distinct; got {dims} for an input of {nd} dims")
    if eps < 0:
        raise ValueError(f"normalize eps must be non-negative, but got {eps}")
    shape = [input.shape[d] for d in dims]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and list(p.shape) != shape:
            raise RuntimeError(
                f"Expected {name} of shape {shape} (the sizes of dims {list(dims)} of the input of "
                f"shape {list(input.shape)}, in that order), but got {name} of shape {list(p.shape)}"
            )
    if not input.is_floating_point():
        raise NotImplementedError(f"normalize needs a floating-point input; got {input.dtype}")
    for p in (weight, bias):
        if p is not None and p.device != input.device:
            raise RuntimeError(f"Tensor on device {p.device} is not on the expected device {input.device}!")
    return dims


@define_op(input="x", residual_dtype="residual_dtype")
@_public
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
    stats_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Pre-norm residual step: ``residual_out = x + residual``, ``y = layer_norm(residual_out)``.

    Returns ``(y, residual_out)``. ``residual_out`` is stored in ``residual_dtype`` (default
    ``x.dtype``; float32 keeps the residual stream exact under bf16 activations) and ``y`` in
    ``x.dtype``. ``residual=None`` means a zero residual. Gradients reach ``x`` and
    ``residual``. The triton backend does it in one pass; the others compose the two steps.
    """
    plain = _checks.plain_add(x, residual, residual_dtype, normalized_shape, type(eps) is float, weight, bias)
    asked = plain and backend is None and stats_dtype is None and out_dtype is None and x.dim() not in (4, 5)
    if asked:
        fn = auto_choice("add_layer_norm", x, plain=True, tensors=(x, residual, weight, bias))
        # The ordinary call where "auto" is settled by x alone: what _dispatch runs for it, in the
        # backend's form for ordinary calls (a 4-D or 5-D x takes _dispatch, which keeps its
        # memory format), without its bookkeeping.
        if fn is not None:
            if type(normalized_shape) is not tuple:  # a list or torch.Size: the backends get a tuple
                normalized_shape = tuple(normalized_shape)
            return fn(x, residual, normalized_shape, weight, bias, eps, None)
    if not plain:
        _checks.check_layer_norm(x, normalized_shape, weight, bias, eps, residual=residual)
        _check_residual(x, residual)
        _checks.check_dtype_option("residual_dtype", residual_dtype)
        normalized_shape, eps, plain = _shape(normalized_shape), float(eps), _plain_pair(x, residual)
    elif type(normalized_shape) is not tuple:  # (as in layer_norm)
        normalized_shape = tuple(normalized_shape)
    args = (x, residual, normalized_shape, weight, bias, eps, residual_dtype)
    return _dispatch("add_layer_norm", args, backend, stats_dtype, out_dtype, plain, asked=asked)


@define_op(input="x", residual_dtype="residual_dtype")
@_public
def add_rms_norm(
    x: Tensor,
    residual: Tensor | None,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    residual_dtype: torch.dtype | None = None,
    backend: str | None = None,
    stats_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`add_layer_norm` with RMS normalization. Returns ``(y, residual_out)``."""
    plain = _checks.plain_add(x, residual, residual_dtype, normalized_shape, eps is None or type(eps) is float, weight)
    asked = plain and backend is None and stats_dtype is None and out_dtype is None and x.dim() not in (4, 5)
    if asked:
        fn = auto_choice("add_rms_norm", x, plain=True, tensors=(x, residual, weight))
        if fn is not None:  # (as in add_layer_norm)
            if type(normalized_shape) is not tuple:
                normalized_shape = tuple(normalized_shape)
            return fn(x, residual, normalized_shape, weight, eps, None)
    if not plain:
        _checks.check_rms_norm(x, normalized_shape, weight, eps, residual=residual)
        _check_residual(x, residual)
        _checks.check_dtype_option("residual_dtype", residual_dtype)
        normalized_shape, eps, plain = _shape(normalized_shape), _float(eps), _plain_pair(x, residual)
    elif type(normalized_shape) is not tuple:  # (as in layer_norm)
        normalized_shape = tuple(normalized_shape)
    if stats_dtype is not None:
        eps = numerics.rms_eps(eps, residual_dtype or x.dtype)
    args = (x, residual, normalized_shape, weight, eps, residual_dtype)
    return _dispatch("add_rms_norm", args, backend, stats_dtype, out_dtype, plain, asked=asked)


def _float(eps: float | None) -> float | None:
    return None if eps is None else float(eps)


def _plain_pair(x: Tensor, residual: Tensor | None) -> bool:
    """An add-norm call whose checks passed, its input and residual of exact tensor types: "auto"
    may settle it from the input alone (:func:`normkit.backends.auto_choice`), as the plain norms."""
    return type(x) in _PLAIN and (residual is None or type(residual) in _PLAIN)


def _cudnn() -> bool:
    # what torch.nn.functional passes as ``cudnn_enabled``: torch.backends.cudnn.enabled, read
    # from its store (the module property costs a quarter of a microsecond)
    return torch._C._get_cudnn_enabled()


_PLAIN = _checks.PLAIN_TYPES

# torch.nn.functional's norms, each as the ATen call it ends in. Where every argument is a plain
# tensor (no ``__torch_function__`` override, no torch function mode in force) and normkit's
# checks have passed (they include the function's own Python checks), the function makes exactly
# this call: made directly, it skips the wrapper's repeated checks, about a microsecond at
# small shapes. Each returns its result in the input's memory format (ATen's batch_norm,
# group_norm and rms_norm keep a channels_last layout, its layer_norm and instance_norm do not).
_ATEN: dict[Callable[..., Tensor], Callable[..., Tensor]] = {
    F.layer_norm: lambda x, shape, w, b, eps: keep_layout(x, torch.layer_norm(x, shape, w, b, eps, _cudnn())),
    F.rms_norm: torch.rms_norm,
    F.group_norm: lambda x, groups, w, b, eps: torch.group_norm(x, groups, w, b, eps, _cudnn()),
    F.batch_norm: lambda x, rm, rv, w, b, training, momentum, eps: aten_batch_norm_grads(
        torch.batch_norm(x, w, b, rm, rv, training, momentum, eps, _cudnn())
    ),
    F.instance_norm: lambda x, rm, rv, w, b, use_input_stats, momentum, eps: keep_layout(
        x, aten_instance_norm_grads(torch.instance_norm(x, w, b, rm, rv, use_input_stats, momentum, eps, _cudnn()))
    ),
}


def _settled_on_aten(
    op: str,
    backend: str | None,
    stats_dtype: torch.dtype | None,
    out_dtype: torch.dtype | None,
    tensors: tuple[Tensor | None, ...],
) -> Callable[..., Tensor] | None:
    """ATen's function for a call of ``op`` (one with no running statistics to update) that is settled,
    before its checks, to run torch.nn.functional's op on plain tensors (no option set, an input
    ``tensors[0]`` of an exact tensor type, :func:`normkit.backends.auto_choice`, no
    ``__torch_function__`` on any of ``tensors``); else None. That call is then ATen's: it checks
    every argument itself, raising torch's own errors (normkit's checks copy them), and with no
    state to update there is nothing a failed call could leave changed, so normkit's checks are
    not repeated before it. (The tensors come as one tuple: built once by the caller, it is what
    the ``__torch_function__`` check reads.)"""
    input = tensors[0]
    if backend is not None or stats_dtype is not None or out_dtype is not None or type(input) not in _PLAIN:
        return None
    aten = _ATEN.get(auto_choice(op, input, False, tensors))  # type: ignore[arg-type]
    if aten is None or torch._C._has_torch_function(tensors):
        return None
    return aten


def _dispatch(
    op: str,
    args: tuple,
    backend: str | None,
    stats_dtype: torch.dtype | None,
    out_dtype: torch.dtype | None,
    plain: bool = False,
    asked: bool = False,
):
    """Resolve the backend for ``op`` and run it, at the precision asked for; the result in
    the input's memory format. ``plain``: the checks passed with every tensor argument of an
    exact type (:func:`normkit._checks.plain_trailing`), so torch.nn.functional's op, where it
    is what runs, may be called as its ATen function (:data:`_ATEN`). ``asked``: the caller
    already asked :func:`normkit.backends.auto_choice` about this call (where it settles the call,
    resolve gives the same function), so it is not asked again: on the route to a kernel
    backend that claims the call, the second answer cost a microsecond or more."""
    spec = OPS[op]
    x = args[spec.input_at]
    if stats_dtype is None and out_dtype is None:  # the default path: nothing to check or cast
        fn = (plain and backend is None and not asked and auto_choice(op, x, tensors=args)) or resolve(
            op, backend, *args
        )
        # (compiled code keeps torch.nn.functional's op: dynamo traces it as it always has)
        aten = _ATEN.get(fn) if plain and not torch.compiler.is_compiling() else None
        if aten is not None and not torch._C._has_torch_function(args):
            return aten(*args)
        out = fn(*args)
    else:
        out = _run_at_precision(op, args, backend, stats_dtype, out_dtype)
    if x.dim() not in (4, 5):  # (only these have a channels_last layout to keep: see keep_layout)
        return out
    if type(out) is tuple:
        return tuple(keep_layout(x, t) for t in out)
    return keep_layout(x, out)


def _run_at_precision(
    op: str, args: tuple, backend: str | None, stats_dtype: torch.dtype | None, out_dtype: torch.dtype | None
):
    spec = OPS[op]
    x = args[spec.input_at]
    _checks.check_precision(stats_dtype, out_dtype)
    work = stats_dtype or numerics.acc_dtype(x.dtype)
    asked = stats_dtype is not None or (out_dtype is not None and out_dtype != x.dtype)
    if not asked:
        return resolve(op, backend, *args)(*args)
    if x.dtype == work or not x.is_floating_point():
        out = resolve(op, backend, *args)(*args)
        if not x.is_floating_point():  # integer input (local_response_norm): torch's result dtype
            return out if out_dtype is None else out.to(out_dtype)
    else:
        # Run on the input cast to the working dtype (exact when widening), so the result is
        # rounded once, to its final dtype.
        cast = tuple(a.to(work) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)
        out = resolve(op, backend, *cast)(*cast)
        with torch.no_grad():
            for i in spec.in_place_at:
                if args[i] is not None and cast[i] is not args[i]:
                    args[i].copy_(cast[i])
    final = out_dtype or x.dtype
    if spec.residual_dtype is not None:  # (y, residual_out): residual_out keeps residual_dtype
        return out[0].to(final), out[1].to(args[spec.at(spec.residual_dtype)] or x.dtype)
    if spec.results:
        return tuple(
            t.to(args[spec.at(r)].dtype if r in spec.kept or out_dtype is None else out_dtype)
            for t, r in zip(out, spec.results, strict=True)
        )
    return out.to(final)


def _check_residual(x: Tensor, residual: Tensor | None) -> None:
    if residual is not None and residual.shape != x.shape:
        raise ValueError(
            f"residual must have the shape of x: got x of shape {list(x.shape)} and residual of "
            f"shape {list(residual.shape)}; broadcast or reshape the residual first"
        )


# The norms of today's blocks (modulated, gated, QK, sandwich, normalization-free): their own
# module, one public namespace.
from .functional_blocks import (  # noqa: E402
    derf,
    dyt,
    gated_rms_norm,
    modulated_layer_norm,
    modulated_rms_norm,
    qk_rms_norm,
    sandwich_rms_norm,
)
