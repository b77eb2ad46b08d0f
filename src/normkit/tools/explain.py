"""``normkit explain``: what each norm of the table reduces, keeps and computes for one input
shape, and the tutorials' worked examples replayed step by step.

Nothing here is a description written by hand: the axes come from :data:`normkit.norms.NORMS`
and :func:`normkit.norms.layout`, the counts from running :class:`normkit.reference.Normalize`
on the layout's view, and the train/eval behaviour, parameters and buffers from running the
normkit module (reference backend) next to its torch.nn twin.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import modules as nkm
from ..norms import NORMS, NormSpec, layout
from ..reference import Normalize

__all__ = [
    "Check",
    "Explanation",
    "Replay",
    "default_groups",
    "explain",
    "find_norms",
    "render_grid",
    "replay_seeds",
]

_SPATIAL_AXES = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}

# The module each norm is explained with, for an input of ``shape`` (G groups, the trailing
# ``k`` axes normalized): class name, arguments, keywords. The one thing the table does not say,
# since torch's signatures differ per family. InstanceNorm is shown with its optional affine and
# running statistics switched on, so that the explanation has them to show.
_MODULES: dict[str, Callable[[tuple[int, ...], int, int], tuple[str, tuple[Any, ...], dict[str, Any]]]] = {
    "batch_norm": lambda shape, g, k: (f"BatchNorm{len(shape) - 2}d", (shape[1],), {}),
    "layer_norm": lambda shape, g, k: ("LayerNorm", (list(shape[-k:]),), {}),
    "group_norm": lambda shape, g, k: ("GroupNorm", (g, shape[1]), {}),
    "instance_norm": lambda shape, g, k: (f"InstanceNorm{len(shape) - 2}d", (shape[1],),
                                          {"affine": True, "track_running_stats": True}),
    "rms_norm": lambda shape, g, k: ("RMSNorm", (list(shape[-k:]),), {}),
}


def _squash(text: str) -> str:
    return re.sub(r"[123]d$", "", re.sub(r"[\s_\-]", "", text.lower()))


def _aliases(spec: NormSpec) -> set[str]:
    module = spec.module.lower()
    initials = "".join(ch for ch in spec.module if ch.isupper()).lower()  # bn, ln, gn, in, rmsn
    return {_squash(spec.name), module, initials, module.removesuffix("norm")}


def find_norms(query: str | None) -> list[str]:
    """Names of the rows of :data:`NORMS` that ``query`` means (``batch_norm``, ``BatchNorm2d``,
    ``bn``, ``batch``...); all of them for ``None``; empty if none matches."""
    if not query:
        return list(NORMS)
    q = _squash(query)
    return [name for name, spec in NORMS.items()
            if q in _aliases(spec) or (len(q) >= 3 and spec.module.lower().startswith(q))]


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
    formula: str
    parameters: dict[str, tuple[int, ...]]
    buffers: dict[str, tuple[int, ...]]
    running_stats: bool
    train_eval: str
    train_eval_max_diff: float
    max_diff_vs_torch: float
    normalized_mean: float  # largest |mean| of the output over one statistic's elements
    normalized_var: float  # largest |var - 1| (|mean square - 1| when not centred)
    statistic_of: Tensor = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "statistic_of"}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _view_axes(shape: Sequence[int], view: Sequence[int], axes: tuple[str, ...]) -> tuple[str, ...]:
    if len(view) == len(shape):
        return axes
    # one axis more: the channels split into groups, (N, G, C/G, *spatial)
    return (axes[0], "G", f"{axes[1]}/G") + axes[2:]


def _grouped(ids: Tensor, values: Tensor, count: int) -> Tensor:
    """The mean of ``values`` over the elements of each statistic."""
    sums = torch.zeros(count, dtype=torch.float64).index_add_(0, ids, values)
    return sums / torch.bincount(ids, minlength=count).double()


def explain(name: str, shape: Sequence[int], *, groups: int | None = None, normalized_ndim: int | None = None,
            seed: int = 0) -> Explanation:
    """Explain norm ``name`` (a key of :data:`NORMS`) on an input of ``shape`` ``(N, C, *spatial)``.

    ``groups`` is GroupNorm's G (default :func:`default_groups`), ``normalized_ndim`` the
    number of trailing axes LayerNorm and RMSNorm normalize (default all but N, as in Wu & He's
    figure: LayerNorm over (C, H, W)).
    """
    shape = tuple(int(s) for s in shape)
    if not 3 <= len(shape) <= 5:
        raise ValueError(f"explain needs an input shape (N, C, *spatial) with 1 to 3 spatial axes, got {shape}")
    spec = NORMS[name]
    groups = default_groups(shape[1]) if groups is None else groups
    k = len(shape) - 1 if normalized_ndim is None else normalized_ndim
    axes = ("N", "C") + _SPATIAL_AXES[len(shape) - 2]
    view, dims, _ = layout(name, shape, normalized_ndim=k, num_groups=groups)
    view_axes = _view_axes(shape, view, axes)
    kept = tuple(i for i in range(len(view)) if i not in dims)
    num_statistics = math.prod(view[i] for i in kept)

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 2 + 1
    cls, args, kwargs = _MODULES[name](shape, groups, k)
    ours = getattr(nkm, cls)(*args, **kwargs, backend="reference")
    theirs = getattr(nn, cls)(*args, **kwargs)
    eps = ours.eps if ours.eps is not None else torch.finfo(x.dtype).eps
    with torch.no_grad():
        # The statistics the reference computes on the layout's view: their count must be the
        # table's (kept axes), or the table and the implementation disagree.
        _, _, var = Normalize.apply(x.reshape(view), None, None, dims, eps, spec.centered, None, None)
        if var.numel() != num_statistics:
            raise AssertionError(f"{name}: the table gives {num_statistics} statistics, the reference computed {var.numel()}")
        statistic_of = torch.arange(var.numel()).reshape(var.shape).expand(view).reshape(shape)

        y_train, y_torch = ours(x), theirs(x)
        ours.eval()
        theirs.eval()
        y_eval, y_torch_eval = ours(x), theirs(x)

    ids, y = statistic_of.flatten(), y_train.double().flatten()
    mean = _grouped(ids, y, num_statistics)
    spread = _grouped(ids, (y - mean[ids]).square() if spec.centered else y.square(), num_statistics)
    per = x.numel() // num_statistics
    train_eval_diff = (y_train - y_eval).abs().max().item()
    if spec.running_stats and getattr(ours, "running_var", None) is not None:
        train_eval = (f"train: normalizes with this batch's statistics and updates running_mean/running_var "
                      f"(momentum {ours.momentum}; running_var takes the unbiased variance, x {per}/{per - 1}); "
                      f"eval: normalizes with running_mean/running_var instead: after one training step "
                      f"the same input comes out different by up to {train_eval_diff:.3g}")
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
        statistics=("mean", "variance") if spec.centered else ("mean square",),
        formula=spec.formula,
        parameters={n: tuple(p.shape) for n, p in ours.named_parameters()},
        buffers={n: tuple(b.shape) for n, b in ours.named_buffers()},
        running_stats=bool(spec.running_stats and getattr(ours, "running_var", None) is not None),
        train_eval=train_eval,
        train_eval_max_diff=train_eval_diff,
        max_diff_vs_torch=max((y_train - y_torch).abs().max().item(), (y_eval - y_torch_eval).abs().max().item()),
        normalized_mean=mean.abs().max().item() if spec.centered else 0.0,
        normalized_var=(spread - 1).abs().max().item(),
        statistic_of=statistic_of,
    )


def render_grid(e: Explanation, max_cells: int = 8) -> str:
    """The N x C grid of the input: in each cell the statistic(s) its spatial slice uses, and
    ``#`` marking the elements of statistic 0, the set one mean and variance are computed over."""
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


