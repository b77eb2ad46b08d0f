"""The CLI's pictures: explain's cubes, bench's bandwidth curves, compare's accuracy and losses.

matplotlib is imported only when a picture is drawn, and never through pyplot: each figure is
a bare :class:`matplotlib.figure.Figure` on an Agg canvas, so drawing one neither needs a
display nor changes the backend of a user's session.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .explain import Explanation

__all__ = ["bench_figure", "compare_figure", "explain_figure"]

_SHADE = "#3a78c9"  # the elements of one statistic, as in Wu & He's Fig. 2
_PALE = "#f4f4f4"


def _figure(width: float, height: float, *, constrained: bool = True) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def _label(ax: Any, xlabel: str, ylabel: str, title: str, *, legend_size: int = 8) -> None:
    """Axis labels, a title, a light grid and a legend: every line plot here has them."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def explain_figure(explanations: Sequence[Explanation], path: str | Path) -> Path:
    """One cube per norm, axes N (depth), C (across) and the spatial axes flattened (up), with
    the elements that one statistic is computed over shaded (Wu & He, 2018, Fig. 2)."""
    import numpy as np
    fig = _figure(3.0 * len(explanations), 3.6, constrained=False)  # 3D axes place their own labels
    for i, e in enumerate(explanations):
        ax = fig.add_subplot(1, len(explanations), i + 1, projection="3d")
        ids = e.statistic_of.reshape(e.shape[0], e.shape[1], -1).numpy()  # (N, C, spatial)
        cube = np.transpose(ids, (1, 0, 2))  # x = C, y = N, z = spatial
        colors = np.where(cube == 0, _SHADE, _PALE).astype(object)
        ax.voxels(np.ones(cube.shape, dtype=bool), facecolors=colors, edgecolor="#7a7a7a", linewidth=0.4,
                  shade=False)  # flat faces: the edges draw the cells, no face goes dark
        ax.set_box_aspect(cube.shape)
        ax.view_init(elev=30, azim=-50)
        ax.set_xticks([]), ax.set_yticks([]), ax.set_zticks([])
        ax.set_xlabel("C", labelpad=-12)
        ax.set_ylabel("N", labelpad=-12)
        ax.set_zlabel(", ".join(e.axes[2:]), labelpad=-12)
        for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
            axis.pane.set_visible(False)
            axis.line.set_visible(False)
        stats = " & ".join(e.statistics)
        ax.set_title(f"{e.module}\n{e.num_statistics} x {stats},\neach over {e.elements_per_statistic} elements "
                     f"({', '.join(e.reduced_axes)})", fontsize=9)
    fig.suptitle("which elements one statistic is computed over, "
                 f"input (N, C, {', '.join(explanations[0].axes[2:])}) = "
                 f"{explanations[0].shape}", fontsize=10)
    return _save(fig, path)


def bench_figure(points: Sequence[dict[str, Any]], path: str | Path, copy_gbps: float | None = None) -> Path:
    """GB/s against width (elements per statistic), one line per provider, one panel per
    (op, dtype, direction). ``points``: dicts with op, dtype, direction, provider, width, gbps."""
    panels: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for pt in points:
        panels.setdefault((pt["op"], pt["dtype"], pt["direction"]), []).append(pt)
    cols = min(3, max(1, len(panels)))
    nrows = math.ceil(len(panels) / cols)
    fig = _figure(4.6 * cols, 3.6 * nrows)
    for i, ((op, dtype, direction), group) in enumerate(panels.items()):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for provider in dict.fromkeys(pt["provider"] for pt in group):
            xy = sorted((pt["width"], pt["gbps"]) for pt in group if pt["provider"] == provider)
            ax.plot([w for w, _ in xy], [g for _, g in xy], marker="o", label=provider)
        if copy_gbps:
            ax.axhline(copy_gbps, color="grey", linestyle="--", linewidth=1, label="copy bandwidth")
        ax.set_xscale("log", base=2)
        _label(ax, "width (elements per statistic)", "GB/s (bytes-moved model)", f"{op} {direction}, {dtype}",
               legend_size=7)
    return _save(fig, path)


def compare_figure(result: dict[str, Any], path: str | Path) -> Path:
    """Validation accuracy against batch size per norm (mean and spread over seeds), and the
    training-loss curves at the smallest and the largest batch size."""
    norms, batch_sizes = result["norms"], result["batch_sizes"]
    fig = _figure(14, 4.2)
    ax = fig.add_subplot(1, 3, 1)
    colors: dict[str, Any] = {}
    for norm in norms:
        means = [result["accuracy"][norm][str(b)]["mean"] * 100 for b in batch_sizes]
        stds = [result["accuracy"][norm][str(b)]["std"] * 100 for b in batch_sizes]
        line = ax.errorbar(batch_sizes, means, yerr=stds, marker="o", capsize=3, label=norm)
        colors[norm] = line[0].get_color()
    ax.set_xscale("log", base=2)
    ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    ax.invert_xaxis()  # as Wu & He's Fig. 1: batch size shrinking to the right
    _label(ax, "batch size (images per worker)", "validation accuracy (%)",
           f"{result['dataset']}: accuracy vs batch size\n(BatchNorm evaluated with running statistics)")
    lows = [m - s for norm in norms for b in batch_sizes
            for m, s in [(result["accuracy"][norm][str(b)]["mean"] * 100,
                          result["accuracy"][norm][str(b)]["std"] * 100)]]
    ax.set_ylim(max(0.0, math.floor(min(lows) / 5) * 5), 100.5)

    for j, batch in enumerate((batch_sizes[0], batch_sizes[-1]) if len(batch_sizes) > 1 else (batch_sizes[0],)):
        ax = fig.add_subplot(1, 3, 2 + j)
        for norm in norms:
            curve = result["loss_curves"][norm][str(batch)]
            ax.plot(curve["samples"], curve["loss"], label=norm, color=colors[norm])
        ax.set_yscale("log")
        _label(ax, "training samples seen", "training loss (mean over seeds)", f"training loss, batch size {batch}")
    return _save(fig, path)
