"""Argument checks run before any backend, raising torch 2.13's exception type and message.

Every backend sees only valid arguments, and a bad call fails before anything (running
statistics included) is touched. Where torch has an error for the same bad input, the type and
text here are torch's, so code that catches torch's errors keeps working.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "STATS_DTYPES",
    "batch_norm_refuses_first",
    "check_batch_norm",
    "check_dtype_option",
    "check_group_norm",
    "check_group_norm_python",
    "check_instance_norm",
    "check_instance_norm_python",
    "check_layer_norm",
    "check_local_response_norm",
    "check_precision",
    "check_rms_norm",
    "PLAIN_TYPES",
    "SHAPE_TYPES",
    "plain_add",
    "plain_trailing",
    "verify_batch_size",
]

_ATEN_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.int64: "Long",
    torch.int32: "Int",
    torch.int16: "Short",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.bool: "Bool",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}
_REDUCED = (torch.float16, torch.bfloat16)


def _aten_name(dtype: torch.dtype) -> str:
    return _ATEN_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _check_floating(input: Tensor, kernel: str) -> None:
    if not input.is_floating_point():
        raise NotImplementedError(f"\"{kernel}\" not implemented for '{_aten_name(input.dtype)}'")


def _check_devices(input: Tensor, *tensors: Tensor | None) -> None:
    for t in tensors:
        if t is not None and t.device != input.device:
            raise RuntimeError(f"Tensor on device {t.device} is not on the expected device {input.device}!")


def _check_dtypes(input: Tensor, *params: Tensor | None) -> None:
    """ATen's CPU rule: parameters share the input's dtype, or are all float32 for a bf16/fp16
    input (the mixed-precision case)."""
    defined = [p for p in params if p is not None]
    if not defined or input.device.type != "cpu":
        return
    if defined[0].dtype != input.dtype:
        for p in defined:
            if p.dtype != torch.float32:
                raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")
        if input.dtype not in _REDUCED:
            raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")
        return
    for p in defined:
        if p.dtype != input.dtype:
            raise RuntimeError(f"expected scalar type {_aten_name(input.dtype)} but found {_aten_name(p.dtype)}")


def _check_mixed_dtypes(input: Tensor, *params: Tensor | None) -> None:
    """ATen's CPU mixed-dtype rule as layer_norm applies it: when any parameter's dtype is not
    the input's, every parameter must be float32 and the input bf16/fp16."""
    defined = [p for p in params if p is not None]
    if not defined or defined[0].dtype == input.dtype:
        return
    if any(p.dtype != torch.float32 for p in defined):
        raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")
    if input.dtype not in _REDUCED:
        raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")


def verify_batch_size(size: Sequence[int]) -> None:
    # size[0] first, as torch.nn.functional does: a 0-dim input is its IndexError
    if size[0] * math.prod(size[2:]) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


# ---- argument types, as torch's Python argument parser checks them ---------------------------


def _type_name(value: object) -> str:
    """The name torch's argument parser prints for a value's type (CPython's ``tp_name``)."""
    cls = type(value)
    if isinstance(value, Tensor):
        return "Tensor"
    if cls is torch.Size:  # a C type whose tp_name carries its module
        return "torch.Size"
    return f"numpy.{cls.__name__}" if cls.__module__ == "numpy" else cls.__name__


def _is_float(value: object) -> bool:
    # A float argument takes Python and NumPy numbers and a 0-dim tensor outside autograd.
    if isinstance(value, Tensor):
        return value.dim() == 0 and not value.requires_grad and not value.is_complex()
    return isinstance(value, numbers.Real)


def _is_int(value: object) -> bool:
    if isinstance(value, Tensor):
        return (
            value.dim() == 0 and not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool
        )
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


