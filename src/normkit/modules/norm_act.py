"""Norm + activation in one module (timm's ``BatchNormAct2d`` / ``GroupNormAct``). The forward is
:func:`normkit.functional.batch_norm_act` / :func:`~normkit.functional.group_norm_act`: one pass
each way on the triton backend, the norm then torch's activation elsewhere. The ``state_dict``
is the plain norm's, so checkpoints of ``BatchNorm2d`` / ``GroupNorm`` (followed by a
parameter-free activation) load as they are."""

from __future__ import annotations

import torch
from torch import Tensor

from ..functional import ACTIVATIONS, check_act, group_norm_act
from .batchnorm import BatchNorm2d, batch_norm_forward
from .stateless import GroupNorm

__all__ = ["ACTIVATIONS", "BatchNormAct2d", "GroupNormAct"]

torch.fx.wrap("group_norm_act")


class BatchNormAct2d(BatchNorm2d):
    """``act(BatchNorm2d(x))``: :class:`normkit.BatchNorm2d` then an activation.

    Args: as :class:`torch.nn.BatchNorm2d`, plus keyword-only ``bias``, ``act`` (``"silu"``,
    ``"relu"``, ``"gelu"`` (exact erf form) or ``None``; default ``"relu"``) and ``backend``.
    ``state_dict``: BatchNorm2d's. On the triton backend the activation is applied in the
    norm's kernel (one read and one write of the tensor each way); elsewhere it is torch's,
    applied to the norm's output in its dtype.
    """

    _init_attributes = {"act": "relu"}  # see BackendMixin.adopt

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 act: str | None = "relu", backend: str | None = None,
                 stats_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None) -> None:
        check_act(act)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         backend=backend, stats_dtype=stats_dtype, out_dtype=out_dtype)
        self.act = act

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act!r}"

    def forward(self, input: Tensor) -> Tensor:
        return batch_norm_forward(self, input, act=self.act)


class GroupNormAct(GroupNorm):
    """``act(GroupNorm(x))``: :class:`normkit.GroupNorm` then an activation.

    Args: as :class:`torch.nn.GroupNorm`, plus keyword-only ``bias``, ``act`` (``"silu"``,
    ``"relu"``, ``"gelu"`` or ``None``; default ``"silu"``) and ``backend``. ``state_dict``:
    GroupNorm's. One pass on the triton backend, as :class:`BatchNormAct2d`.
    """

    _init_attributes = {"act": "silu"}  # see BackendMixin.adopt

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, device=None,
                 dtype=None, *, bias: bool = True, act: str | None = "silu", backend: str | None = None,
                 stats_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None) -> None:
        check_act(act)
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, bias=bias, backend=backend,
                         stats_dtype=stats_dtype, out_dtype=out_dtype)
        self.act = act

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act!r}"

    def forward(self, input: Tensor) -> Tensor:
        return group_norm_act(input, self.num_groups, self.weight, self.bias, self.eps, act=self.act,
                              **self.call_options())