# --- the tutorials' worked examples ---------------------------------------------------------

# Inputs and printed outputs copied from the seeds, to replay them and to compare with what
# they printed.
SEED000_BN_INPUT = [[[[1, 2, 3], [4, 5, 6], [7, 8, 9]], [[11, 12, 13], [14, 15, 16], [17, 18, 19]]],
                    [[[11, 13, 15], [17, 19, 21], [23, 25, 27]], [[21, 23, 25], [27, 29, 31], [33, 35, 37]]]]
SEED000_BN_PRINTED = [[[-1.3574, -1.2340, -1.1106], [-0.9872, -0.8638, -0.7404], [-0.6170, -0.4936, -0.3702]],
                      [[-0.1234, 0.1234, 0.3702], [0.6170, 0.8638, 1.1106], [1.3574, 1.6042, 1.8511]]]  # n0, n1 (both channels)
SEED000_LN_INPUT = [[[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]], [[21, 22, 23, 24], [25, 26, 27, 28], [29, 30, 31, 32]]]
SEED000_LN_PRINTED = [-1.3416, -0.4472, 0.4472, 1.3416]  # every row
SEED000_LN_IMAGE_INPUT = [[[[1, 2, 3], [11, 12, 13], [21, 22, 23]], [[51, 52, 53], [61, 62, 63], [71, 72, 73]]],
                          [[[81, 82, 83], [91, 92, 93], [101, 102, 103]],
                           [[111, 112, 113], [121, 122, 123], [131, 132, 133]]]]