_KIND_CHECKS: dict[str, Callable[[object], bool]] = {
    "Tensor": lambda v: isinstance(v, Tensor),
    "bool": lambda v: type(v) is bool,
    "int": _is_int,
    "float": _is_float,
}
# The exact types that fit each kind at once (the common call): the full rules only for the rest.
_PLAIN_TYPES: dict[str, tuple[type, ...]] = {
    "Tensor": (Tensor, torch.nn.Parameter),
    "Tensor?": (Tensor, torch.nn.Parameter, type(None)),
    "bool": (bool,),
    "int": (int,),
    "float": (float, int),
    "float?": (float, int, type(None)),
}


def check_args(op: str, *args: tuple[str, str, object]) -> None:
    """Check ``(name, kind, value)`` positional arguments of ``op`` in order, as torch's argument
    parser does, raising its TypeError for the first that does not fit. Kinds: ``Tensor``,
    ``Tensor?`` (or None), ``bool`` (exactly a bool), ``int``, ``float``, ``float?``, ``int[]``."""
    for pos, (name, kind, value) in enumerate(args, 1):
        plain = _PLAIN_TYPES.get(kind)
        if plain is not None and type(value) in plain:
            continue
        if kind == "int[]" and type(value) is tuple and all(type(d) is int for d in value):
            continue
        if kind.endswith("?") and value is None:
            continue
        base = kind.rstrip("?")
        if base == "int[]":
            _check_int_list(op, name, pos, value)
            continue
        if not _KIND_CHECKS[base](value):
            raise TypeError(f"{op}(): argument '{name}' (position {pos}) must be {base}, not {_type_name(value)}")


def _check_int_list(op: str, name: str, pos: int, value: object) -> None:
    prefix = f"{op}(): argument '{name}' (position {pos}) must be tuple of ints"
    if not isinstance(value, (tuple, list)):  # torch.Size is a tuple
        raise TypeError(f"{prefix}, not {_type_name(value)}")
    # The parser looks at the first element to choose the overload (its message says pos 0),
    # then unpacks the rest (counting from 1).
    for i, item in enumerate(value):
        if not _is_int(item):
            if i == 0:
                raise TypeError(f"{prefix}, but found element of type {_type_name(item)} at pos 0")
            raise TypeError(
                f"{op}(): argument '{name}' failed to unpack the object at pos {i + 1} with error "
                f'"type must be tuple of ints,but got {_type_name(item)}"'
            )


# torch.func's batch rule for a training norm whose running statistics are not batched.
VMAP_SHARED_RUNNING_STATS = (
    "Batch norm got a batched tensor as input while the running_mean or running_var, which will be updated in "
    "place, were not batched.\nIf you are using a module and do not need eval mode, please set "
    "`track_running_stats` to be False.If you are using a prebuilt module and do not need eval mode, please see "
    "the functorch website for resources on how to patch your module to work with vmap"
)

INFERENCE_INPLACE = (
    "Inplace update to inference tensor outside InferenceMode is not allowed.You can make a clone to get "
    "a normal tensor before doing inplace update.See https://github.com/pytorch/rfcs/pull/17 for more details."
)


def check_counter_writable(counter: Tensor | None) -> None:
    """Raise, before any work, what torch's ``num_batches_tracked.add_(1)`` raises: torch's
    module increments first, normkit last (only calls that succeed count), so without this the
    running statistics would be written before the error. The counter is written with its own
    value, which raises exactly where the increment would: a module built under
    ``torch.inference_mode()`` called outside it, or a buffer captured by a ``torch.func.grad`` /
    ``jvp`` transform (in-place writes to captured tensors are refused there)."""
    if counter is None or torch.compiler.is_compiling():
        return
    if counter.is_inference():  # no version counter to keep
        counter.add_(0)
        return
    # The probe is not a write: keep the version counter where it was (a failed call must
    # leave every buffer's version as it found it).
    with torch.autograd._unsafe_preserve_version_counter(counter):
        counter.add_(0)


def _check_num_features(name: str, expected: int, tensor: Tensor | None) -> None:
    if tensor is not None and tensor.numel() != expected:
        raise RuntimeError(f"{name} should contain {expected} elements not {tensor.numel()}")


