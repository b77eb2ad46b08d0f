"""Argument checks run before any backend, raising torch 2.13's exception type and message.

Every backend sees only valid arguments, and a bad call fails before anything (running
statistics included) is touched. Where torch has an error for the same bad input, the type and
text here are torch's, so code that catches torch's errors keeps working.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "check_batch_norm",
    "check_group_norm",
    "check_instance_norm",
    "check_layer_norm",
    "check_local_response_norm",
    "check_rms_norm",
]

_ATEN_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char",
    torch.uint8: "Byte", torch.bool: "Bool", torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}
_REDUCED = (torch.float16, torch.bfloat16)


def _aten_name(dtype: torch.dtype) -> str:
    return _ATEN_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _check_floating(input: Tensor, kernel: str) -> None:
    if not input.is_floating_point():
        raise NotImplementedError(f'"{kernel}" not implemented for \'{_aten_name(input.dtype)}\'')


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
            raise RuntimeError(
                f"expected scalar type {_aten_name(input.dtype)} but found {_aten_name(p.dtype)}"
            )


def _verify_batch_size(size: Sequence[int]) -> None:
    if math.prod(size[2:]) * size[0] == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def _check_num_features(name: str, expected: int, tensor: Tensor | None) -> None:
    if tensor is not None and tensor.numel() != expected:
        raise RuntimeError(f"{name} should contain {expected} elements not {tensor.numel()}")


def check_momentum(op: str, momentum: object) -> None:
    """torch.nn.functional's ``momentum`` is a float (``momentum=None``, the cumulative average,
    exists only on the modules, which pass the factor ``1 / (batches + 1)``)."""
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"{op}(): argument 'momentum' (position 7) must be float, not {type(momentum).__name__}")


def check_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    eps: float,
) -> None:
    if training:
        if input.dim() == 0:
            raise IndexError("tuple index out of range")
        _verify_batch_size(input.size())
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if input.numel() == 0:  # ATen returns an empty output before looking at the parameters
        return
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
    _check_devices(input, weight, bias, running_mean, running_var)
    _check_floating(input, "batch_norm")
    _check_dtypes(input, weight, bias, running_mean, running_var)


def check_instance_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    use_input_stats: bool,
    eps: float,
) -> None:
    if use_input_stats and math.prod(input.shape[2:]) == 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {input.size()}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if not use_input_stats and running_mean is None:
        raise RuntimeError("Expected running_mean and running_var to be defined when use_input_stats is false")
    if input.numel() == 0:
        return
    # ATen runs instance norm as batch norm over (1, N * C, *spatial): hence N * C in the message.
    rows = input.shape[0] * input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None and t.numel() * input.shape[0] != rows:
            raise RuntimeError(f"{name} should contain {rows} elements not {t.numel() * input.shape[0]}")
    for p in (weight, bias):
        if p is not None and p.dim() > 1:  # ATen repeats the parameters N times along dim 0
            raise RuntimeError(
                "Number of dimensions of repeat dims can not be smaller than number of dimensions of tensor"
            )
    _check_devices(input, weight, bias, running_mean, running_var)
    _check_floating(input, "batch_norm")
    # ATen copies the running statistics into the input's dtype, so any float dtype works there.
    _check_dtypes(input, weight, bias)


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
    if input.dim() < len(shape) or list(input.shape[input.dim() - len(shape):]) != shape:
        star = "*" if rms else "*, "
        raise RuntimeError(
            f"Given normalized_shape={shape}, expected input with shape [{star}{', '.join(map(str, shape))}], "
            f"but got input of size{list(input.shape)}"
        )


def check_layer_norm(
    input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, bias: Tensor | None, eps: float
) -> None:
    _check_normalized_shape(input, normalized_shape, weight, bias, rms=False)
    _check_devices(input, weight, bias)
    _check_dtypes(input, weight, bias)
    _check_floating(input, "LayerNormKernelImpl")


def check_rms_norm(
    input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, eps: float | None
) -> None:
    _check_normalized_shape(input, normalized_shape, weight, None, rms=True)
    _check_devices(input, weight)
    _check_floating(input, "rms_norm")


def check_group_norm(
    input: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> None:
    if input.dim() < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {input.dim()}")
    channels = input.shape[1]
    _verify_batch_size([input.shape[0] * channels // num_groups, num_groups] + list(input.shape[2:]))
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


def check_local_response_norm(input: Tensor, size: int) -> None:
    dim = input.dim()
    if dim < 3:
        raise ValueError(
            f"Expected 3D or higher dimensionality                          input (got {dim} dimensions)"
        )
    if input.numel() == 0:
        return
    if input.dtype == torch.bool:
        kernel = "avg_pool2d" if dim == 3 else "avg_pool3d_out_frame"
        raise NotImplementedError(f'"{kernel}" not implemented for \'Bool\'')
    if size <= 0:
        kernel = f"kH: {size} kW: 1" if dim == 3 else f"kT: {size} kH: 1 kW: 1"
        raise RuntimeError(f"kernel size should be greater than zero, but got {kernel}")
