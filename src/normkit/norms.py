"""The table of norms: every normalization in normkit is one row of it.

Each norm is the same three steps: choose the axes to reduce over, compute statistics over them,
normalize and apply a per-feature affine. A row says, for an input laid out as
``(N, C, *spatial)`` (or ``(*, *normalized_shape)`` for the trailing-axis norms), which axes are
reduced and which are kept, whether the statistics are centred, what the affine parameters look
like and whether running statistics are kept. :func:`layout` turns a row into concrete reduction
dims for a tensor: GroupNorm, for instance, is a view ``(N, G, C/G, *spatial)`` reduced over
everything after ``G``. The reference implementation, the modules' docs, the CLI and the tests
all read this table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["NORMS", "Layout", "NormSpec", "layout"]


class NormSpec(NamedTuple):
    name: str  # the functional op name
    module: str  # the torch.nn / normkit class family
    reduced: str  # the axes statistics are computed over
    kept: str  # the axes that each get their own statistics
    centered: bool  # subtract the mean (False: RMSNorm, divide by the root mean square only)
    affine: str  # shape of weight and bias
    running_stats: bool  # keeps running_mean / running_var for eval
    formula: str


NORMS: dict[str, NormSpec] = {
    spec.name: spec
    for spec in (
        NormSpec(
            "batch_norm", "BatchNorm", "N, *spatial", "C", True, "(C,)", True,
            "y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias",
        ),
        NormSpec(
            "layer_norm", "LayerNorm", "normalized_shape (trailing)", "leading axes", True,
            "normalized_shape", False,
            "y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias",
        ),
        NormSpec(
            "group_norm", "GroupNorm", "C/G, *spatial", "N, G", True, "(C,)", False,
            "y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias",
        ),
        NormSpec(
            "instance_norm", "InstanceNorm", "*spatial", "N, C", True, "(C,)", True,
            "y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias",
        ),
        NormSpec(
            "rms_norm", "RMSNorm", "normalized_shape (trailing)", "leading axes", False,
            "normalized_shape", False,
            "y = x / sqrt(E[x^2] + eps) * weight",
        ),
    )
}


class Layout(NamedTuple):
    """How to view a tensor for one norm: ``x.reshape(view)``, reduce ``dims``, and reshape
    per-feature parameters to ``param_view`` so they broadcast against the view."""

    view: tuple[int, ...]
    dims: tuple[int, ...]
    param_view: tuple[int, ...]


def layout(name: str, shape: Sequence[int], *, normalized_ndim: int = 0, num_groups: int = 1) -> Layout:
    """Concrete reduction dims for norm ``name`` on a tensor of ``shape``.

    ``normalized_ndim`` is ``len(normalized_shape)`` for the trailing-axis norms and
    ``num_groups`` the G of GroupNorm.
    """
    shape = tuple(shape)
    nd = len(shape)
    if name in ("layer_norm", "rms_norm"):
        dims = tuple(range(nd - normalized_ndim, nd))
        return Layout(shape, dims, shape[nd - normalized_ndim:])
    channels = shape[1]
    spatial = shape[2:]
    per_channel = (1, channels) + (1,) * len(spatial)
    if name == "batch_norm":
        return Layout(shape, (0,) + tuple(range(2, nd)), per_channel)
    if name == "instance_norm":
        return Layout(shape, tuple(range(2, nd)), per_channel)
    if name == "group_norm":
        view = (shape[0], num_groups, channels // num_groups) + spatial
        return Layout(view, tuple(range(2, len(view))),
                      (1, num_groups, channels // num_groups) + (1,) * len(spatial))
    raise KeyError(f"no layout for norm {name!r}; known: {sorted(NORMS)}")