def _check_no_grad_stats(running_mean: Tensor | None, running_var: Tensor | None) -> None:
    """ATen's autograd wrapper refuses running statistics that require grad (outside no_grad)."""
    if not torch.is_grad_enabled():
        return
    for name, stat in (("running_mean", running_mean), ("running_var", running_var)):
        if stat is not None and stat.requires_grad:
            raise RuntimeError(
                f"The function 'native_batch_norm' is not differentiable with respect to argument '{name}'. "
                "This input cannot have requires_grad True."
            )


def _batch_norm_args(op: str, input, running_mean, running_var, weight, bias, training, momentum, eps) -> None:
    # torch.batch_norm / torch.instance_norm put the parameters before the running statistics
    check_args(
        op,
        ("input", "Tensor", input),
        ("weight", "Tensor?", weight),
        ("bias", "Tensor?", bias),
        ("running_mean", "Tensor?", running_mean),
        ("running_var", "Tensor?", running_var),
        ("training" if op == "batch_norm" else "use_input_stats", "bool", training),
        ("momentum", "float", momentum),
        ("eps", "float", eps),
    )


def check_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    eps: float,
    momentum: float = 0.1,
) -> bool:
    """torch.nn.functional.batch_norm's checks in its order: its Python checks, the argument
    types, then ATen's (channel counts, autograd, devices, dtypes, running-statistics rank).
    Returns whether the call is a plain one (:func:`_plain_channels`: exact argument types, so
    nothing to convert)."""
    if training:
        verify_batch_size(input.size())
    check_batch_norm_eps(training, eps)
    if _plain_channels(input, running_mean, running_var, weight, bias, training, momentum, eps):
        return True
    _batch_norm_args("batch_norm", input, running_mean, running_var, weight, bias, training, momentum, eps)
    if input.numel() == 0:
        # ATen returns `input.clone() * weight[0] + bias[0]` before any other check: an empty
        # weight (C = 0) is its IndexError, raised here by the same indexing.
        for p in (weight, bias):
            if p is not None:
                p.select(0, 0)
        return False
    # ATen reads the channel count as size(1); a 1-D input has none, which it reports as 0.
    channels = input.shape[1] if input.dim() >= 2 else 0
    for name, stat in (("running_mean", running_mean), ("running_var", running_var)):
        if stat is not None:
            _check_num_features(name, channels, stat)
        elif not training:
            raise RuntimeError(f"{name} must be defined in evaluation mode")
    _check_num_features("weight", channels, weight)
    _check_num_features("bias", channels, bias)
    if input.dim() < 2:
        raise IndexError("Dimension out of range (expected to be in range of [-1, 0], but got 1)")
    _check_no_grad_stats(running_mean, running_var)
    _check_devices(input, weight, bias, running_mean, running_var)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    _check_floating(input, "batch_norm")
    defined = [p for p in (weight, bias, running_mean, running_var) if p is not None]
    mixed = bool(defined) and defined[0].dtype != input.dtype
    if mixed:  # ATen's mixed-dtype rule comes first
        _check_dtypes(input, weight, bias, running_mean, running_var)
    # The running statistics are written in place: a (1, C) or (C, 1) one must fail before any
    # backend scales it. ATen's CPU kernel reads each as a vector of the input's dtype (rank,
    # then dtype), and only after writing them reads the bias in its dtype.
    for stat in (running_mean, running_var):
        if stat is not None and stat.dim() != 1:
            raise RuntimeError(f"TensorAccessor expected 1 dims but tensor has {stat.dim()}")
        if stat is not None and not mixed and input.device.type == "cpu" and stat.dtype != input.dtype:
            raise RuntimeError(f"expected scalar type {_aten_name(input.dtype)} but found {_aten_name(stat.dtype)}")
    _check_dtypes(input, weight, bias, running_mean, running_var)
    return False