SEED000_LN_IMAGE_PRINTED = [[[[-1.3682, -1.3302, -1.2922], [-0.9881, -0.9501, -0.9121], [-0.6081, -0.5701, -0.5321]],
                             [[0.5321, 0.5701, 0.6081], [0.9121, 0.9501, 0.9881], [1.2922, 1.3302, 1.3682]]],
                            [[[-1.5207, -1.4622, -1.4037], [-0.9358, -0.8773, -0.8188], [-0.3509, -0.2924, -0.2339]],
                             [[0.2339, 0.2924, 0.3509], [0.8188, 0.8773, 0.9358], [1.4037, 1.4622, 1.5207]]]]
SEED003_INPUT = [[[[-2.4308, -1.0281, -1.1322, 0.9819], [-0.4069, 0.7973, 1.6296, 1.6797], [0.2802, -0.8285, 2.0101, 0.1286]],
                  [[-0.5740, 0.1970, -0.7209, -0.7231], [-0.1489, 0.4993, 0.4159, 1.4238], [0.0334, -0.6333, 0.1308, -0.2180]]]]
SEED003_WEIGHT = [0.5653, 0.0322]
SEED003_PRINTED = [[[[-1.1237, -0.5106, -0.5561, 0.3679], [-0.2391, 0.2873, 0.6510, 0.6729], [0.0612, -0.4233, 0.8173, -0.0050]],
                    [[-0.0293, 0.0120, -0.0372, -0.0373], [-0.0066, 0.0282, 0.0237, 0.0777], [0.0032, -0.0325, 0.0084, -0.0103]]]]
SEED003_PRINTED_STATS = (0.1401, 1.6730)  # mean and biased variance of channel 0

# Agreement bounds. normkit and torch: float32 arithmetic, a few ulps (relative above magnitude 1).
# The seeds' printouts: 4 decimals (half a unit); seed 003's input and weight are themselves
# printed rounded to 4 decimals, which moves its outputs by up to ~1e-4 more.
TOL_TORCH = 1e-5
TOL_PRINTED = 5.1e-5
TOL_PRINTED_ROUNDED_INPUT = 2e-4


@dataclass
class Check:
    what: str
    normkit: float | list  # the value normkit computed (a number or a small nested list)
    other: float | list  # torch's value, the seed's printout or a hand computation
    against: str  # which of those ``other`` is
    max_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_diff <= self.tolerance

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "ok": self.ok}


@dataclass
class Replay:
    title: str
    source: str  # the seed file it replays
    lines: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    def check(self, what: str, ours: Tensor | float, other: Tensor | float, against: str, tol: float, *,
              relative: bool = True) -> None:
        """Record ``|ours - other| <= tol`` (times ``max |other|`` above 1 when ``relative``:
        float32 rounding scales with the values; a printout's rounding does not)."""
        ours_t, other_t = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(other, dtype=torch.float64)
        diff = (ours_t - other_t).abs().max().item()
        if relative:
            tol = tol * max(1.0, other_t.abs().max().item())
        as_list: Callable[[Tensor], float | list] = lambda t: t.tolist() if t.numel() > 1 else t.item()
        self.checks.append(Check(what, as_list(ours_t), as_list(other_t), against, diff, tol))
        self.lines.append(f"    {what}: normkit vs {against}: max |diff| = {diff:.2e} "
                          f"({'agree' if diff <= tol else 'DISAGREE'}, bound {tol:.1e})")

    def as_dict(self) -> dict[str, Any]:
        return {"title": self.title, "source": self.source, "lines": self.lines,
                "checks": [c.as_dict() for c in self.checks]}


def _fmt(t: Tensor) -> str:
    return ", ".join(f"{v:.4f}" for v in t.flatten().tolist())


def _indent(t: Tensor, pad: str = "    ") -> str:
    return "\n".join((pad + line).rstrip() for line in str(t.detach()).splitlines())


def _batch_stats(x: Tensor, name: str, **kw: int) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """Mean and biased variance as normkit's reference computes them, on the table's layout."""
    view, dims, _ = layout(name, x.shape, **kw)
    with torch.no_grad():
        _, mean, var = Normalize.apply(x.reshape(view), None, None, dims, 1e-5, True, None, None)
    return mean, var, dims


