"""Norm + activation in one module (timm's ``BatchNormAct2d`` / ``GroupNormAct``): the norm on any
normkit backend, then the activation. The ``state_dict`` is the plain norm's, so checkpoints of
``BatchNorm2d`` / ``GroupNorm`` (followed by a parameter-free activation) load as they are."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .batchnorm import BatchNorm2d
from .stateless import GroupNorm

__all__ = ["ACTIVATIONS", "BatchNormAct2d", "GroupNormAct"]

# The activations by name; None is the identity.
ACTIVATIONS: dict[str | None, Callable[[Tensor], Tensor] | None] = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    None: None,
}


def _check_act(act: str | None) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {list(ACTIVATIONS)}")


def _activate(act: str | None, y: Tensor) -> Tensor:
    fn = ACTIVATIONS[act]
    return y if fn is None else fn(y)


class BatchNormAct2d(BatchNorm2d):
    """``act(BatchNorm2d(x))``: :class:`normkit.BatchNorm2d` then an activation.

    Args: as :class:`torch.nn.BatchNorm2d`, plus keyword-only ``bias``, ``act`` (``"silu"``,
    ``"relu"``, ``"gelu"`` (exact erf form) or ``None``; default ``"relu"``) and ``backend``.
    ``state_dict``: BatchNorm2d's. The norm runs on the resolved backend; the activation is
    torch's, applied to the norm's output in its dtype.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 act: str | None = "relu", backend: str | None = None,
                 stats_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None) -> None:
        _check_act(act)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         backend=backend, stats_dtype=stats_dtype, out_dtype=out_dtype)
        self.act = act

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act!r}"

    def forward(self, input: Tensor) -> Tensor:
        return _activate(self.act, super().forward(input))


class GroupNormAct(GroupNorm):
    """``act(GroupNorm(x))``: :class:`normkit.GroupNorm` then an activation.

    Args: as :class:`torch.nn.GroupNorm`, plus keyword-only ``bias``, ``act`` (``"silu"``,
    ``"relu"``, ``"gelu"`` or ``None``; default ``"silu"``) and ``backend``. ``state_dict``:
    GroupNorm's.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, device=None,
                 dtype=None, *, bias: bool = True, act: str | None = "silu", backend: str | None = None,
                 stats_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None) -> None:
        _check_act(act)
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, bias=bias, backend=backend, stats_dtype=stats_dtype, out_dtype=out_dtype)
        self.act = act

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act!r}"

    def forward(self, input: Tensor) -> Tensor:
        return _activate(self.act, super().forward(input))