def batch_norm_refuses_first(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
) -> bool:
    """Whether ATen's training batch_norm, if it refuses these tensors at all, refuses them
    before it writes the running statistics: then a call may go to ATen with no checks of
    normkit's in front (its errors are torch's, and a refused call changes nothing).

    Established by trial on the CPU (``tests/test_front_end_session7.py`` sweeps the cases):
    ATen checks the channel counts, the statistics' rank, the input's dtype and the weight's
    and statistics' dtypes before it computes, but updates the running statistics before it
    refuses a weight, bias or ``running_var`` on another device, or a bias whose dtype differs
    from a weight of the input's dtype. So: every tensor on the CPU, and a bias of the weight's
    dtype (or no weight or no bias); anything else takes normkit's checks first."""
    return (  # (written out: a loop over the four costs a fifth of a microsecond more)
        input.is_cpu
        and (running_mean is None or running_mean.is_cpu)
        and (running_var is None or running_var.is_cpu)
        and (weight is None or weight.is_cpu)
        and (bias is None or bias.is_cpu)
        and (weight is None or bias is None or bias.dtype is weight.dtype)
    )


def check_batch_norm_eps(training: object, eps: float) -> None:
    """torch.nn.functional.batch_norm's check of ``eps``, made in Python before ATen's."""
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def check_instance_norm_python(input: Tensor, use_input_stats: object) -> None:
    """The check torch.nn.functional.instance_norm makes in Python before ATen's."""
    if use_input_stats and math.prod(input.size()[2:]) == 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {input.size()}")