def _seed000_batch_norm() -> Replay:
    r = Replay("BatchNorm2d(2) on a 2x2x3x3 input", "000_1180a778a6739233.txt")
    x = torch.tensor(SEED000_BN_INPUT, dtype=torch.float32)
    ours = nkm.BatchNorm2d(2, backend="reference")
    theirs = nn.BatchNorm2d(2)
    mean, var, dims = _batch_stats(x, "batch_norm")
    n = x.numel() // x.shape[1]
    r.lines += ["input x, shape (N, C, H, W) = (2, 2, 3, 3):", _indent(x), "",
                f"step 1: statistics per channel C over (N, H, W): {x.shape[1]} means and {x.shape[1]} variances, "
                f"each over {n} elements",
                f"    mean        = [{_fmt(mean)}]",
                f"    var (biased, divide by {n}) = [{_fmt(var)}]"]
    with torch.no_grad():
        _, aten_mean, aten_invstd = torch.ops.aten.native_batch_norm(x, None, None, None, None, True, 0.1, theirs.eps)
    r.check("mean", mean.flatten(), aten_mean, "torch (ATen batch_norm's saved mean)", TOL_TORCH)
    r.check("var", var.flatten(), aten_invstd.pow(-2) - theirs.eps, "torch (ATen batch_norm's saved 1/std)", TOL_TORCH)

    with torch.no_grad():
        y, y_torch = ours(x), theirs(x)
    r.lines += ["", f"step 2: y = (x - mean) / sqrt(var + {ours.eps}) * weight + bias   (weight 1, bias 0 at init):",
                _indent(y)]
    r.check("y", y, y_torch, "torch.nn.BatchNorm2d", TOL_TORCH)
    printed = torch.tensor(SEED000_BN_PRINTED)[:, None].expand(2, 2, 3, 3)
    r.check("y", y, printed, "the seed's printout", TOL_PRINTED, relative=False)

    m = ours.momentum
    r.lines += ["", f"step 3: running statistics after this one training step (momentum {m}; running_var takes "
                    f"the unbiased variance, var x {n}/{n - 1}):",
                f"    running_mean = (1 - {m}) * 0 + {m} * mean                = [{_fmt(ours.running_mean)}]",
                f"    running_var  = (1 - {m}) * 1 + {m} * var * {n}/{n - 1} = [{_fmt(ours.running_var)}]"]
    r.check("running_mean", ours.running_mean, theirs.running_mean, "torch.nn.BatchNorm2d", TOL_TORCH)
    r.check("running_var", ours.running_var, theirs.running_var, "torch.nn.BatchNorm2d", TOL_TORCH)
    r.check("running_var", ours.running_var, (1 - m) + m * var.flatten() * n / (n - 1), "the formula above",
            TOL_TORCH)

    ours.eval()
    theirs.eval()
    with torch.no_grad():
        y_eval, y_eval_torch = ours(x), theirs(x)
    r.lines += ["", "step 4: in eval mode the same input is normalized with the running statistics, not the batch's:",
                f"    y_eval[0, 0, 0] = [{_fmt(y_eval[0, 0, 0])}]   (train mode gave [{_fmt(y[0, 0, 0])}])"]
    r.check("y_eval", y_eval, y_eval_torch, "torch.nn.BatchNorm2d", TOL_TORCH)
    return r


def _layer_norm_replay(title: str, data: list, normalized_shape: list[int], printed: Tensor) -> Replay:
    r = Replay(title, "000_1180a778a6739233.txt")
    x = torch.tensor(data, dtype=torch.float32)
    k = len(normalized_shape)
    ours = nkm.LayerNorm(normalized_shape, backend="reference")
    theirs = nn.LayerNorm(normalized_shape)
    mean, var, _ = _batch_stats(x, "layer_norm", normalized_ndim=k)
    per = math.prod(normalized_shape)
    r.lines += [f"input x, shape {tuple(x.shape)}:", _indent(x), "",
                f"step 1: statistics over the trailing {tuple(normalized_shape)}: {mean.numel()} means and "
                f"{var.numel()} variances, each over {per} elements",
                f"    mean = [{_fmt(mean)}]", f"    var (biased, divide by {per}) = [{_fmt(var)}]"]
    with torch.no_grad():
        _, aten_mean, aten_rstd = torch.ops.aten.native_layer_norm(x, normalized_shape, None, None, theirs.eps)
    r.check("mean", mean.flatten(), aten_mean.flatten(), "torch (ATen layer_norm's saved mean)", TOL_TORCH)
    r.check("var", var.flatten(), (aten_rstd.pow(-2) - theirs.eps).flatten(), "torch (ATen layer_norm's saved 1/std)",
            TOL_TORCH)
    with torch.no_grad():
        y, y_torch = ours(x), theirs(x)
    r.lines += ["", f"step 2: y = (x - mean) / sqrt(var + {ours.eps}) * weight + bias:", _indent(y)]
    r.check("y", y, y_torch, "torch.nn.LayerNorm", TOL_TORCH)
    r.check("y", y, printed, "the seed's printout", TOL_PRINTED, relative=False)
    return r


