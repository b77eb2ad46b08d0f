"""``normkit explain``: what each norm of the table reduces, keeps and computes for one input
shape (the tutorials' worked examples are replayed by :mod:`normkit.tools.tutorials`).

Nothing here is a description written by hand: the axes come from :data:`normkit.norms.NORMS`
and :func:`normkit.norms.layout`, the counts from running :class:`normkit.reference.Normalize`
on the layout's view, what is computed over each set and what the output then has from the
row's statistic (:data:`STATISTICS`, measured on the output), and the train/eval behaviour,
parameters and buffers from running the normkit module (reference backend) next to its torch.nn
twin, or next to the reference in float64 where torch has none. A norm with per-call tensors
(adaLN's shift and scale, the gate: :attr:`normkit.norms.NormSpec.inputs`) runs with their
neutral values, so that its output is the plain norm's, and the explanation says what each does;
a norm without statistics (DyT, Derf) says so, and has no reduced sets.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .. import modules as nkm
from ..norms import NORMS, NormSpec, Sizes, layout
from ..reference import Normalize

__all__ = [
    "STATISTICS",
    "Explanation",
    "Statistic",
    "default_groups",
    "explain",
    "find_norms",
    "render_grid",
]

_SPATIAL_AXES = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}


def _squash(text: str) -> str:
    return re.sub(r"[123]d$", "", re.sub(r"[\s_\-]", "", text.lower()))


def _aliases(spec: NormSpec) -> set[str]:
    module = spec.module.lower()
    initials = "".join(ch for ch in spec.module if ch.isupper()).lower()  # bn, ln, gn, in, rmsn
    return {_squash(spec.name), module, initials, module.removesuffix("norm")}


def find_norms(query: str | None) -> list[str]:
    """Names of the rows of :data:`NORMS` that ``query`` means (``batch_norm``, ``BatchNorm2d``,
    ``bn``, ``batch``...; a fused op such as ``qk_rms_norm`` means the row it computes); all of
    them for ``None``; empty if none matches."""
    if not query:
        return list(NORMS)
    q = _squash(query)
    return [name for name, spec in NORMS.items()
            if q in _aliases(spec) or (len(q) >= 3 and spec.module.lower().startswith(q))
            or q in {_squash(op) for op in spec.fused}]


def fused_op(query: str | None) -> tuple[str, str] | None:
    """``(op, what it computes)`` where ``query`` names a fused op of a row (``qk_rms_norm``)."""
    q = _squash(query or "")
    return next(((op, what) for spec in NORMS.values() for op, what in spec.fused.items() if _squash(op) == q), None)


def default_groups(channels: int) -> int:
    """GroupNorm's G for the explanation: the smallest divisor of C above 1 that leaves more than
    one channel per group (so GroupNorm is neither LayerNorm nor InstanceNorm), else 1."""
    return next((g for g in range(2, channels) if channels % g == 0), 1)


@dataclass
class Explanation:
    """One norm on one input shape. ``statistic_of`` gives, for every input element, the index
    of the statistic that normalizes it (the elements sharing an index are one reduced set)."""

    name: str
    module: str
    constructor: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    view: tuple[int, ...]
    view_axes: tuple[str, ...]
    reduced_axes: tuple[str, ...]
    kept_axes: tuple[str, ...]
    num_statistics: int
    elements_per_statistic: int
    statistics: tuple[str, ...]
    formula: str  # the row's, then what each per-call tensor does
    parameters: dict[str, tuple[int, ...]]
    buffers: dict[str, tuple[int, ...]]
    running_stats: bool
    train_eval: str
    train_eval_max_diff: float
    max_diff_vs_torch: float  # against ``oracle``
    normalized_mean: float  # largest |mean| of x_hat over one statistic's elements (0 when not centred)
    normalized_var: float  # largest deviation from 1 of x_hat's variance, mean square or L2 norm there
    statistic_of: Tensor = field(repr=False)
    oracle: str = ""  # what normkit's output was compared with: torch's twin, or the float64 reference
    statistic: str = "variance"  # the row's kind of statistic, a key of STATISTICS
    output_property: str = ""  # what the output has over each set, in words (its statistic's target)
    inputs: dict[str, str] = field(default_factory=dict)  # per-call tensor -> its shape here and what it does

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "statistic_of"}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _view_axes(spec: NormSpec, shape: Sequence[int], view: Sequence[int], axes: tuple[str, ...]) -> tuple[str, ...]:
    if len(view) == len(shape):
        return axes
    if spec.reduce.trailing:  # the last dim split into groups, (*, G, W/G)
        return axes[:-1] + ("G", f"{axes[-1]}/G")
    # one axis more: the channels split into groups, (N, G, C/G, *spatial)
    return (axes[0], "G", f"{axes[1]}/G") + axes[2:]


def _grouped(ids: Tensor, values: Tensor, count: int) -> Tensor:
    """The mean of ``values`` over the elements of each statistic."""
    sums = torch.zeros(count, dtype=torch.float64).index_add_(0, ids, values)
    return sums / torch.bincount(ids, minlength=count).double()


def _centred(y: Tensor, ids: Tensor, count: int) -> tuple[float, float]:
    mean = _grouped(ids, y, count)
    var = _grouped(ids, (y - mean[ids]).square(), count)
    return mean.abs().max().item(), (var - 1).abs().max().item()


def _mean_square(y: Tensor, ids: Tensor, count: int) -> tuple[float, float]:
    return 0.0, (_grouped(ids, y.square(), count) - 1).abs().max().item()


def _l2_norm(y: Tensor, ids: Tensor, count: int) -> tuple[float, float]:
    sums = torch.zeros(count, dtype=torch.float64).index_add_(0, ids, y.square())
    return 0.0, (sums.sqrt() - 1).abs().max().item()


def _squashed(y: Tensor, ids: Tensor, count: int) -> tuple[float, float]:
    return 0.0, max(0.0, y.abs().max().item() - 1)


class Statistic(NamedTuple):
    """What explain says of one kind of :attr:`normkit.norms.NormSpec.statistic`, and what the
    normalized output ``x_hat`` (before the affine) has over each reduced set."""

    computed: tuple[str, ...]  # the statistics computed over each set, in words
    counted: str  # "{n} ...": how many of them, and what they are
    target: str  # the property of x_hat over each set
    # (x_hat flat in float64, the set of each element, the number of sets) -> the largest |mean|
    # (0 when not centred) and the largest deviation of the target's statistic from 1
    deviations: Callable[[Tensor, Tensor, int], tuple[float, float]]


STATISTICS: dict[str, Statistic] = {
    "variance": Statistic(("mean", "variance"), "{n} means and {n} variances", "mean 0 and variance 1", _centred),
    "mean_square": Statistic(("mean square",), "{n} mean squares (not centred: no mean is subtracted)",
                             "mean square 1", _mean_square),
    "l2_norm": Statistic(("L2 norm",), "{n} L2 norms (not centred: no mean is subtracted; eps is a floor, not added)",
                         "L2 norm 1", _l2_norm),
    "none": Statistic((), "no statistics (an elementwise squash: each element on its own, nothing reduced)",
                      "every value inside (-1, 1) (a bounded squash, not a normalization)", _squashed),
}


def explain(name: str, shape: Sequence[int], *, groups: int | None = None, normalized_ndim: int | None = None,
            seed: int = 0) -> Explanation:
    """Explain norm ``name`` (a key of :data:`NORMS`) on an input of ``shape`` ``(N, C, *spatial)``.

    ``groups`` is GroupNorm's G (default :func:`default_groups`), ``normalized_ndim`` the
    number of trailing axes a trailing-axis norm normalizes where its row does not fix it
    (default all but N, as in Wu & He's figure: LayerNorm over (C, H, W); ScaleNorm's row says
    the last dim). The output's property over each set is its statistic's
    (:data:`STATISTICS`): measured on ``x_hat``, the output divided by a scalar parameter
    (ScaleNorm's ``g``) where the row has one; the modules' per-feature weights start at 1 and
    biases at 0.
    """
    shape = tuple(int(s) for s in shape)
    if not 3 <= len(shape) <= 5:
        raise ValueError(f"explain needs an input shape (N, C, *spatial) with 1 to 3 spatial axes, got {shape}")
    spec = NORMS[name]
    stat = STATISTICS[spec.statistic]
    grouped_last = spec.reduce.trailing and spec.reduce.groups  # groups of the last dim (gated RMSNorm)
    if groups is None:
        groups = default_groups(shape[-1] if grouped_last else shape[1])
    elif grouped_last and shape[-1] % groups:
        raise ValueError(f"{name} groups the last dim: {groups} groups do not divide it ({shape[-1]})")
    k = len(shape) - 1 if normalized_ndim is None else normalized_ndim
    axes = ("N", "C") + _SPATIAL_AXES[len(shape) - 2]
    view, dims, _ = layout(name, shape, normalized_ndim=k, num_groups=groups)
    view_axes = _view_axes(spec, shape, view, axes)
    kept = tuple(i for i in range(len(view)) if i not in dims)
    num_statistics = math.prod(view[i] for i in kept) if dims else 0

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 2 + 1
    # The per-call tensors at their neutral values: the output is then the plain norm's.
    extras = [torch.full(e.shape_for(shape), e.neutral) for e in spec.inputs]
    # The row's module for this input, in torch's default configuration (the constructor's
    # positional arguments only: InstanceNorm without affine and running statistics).
    cls, kwargs = spec.module_class(len(shape)), {}
    args, _ = spec.constructor(Sizes(shape, normalized_ndim=k, num_groups=groups))
    ours = getattr(nkm, cls)(*args, backend="reference")
    # torch's twin, or where there is none the reference itself in float64
    theirs = getattr(nn, cls)(*args) if spec.twin is not None else getattr(nkm, cls)(*args, backend="reference")
    eps = getattr(ours, "eps", None)
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    with torch.no_grad():
        if dims:
            # The statistics the reference computes on the layout's view: their count must be
            # the table's (kept axes), or the table and the implementation disagree.
            _, _, var = Normalize.apply(x.reshape(view), None, None, dims, eps, spec.centered, None, None)
            if var.numel() != num_statistics:
                raise AssertionError(f"{name}: the table gives {num_statistics} statistics, "
                                     f"the reference computed {var.numel()}")
            statistic_of = torch.arange(var.numel()).reshape(var.shape).expand(view).reshape(shape)
        else:  # no statistics: no element shares one with another
            statistic_of = torch.full(shape, -1)

        twin_dtype = torch.float32 if spec.twin is not None else torch.float64
        theirs = theirs.to(twin_dtype)
        theirs_extras = [t.to(twin_dtype) for t in extras]
        y_train, y_torch = ours(x, *extras), theirs(x.to(twin_dtype), *theirs_extras).float()
        ours.eval()
        theirs.eval()
        y_eval, y_torch_eval = ours(x, *extras), theirs(x.to(twin_dtype), *theirs_extras).float()

    # a scalar parameter scales every output: x_hat = y / g
    scale = getattr(ours, spec.affine[0]).item() if spec.param == "scalar" else None
    y = y_train.double().flatten() / (1.0 if scale is None else scale)
    normalized_mean, normalized_var = stat.deviations(y, statistic_of.flatten(), num_statistics)
    subject = "the output" if scale is None else f"y / {spec.affine[0]} ({spec.affine[0]} = {scale:.4g})"
    per = x.numel() // num_statistics if num_statistics else 0
    train_eval_diff = (y_train - y_eval).abs().max().item()
    if spec.running_stats and getattr(ours, "running_var", None) is not None:
        train_eval = (f"train: normalizes with this batch's statistics and updates running_mean/running_var "
                      f"(momentum {ours.momentum}; running_var takes the unbiased variance, x {per}/{per - 1}); "
                      f"eval: normalizes with running_mean/running_var instead: after one training step "
                      f"the same input comes out different by up to {train_eval_diff:.3g}")
    elif not dims:
        train_eval = ("train and eval compute the same thing: there are no statistics, of the batch or running "
                      f"(max |y_train - y_eval| = {train_eval_diff:.3g})")
    else:
        train_eval = ("train and eval compute the same thing: every call normalizes with its own "
                      f"statistics (max |y_train - y_eval| = {train_eval_diff:.3g})")
    return Explanation(
        name=name,
        module=spec.module,
        constructor=f"{cls}({', '.join([*map(repr, args), *(f'{a}={v!r}' for a, v in kwargs.items())])})",
        shape=shape,
        axes=axes,
        view=tuple(view),
        view_axes=view_axes,
        reduced_axes=tuple(view_axes[i] for i in dims),
        kept_axes=tuple(view_axes[i] for i in kept),
        num_statistics=num_statistics,
        elements_per_statistic=per,
        statistics=stat.computed,
        statistic=spec.statistic,
        formula=spec.formula + "".join(f"; {e.name}: {e.role}" for e in spec.inputs),
        inputs={e.name: f"{e.shape_for(shape)}: {e.role}" for e in spec.inputs},
        parameters={n: tuple(p.shape) for n, p in ours.named_parameters()},
        buffers={n: tuple(b.shape) for n, b in ours.named_buffers()},
        running_stats=bool(spec.running_stats and getattr(ours, "running_var", None) is not None),
        train_eval=train_eval,
        train_eval_max_diff=train_eval_diff,
        max_diff_vs_torch=max((y_train - y_torch).abs().max().item(), (y_eval - y_torch_eval).abs().max().item()),
        normalized_mean=normalized_mean,
        normalized_var=normalized_var,
        statistic_of=statistic_of,
        oracle=f"torch.nn.{cls}" if spec.twin is not None else "the reference in float64 (torch has no twin)",
        output_property=f"{subject} has {stat.target}" if dims else f"{subject} has {stat.target}; {stat.counted}",
    )


def render_grid(e: Explanation, max_cells: int = 8) -> str:
    """The N x C grid of the input: in each cell the statistic(s) its spatial slice uses, and
    ``#`` marking the elements of statistic 0, the set its statistics are computed over (a norm
    without statistics has no grid: one line says so)."""
    if not e.num_statistics:
        return (f"  (no statistics: each of the {math.prod(e.shape)} elements is transformed on its own; only the "
                f"learnable {', '.join(e.parameters) or 'parameters'} are shared)")
    ids = e.statistic_of.reshape(e.shape[0], e.shape[1], -1)
    rows, cols = min(e.shape[0], max_cells), min(e.shape[1], max_cells)
    cells = []
    for n in range(rows):
        row = []
        for c in range(cols):
            used = ids[n, c].unique().tolist()
            text = str(used[0]) if len(used) == 1 else f"{used[0]}-{used[-1]}"
            row.append(("#" if 0 in used else "") + text)
        cells.append(row)
    width = max(3, *(len(t) for r in cells for t in r)) + 1
    spatial = "x".join(e.axes[2:])
    lines = ["      " + "".join(f"c{c}".rjust(width) for c in range(cols)) + (" ..." if cols < e.shape[1] else "")]
    lines += [f"  n{n}".ljust(6) + "".join(t.rjust(width) for t in row) for n, row in enumerate(cells)]
    if rows < e.shape[0]:
        lines.append("  ...")
    lines.append(f"  (each cell is one {spatial} slice; the number is the statistic that normalizes it; "
                 f"# marks statistic 0's {e.elements_per_statistic} elements)")
    return "\n".join(lines)