def check_instance_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    use_input_stats: bool,
    eps: float,
    momentum: float = 0.1,
) -> bool:
    """torch.nn.functional.instance_norm's checks in its order; returns whether the call is a
    plain one (as :func:`check_batch_norm`)."""
    check_instance_norm_python(input, use_input_stats)
    if _plain_channels(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps):
        if use_input_stats and running_mean is not None:
            _check_stats_writable(running_mean, running_var)
        return True
    _batch_norm_args("instance_norm", input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    # (ATen's instance_norm asks for both statistics in eval before its batch_norm sees one alone)
    if not use_input_stats and (running_mean is None or running_var is None):
        raise RuntimeError("Expected running_mean and running_var to be defined when use_input_stats is false")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if input.numel() == 0:
        # ATen repeats the parameters N times and reads element 0 of the result: with N > 0 and
        # C = 0 that is its IndexError. (With N = 0 normkit returns the empty output instead.)
        if input.dim() >= 2 and input.shape[0] > 0 and input.shape[1] == 0:
            for p in (weight, bias):
                if p is not None:
                    p.select(0, 0)
        return False
    # ATen runs instance norm as batch norm over (1, N * C, *spatial): hence N * C in the message.
    rows = input.shape[0] * input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None and t.numel() * input.shape[0] != rows:
            raise RuntimeError(f"{name} should contain {rows} elements not {t.numel() * input.shape[0]}")
    for p in (weight, bias, running_mean, running_var):
        if p is not None and p.dim() > 1:  # ATen repeats them N times along dim 0
            raise RuntimeError(
                "Number of dimensions of repeat dims can not be smaller than number of dimensions of tensor"
            )
    _check_floating(input, "batch_norm")
    _check_no_grad_stats(running_mean, running_var)
    _check_devices(input, weight, bias, running_mean, running_var)
    # ATen copies the running statistics into the input's dtype, so any float dtype works there.
    _check_dtypes(input, weight, bias)
    if use_input_stats:
        _check_stats_writable(running_mean, running_var)
    return False


def _check_stats_writable(running_mean: Tensor | None, running_var: Tensor | None) -> None:
    """Raise, before any statistic is written, torch's error for a running statistic that cannot
    be written: one made under ``torch.inference_mode()`` and updated outside it, or one whose
    elements share memory (an ``expand``-ed tensor). ATen's instance_norm copies the new mean in,
    then the variance, and refuses the variance only after writing the mean (an inference tensor
    only after writing into it). An in-place add of zero to such a tensor raises that error
    before it writes."""
    if torch.compiler.is_compiling():
        return
    for stat in (running_mean, running_var):
        if stat is not None and (
            (stat.is_inference() and not torch.is_inference_mode_enabled())
            # (a contiguous tensor has no overlap: the common case skips the slower test)
            or (not stat.is_contiguous() and torch._debug_has_internal_overlap(stat) == 1)
        ):
            stat.add_(0)


def _check_normalized_shape(
    input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, bias: Tensor | None, rms: bool
) -> None:
    shape = list(normalized_shape)
    if not shape:
        raise RuntimeError(
            "Expected normalized_shape to be at least 1-dimensional, i.e., containing at least one "
            f"element, but got normalized_shape = {shape}"
        )
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and list(p.shape) != shape:
            raise RuntimeError(
                f"Expected {name} to be of same shape as normalized_shape, but got {name} of shape "
                f"{list(p.shape)} and normalized_shape = {shape}"
            )
    if rms and input.dim() < len(shape):
        raise ValueError(f"Input tensor must have at least {len(shape)} dimensions, but got {input.dim()}")
    if input.dim() < len(shape) or list(input.shape[input.dim() - len(shape) :]) != shape:
        star = "*" if rms else "*, "
        raise RuntimeError(
            f"Given normalized_shape={shape}, expected input with shape [{star}{', '.join(map(str, shape))}], "
            f"but got input of size{list(input.shape)}"
        )


def _ordinary(input: Tensor, normalized_shape: Sequence[int], *params: Tensor | None) -> bool:
    """Whether no check after the argument types can refuse this trailing-axis call: a
    floating-point input ending in ``normalized_shape``, parameters absent or of its dtype,
    device and that shape. The common call is answered here with a few attribute reads (each
    costs a fraction of a microsecond, and the full checks read many); the rest take the full
    checks, in torch's order."""
    shape = tuple(normalized_shape)
    if not shape or input.shape[max(input.dim() - len(shape), 0) :] != shape or not input.is_floating_point():
        return False
    return _plain_params(input, shape, *params)


# The exact types of a ``normalized_shape`` the ordinary call may spell, ints inside: torch.nn's
# modules keep a tuple, a functional call often passes a list (``[4096]``) or ``x.shape[-1:]``.
SHAPE_TYPES = frozenset({tuple, list, torch.Size})
# The exact types of a plain tensor argument: a subclass may override torch functions or have no
# storage, so it takes the full checks, and the kernels' by-address paths refuse it.
PLAIN_TYPES = frozenset({Tensor, torch.nn.Parameter})
# The dtypes whose tensors are floating point (``dtype in`` answers ``is_floating_point()`` for
# a dtype already read, in a third of its time).
_FLOATING = frozenset(d for d in vars(torch).values() if isinstance(d, torch.dtype) and d.is_floating_point)


def _plain_params(input: Tensor, shape: tuple[int, ...], *params: Tensor | None) -> bool:
    """Whether each of ``params`` is absent or a plain tensor of ``input``'s dtype and device
    and of shape ``shape``."""
    dtype = input.dtype  # (a dtype is a singleton: `is` compares it)
    if input.is_cpu:  # (no device object built per tensor: the common case, answered by a flag)
        for p in params:
            if p is not None and (
                type(p) not in PLAIN_TYPES or p.dtype is not dtype or p.shape != shape or not p.is_cpu
            ):
                return False
        return True
    device = input.device
    for p in params:
        if p is not None and (
            type(p) not in PLAIN_TYPES or p.dtype is not dtype or p.shape != shape or p.device != device
        ):
            return False
    return True


def plain_trailing(
    input: object, normalized_shape: object, eps_ok: bool, weight: Tensor | None = None, bias: Tensor | None = None
) -> bool:
    """Whether this is the ordinary trailing-axis call (:func:`_ordinary`) with its argument
    types exact (a tensor input, a tuple, list or torch.Size of ints, ``eps_ok``): no check can refuse it and no
    argument needs converting, so the op skips :func:`check_layer_norm` / :func:`check_rms_norm`
    (answered in about a microsecond: each attribute of a tensor read costs 0.05-0.1)."""
    return plain_add(input, None, None, normalized_shape, eps_ok, weight, bias)


def plain_add(
    x: object,
    residual: object,
    residual_dtype: object,
    normalized_shape: object,
    eps_ok: bool,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> bool:
    """Whether an add-norm call is the ordinary one: no ``residual_dtype``, :func:`plain_trailing`
    for ``x``, and a residual absent or a tensor of an exact type with ``x``'s shape and dtype.
    No check can refuse it and nothing needs converting: ``x + residual`` then the norm, as users
    write it. (Written out in one function: this runs between residual adds of whole
    activations, which leave the interpreter's own data out of the caches, and each call and
    attribute read then costs about twice what it costs in a loop of its own.)"""
    if (
        residual_dtype is not None
        or not eps_ok
        or type(x) not in PLAIN_TYPES
        or type(normalized_shape) not in SHAPE_TYPES
        or not normalized_shape
    ):
        return False
    for d in normalized_shape:  # type: ignore[attr-defined]
        if type(d) is not int:
            return False
    # (a list compares unequal to a tuple of the same ints: compared as one)
    tail = normalized_shape if type(normalized_shape) is not list else tuple(normalized_shape)
    # _ordinary's test, for a tuple (an input of fewer dims has a shorter tail: unequal)
    shape, dtype = x.shape, x.dtype  # type: ignore[attr-defined]
    if shape[-len(tail) :] != tail or dtype not in _FLOATING:
        return False
    if residual is not None and (
        type(residual) not in PLAIN_TYPES or residual.dtype is not dtype or residual.shape != shape  # type: ignore[attr-defined]
    ):
        return False
    if not x.is_cpu:  # type: ignore[attr-defined]
        return _plain_params(x, tail, weight, bias)  # type: ignore[arg-type]
    # _plain_params for a CPU input, unrolled (a loop over a tuple of two costs a fifth more)
    return (
        weight is None
        or (type(weight) in PLAIN_TYPES and weight.dtype is dtype and weight.shape == tail and weight.is_cpu)
    ) and (
        bias is None or (type(bias) in PLAIN_TYPES and bias.dtype is dtype and bias.shape == tail and bias.is_cpu)
    )


def _plain_channels(
    input: object,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    use_batch: object,
    momentum: object,
    eps: object,
) -> bool:
    """Whether no check of :func:`check_batch_norm` / :func:`check_instance_norm` after their
    leading Python checks can refuse this call: exact argument types, a non-empty
    floating-point ``(N, C, ...)`` input, running statistics both given (or both absent in
    training) that do not require grad, every per-channel tensor absent or a plain ``(C,)``
    tensor of the input's dtype and device."""
    if (
        type(input) not in PLAIN_TYPES
        or type(use_batch) is not bool
        or type(momentum) is not float
        or type(eps) is not float
        or (running_mean is None) != (running_var is None)
        or (running_mean is None and not use_batch)
    ):
        return False
    if input.dim() < 2 or input.numel() == 0 or not input.is_floating_point():  # type: ignore[attr-defined]
        return False
    if not _plain_params(input, (input.shape[1],), running_mean, running_var, weight, bias):  # type: ignore[attr-defined,arg-type]
        return False
    return running_mean is None or not (running_mean.requires_grad or running_var.requires_grad)  # type: ignore[union-attr]


NOT_ADD = object()  # check_layer_norm / check_rms_norm's residual when checking the plain op


def _leading(op: str, input: object, residual: object) -> tuple:
    """The op's name and its leading tensor arguments: ``input``, or ``x, residual`` for the
    residual-add twin."""
    if residual is NOT_ADD:
        return op, ("input", "Tensor", input)
    return f"add_{op}", ("x", "Tensor", input), ("residual", "Tensor?", residual)


def check_layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    residual: object = NOT_ADD,
) -> None:
    """``residual`` given (a tensor or None): the checks of ``add_layer_norm(x, residual, ...)``,
    whose argument-type messages name it and count the residual as position 2."""
    check_args(
        *_leading("layer_norm", input, residual),
        ("normalized_shape", "int[]", normalized_shape),
        ("weight", "Tensor?", weight),
        ("bias", "Tensor?", bias),
        ("eps", "float", eps),
    )
    if _ordinary(input, normalized_shape, weight, bias):
        return
    if input.device.type == "cpu":
        # ATen's CPU layer_norm checks mixed dtypes before the shapes (an integer weight of the
        # wrong shape is its dtype error)
        _check_mixed_dtypes(input, weight, bias)
    _check_normalized_shape(input, normalized_shape, weight, bias, rms=False)
    _check_devices(input, weight, bias)
    _check_floating(input, "LayerNormKernelImpl")
    _check_dtypes(input, weight, bias)


def check_rms_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    eps: float | None,
    *,
    residual: object = NOT_ADD,
) -> None:
    check_args(
        *_leading("rms_norm", input, residual),
        ("normalized_shape", "int[]", normalized_shape),
        ("weight", "Tensor?", weight),
        ("eps", "float?", eps),
    )
    if _ordinary(input, normalized_shape, weight):
        return
    _check_normalized_shape(input, normalized_shape, weight, None, rms=True)
    _check_devices(input, weight)
    if not input.is_complex():  # ATen's rms_norm is composite: complex input runs there
        _check_floating(input, "rms_norm")