def _seed003_channel() -> Replay:
    r = Replay("BatchNorm2d(2) per-channel check by hand", "003_6f8f140c3c6f8cc0.txt")
    x = torch.tensor(SEED003_INPUT)
    ours = nkm.BatchNorm2d(2, backend="reference")
    theirs = nn.BatchNorm2d(2)
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.tensor(SEED003_WEIGHT))
        y, y_torch = ours(x), theirs(x)
    mean, var, _ = _batch_stats(x, "batch_norm")
    values = x[0, 0].flatten().tolist()
    hand_mean = sum(values) / len(values)
    hand_var = sum((v - hand_mean) ** 2 for v in values) / len(values)  # biased: no Bessel correction
    hand_y = (values[0] - hand_mean) / math.sqrt(hand_var + ours.eps) * SEED003_WEIGHT[0] + 0.0
    r.lines += [f"input x, shape {tuple(x.shape)} (the seed's printout), weight = {SEED003_WEIGHT}, bias = 0:",
                _indent(x), "",
                f"step 1: channel 0 holds {len(values)} elements (N = 1, so just x[0, 0]):",
                f"    mean = sum / {len(values)} = {hand_mean:.4f}   (normkit: {mean.flatten()[0].item():.4f}, "
                f"the seed printed {SEED003_PRINTED_STATS[0]})",
                f"    var  = sum((x - mean)^2) / {len(values)} = {hand_var:.4f}   (biased; normkit: "
                f"{var.flatten()[0].item():.4f}, the seed printed {SEED003_PRINTED_STATS[1]})"]
    r.check("channel 0 mean", mean.flatten()[0], hand_mean, "by hand", TOL_TORCH)
    r.check("channel 0 var", var.flatten()[0], hand_var, "by hand", TOL_TORCH)
    r.check("channel 0 mean, var", torch.stack([mean.flatten()[0], var.flatten()[0]]),
            torch.tensor(SEED003_PRINTED_STATS), "the seed's printout", TOL_PRINTED, relative=False)
    r.lines += ["", f"step 2: y[0, 0, 0, 0] = ({values[0]:.4f} - {hand_mean:.4f}) / sqrt({hand_var:.4f} + {ours.eps}) "
                    f"* {SEED003_WEIGHT[0]} + 0 = {hand_y:.4f}",
                f"    normkit.BatchNorm2d: {y[0, 0, 0, 0].item():.4f}   torch.nn.BatchNorm2d: "
                f"{y_torch[0, 0, 0, 0].item():.4f}   the seed printed {SEED003_PRINTED[0][0][0][0]}"]
    r.check("y[0, 0, 0, 0]", y[0, 0, 0, 0], hand_y, "by hand", TOL_TORCH)
    r.check("y", y, y_torch, "torch.nn.BatchNorm2d", TOL_TORCH)
    r.check("y", y, torch.tensor(SEED003_PRINTED), "the seed's printout (input printed rounded)",
            TOL_PRINTED_ROUNDED_INPUT, relative=False)
    r.lines += ["", "full output (normkit):", _indent(y)]
    return r


def replay_seeds() -> list[Replay]:
    """The worked examples of seeds 000 and 003, computed by normkit's modules on the reference
    backend, each step checked against torch, the seed's printout or a hand computation."""
    return [
        _seed000_batch_norm(),
        _layer_norm_replay("LayerNorm(4) on a (2, 3, 4) sequence batch", SEED000_LN_INPUT, [4],
                           torch.tensor(SEED000_LN_PRINTED).expand(2, 3, 4)),
        _layer_norm_replay("LayerNorm([2, 3, 3]) on a (2, 2, 3, 3) image batch", SEED000_LN_IMAGE_INPUT, [2, 3, 3],
                           torch.tensor(SEED000_LN_IMAGE_PRINTED)),
        _seed003_channel(),
    ]