def check_group_norm_python(input: Tensor, num_groups: int) -> None:
    """The checks torch.nn.functional.group_norm makes in Python before ATen's: the rank, then
    its own arithmetic (a str or None ``num_groups`` fails in it, before the argument types)."""
    if input.dim() < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {input.dim()}")
    verify_batch_size([input.shape[0] * input.shape[1] // num_groups, num_groups] + list(input.shape[2:]))


def check_group_norm(input: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float) -> bool:
    """torch.nn.functional.group_norm's checks in its order; returns whether the call is a
    plain one (exact argument types, so nothing to convert)."""
    check_group_norm_python(input, num_groups)
    channels = input.shape[1]
    if (
        type(input) in PLAIN_TYPES
        and type(num_groups) is int
        and type(eps) is float
        and num_groups > 0
        and channels % num_groups == 0
        and input.is_floating_point()
        and _plain_params(input, (channels,), weight, bias)
    ):
        return True  # the ordinary call: nothing below can refuse it
    check_args(
        "group_norm",
        ("input", "Tensor", input),
        ("num_groups", "int", num_groups),
        ("weight", "Tensor?", weight),
        ("bias", "Tensor?", bias),
        ("eps", "float", eps),
    )
    if num_groups <= 0:
        raise RuntimeError(f"Expected num groups to be greater than 0, got {num_groups}")
    if channels % num_groups != 0:
        raise RuntimeError(
            "Expected number of channels in input to be divisible by num_groups, but got input of "
            f"shape {list(input.shape)} and num_groups={num_groups}"
        )
    # ATen's bias message prints the weight's shape ([0] without a weight); kept verbatim.
    shown = {"weight": weight, "bias": weight}
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.dim() != 1 or p.numel() != channels):
            other = shown[name]
            shape = list(other.shape) if other is not None else [0]
            raise RuntimeError(
                f"Expected {name} to be a vector of size equal to the number of channels in input, "
                f"but got {name} of shape {shape} and input of shape {list(input.shape)}"
            )
    _check_devices(input, weight, bias)
    _check_dtypes(input, weight, bias)
    _check_floating(input, "GroupNormKernelImpl")
    return False


def check_local_response_norm(
    input: Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0
) -> None:
    """torch.nn.functional.local_response_norm is Python over pad, avg_pool and arithmetic: its
    errors are theirs, in that order."""
    dim = input.dim()
    if dim < 3:
        raise ValueError(f"Expected 3D or higher dimensionality                          input (got {dim} dimensions)")
    if input.numel() == 0:
        return
    pad = (0, 0) * (1 if dim == 3 else 2) + (size // 2, (size - 1) // 2)
    for i, p in enumerate(pad):
        if not _is_int(p):
            raise TypeError(
                f"pad(): argument 'pad' failed to unpack the object at pos {i + 1} with error "
                f'"type must be tuple of ints,but got {_type_name(p)}"'
            )
    pool = "avg_pool2d" if dim == 3 else "avg_pool3d"
    if not _is_int(size):
        raise TypeError(
            f"{pool}(): argument 'kernel_size' (position 2) must be tuple of ints, but found element "
            f"of type {_type_name(size)} at pos 0"
        )
    if input.dtype == torch.bool or input.is_complex():
        kernel = "avg_pool2d" if dim == 3 else "avg_pool3d_out_frame"
        raise NotImplementedError(f"\"{kernel}\" not implemented for '{_aten_name(input.dtype)}'")
    if size <= 0:
        kernel = f"kH: {size} kW: 1" if dim == 3 else f"kT: {size} kH: 1 kW: 1"
        raise RuntimeError(f"kernel size should be greater than zero, but got {kernel}")
    for method, value in (("mul", alpha), ("add", k)):
        if not isinstance(value, (numbers.Number, Tensor)):
            raise TypeError(f"{method}(): argument 'other' (position 1) must be Tensor, not {_type_name(value)}")
    if not isinstance(beta, (numbers.Number, Tensor)):
        name = _type_name(beta)
        mismatch = f"      didn't match because some of the arguments have invalid types: (!{name}!)\n"
        raise TypeError(
            f"pow() received an invalid combination of arguments - got ({name}), but expected one of:\n"
            f" * (Tensor exponent)\n{mismatch} * (Number exponent)\n{mismatch}"
        )
    # Tensor alpha / beta / k: torch computes `div.mul(alpha).add(k).pow(beta)` with div of the
    # input's shape (then `input / div`, which always broadcasts); a shape that does not
    # broadcast is its error there, operands in that order (the backends compute in another).
    shape = list(input.shape)
    for v in (alpha, k, beta):
        if isinstance(v, Tensor):
            shape = _broadcast(shape, list(v.shape))


def _broadcast(a: list[int], b: list[int]) -> list[int]:
    """The shape of ``a op b``, or ATen's error (``infer_size``) when they do not broadcast."""
    ndim = max(len(a), len(b))
    a, b = [1] * (ndim - len(a)) + a, [1] * (ndim - len(b)) + b
    for i, (size_a, size_b) in enumerate(zip(a, b)):
        if size_a != size_b and 1 not in (size_a, size_b):
            raise RuntimeError(
                f"The size of tensor a ({size_a}) must match the size of tensor b ({size_b}) "
                f"at non-singleton dimension {i}"
            )
    return [sa if sb == 1 else sb for sa, sb in zip(a, b)]


# ---- precision options (normkit's own: the functional ops and the modules check them alike) ----

STATS_DTYPES = (torch.float32, torch.float64)


def check_dtype_option(name: str, dtype: object) -> None:
    """``out_dtype`` / ``residual_dtype``: a floating-point torch.dtype or None (a string such
    as ``"float32"`` is not one: pass ``torch.float32``)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(
            f"{name} must be a floating-point torch.dtype such as torch.float32 (or None), but got {dtype!r}"
        )


def check_precision(stats_dtype: object, out_dtype: object) -> None:
    """The precision options of every op and module: ``stats_dtype`` float32, float64 or None,
    ``out_dtype`` a floating-point dtype or None; ValueError in torch's words otherwise."""
    if stats_dtype is not None and stats_dtype not in STATS_DTYPES:
        raise ValueError(f"stats_dtype must be torch.float32 or torch.float64 (or None), but got {stats_dtype!r}")
    check_dtype_option("out_dtype", out_dtype)
