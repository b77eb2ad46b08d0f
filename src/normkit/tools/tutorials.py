"""The worked examples of the five tutorials normkit's explanations start from, replayed step by
step by normkit's modules (reference backend), each step next to torch's numbers, the tutorial's
printout or a hand computation (``normkit explain --seed``):

- BatchNorm2d by hand on a 2x2x3x3 input, and LayerNorm over a sequence batch and over whole
  images (tutorial 000: mean, biased variance, normalize, running statistics, eval mode);
- BatchNorm, LayerNorm, GroupNorm and InstanceNorm written from scratch, checked with
  ``torch.allclose`` as the tutorial does (tutorial 001, its table of reduced and kept axes);
- LazyBatchNorm2d after a convolution: C inferred on the first call, an error when C changes
  (tutorial 002);
- one BatchNorm2d channel by hand with a random input and weight (tutorial 003);
- ``LayerNorm([3, 5, 5])`` on the 1x3x5x5 arange image, and the per-pixel LayerNorm over C by
  permuting to channels-last and back, which :class:`normkit.LayerNorm2d` computes without the
  permutes (tutorial 004; its hand computation uses eps 1e-6 against LayerNorm's default 1e-5).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import modules as nkm
from ..norms import layout
from ..reference import Normalize

__all__ = ["Check", "Replay", "replay_tutorials"]

# Inputs and printed outputs copied from the tutorials, to replay them and to compare with what
# they printed.
SEED000_BN_INPUT = [[[[1, 2, 3], [4, 5, 6], [7, 8, 9]], [[11, 12, 13], [14, 15, 16], [17, 18, 19]]],
                    [[[11, 13, 15], [17, 19, 21], [23, 25, 27]], [[21, 23, 25], [27, 29, 31], [33, 35, 37]]]]
# n0, n1 (both channels)
SEED000_BN_PRINTED = [[[-1.3574, -1.2340, -1.1106], [-0.9872, -0.8638, -0.7404], [-0.6170, -0.4936, -0.3702]],
                      [[-0.1234, 0.1234, 0.3702], [0.6170, 0.8638, 1.1106], [1.3574, 1.6042, 1.8511]]]
SEED000_LN_INPUT = [[[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]],
                    [[21, 22, 23, 24], [25, 26, 27, 28], [29, 30, 31, 32]]]
SEED000_LN_PRINTED = [-1.3416, -0.4472, 0.4472, 1.3416]  # every row
SEED000_LN_IMAGE_INPUT = [[[[1, 2, 3], [11, 12, 13], [21, 22, 23]], [[51, 52, 53], [61, 62, 63], [71, 72, 73]]],
                          [[[81, 82, 83], [91, 92, 93], [101, 102, 103]],
                           [[111, 112, 113], [121, 122, 123], [131, 132, 133]]]]
SEED000_LN_IMAGE_PRINTED = [[[[-1.3682, -1.3302, -1.2922], [-0.9881, -0.9501, -0.9121], [-0.6081, -0.5701, -0.5321]],
                             [[0.5321, 0.5701, 0.6081], [0.9121, 0.9501, 0.9881], [1.2922, 1.3302, 1.3682]]],
                            [[[-1.5207, -1.4622, -1.4037], [-0.9358, -0.8773, -0.8188], [-0.3509, -0.2924, -0.2339]],
                             [[0.2339, 0.2924, 0.3509], [0.8188, 0.8773, 0.9358], [1.4037, 1.4622, 1.5207]]]]
SEED003_INPUT = [[[[-2.4308, -1.0281, -1.1322, 0.9819], [-0.4069, 0.7973, 1.6296, 1.6797],
                   [0.2802, -0.8285, 2.0101, 0.1286]],
                  [[-0.5740, 0.1970, -0.7209, -0.7231], [-0.1489, 0.4993, 0.4159, 1.4238],
                   [0.0334, -0.6333, 0.1308, -0.2180]]]]
SEED003_WEIGHT = [0.5653, 0.0322]
SEED003_PRINTED = [[[[-1.1237, -0.5106, -0.5561, 0.3679], [-0.2391, 0.2873, 0.6510, 0.6729],
                     [0.0612, -0.4233, 0.8173, -0.0050]],
                    [[-0.0293, 0.0120, -0.0372, -0.0373], [-0.0066, 0.0282, 0.0237, 0.0777],
                     [0.0032, -0.0325, 0.0084, -0.0103]]]]
SEED003_PRINTED_STATS = (0.1401, 1.6730)  # mean and biased variance of channel 0

# Agreement bounds. normkit and torch: float32 arithmetic, a few ulps (relative above magnitude 1).
# The tutorials' printouts: 4 decimals (half a unit); tutorial 003's input and weight are themselves
# printed rounded to 4 decimals, which moves its outputs by up to ~1e-4 more.
TOL_TORCH = 1e-5
TOL_PRINTED = 5.1e-5
TOL_PRINTED_ROUNDED_INPUT = 2e-4


@dataclass
class Check:
    what: str
    normkit: float | list  # the value normkit computed (a number or a small nested list)
    other: float | list  # torch's value, the tutorial's printout or a hand computation
    against: str  # which of those ``other`` is
    max_diff: float
    tolerance: float
    passed: bool | None = None  # an element-wise test's own verdict (torch.allclose), where there is one

    @property
    def ok(self) -> bool:
        return self.passed if self.passed is not None else self.max_diff <= self.tolerance

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "ok": self.ok}


@dataclass
class Replay:
    title: str  # what it shows
    source: str  # which tutorial, by number and subject
    title_zh: str = ""  # the tutorial's own title
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

    def allclose(self, what: str, ours: Tensor, other: Tensor, against: str, *, atol: float = 1e-6,
                 rtol: float = 1e-5) -> None:
        """Record ``torch.allclose(ours, other, rtol, atol)``, as tutorial 001 prints it; the bound
        shown is ``atol + rtol * max|other|``."""
        ok = torch.allclose(ours.detach(), other.detach(), rtol=rtol, atol=atol)
        diff = (ours.detach().double() - other.detach().double()).abs().max().item()
        tol = atol + rtol * other.detach().abs().max().item()
        self.checks.append(Check(what, diff, 0.0, against, diff, tol, passed=ok))
        self.lines.append(f"    {what}: torch.allclose(normkit, {against}, atol={atol:g}) = {ok} "
                          f"(max |diff| = {diff:.2e})")

    def as_dict(self) -> dict[str, Any]:
        return {"title": self.title, "source": self.source, "title_zh": self.title_zh, "lines": self.lines,
                "checks": [c.as_dict() for c in self.checks]}


_T000 = "tutorial 000: BatchNorm and LayerNorm step by step"
_T000_ZH = "BatchNorm 与 LayerNorm 逐步计算"


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


def _tutorial000_batch_norm() -> Replay:
    r = Replay("BatchNorm2d by hand, 2x2x3x3", _T000, _T000_ZH)
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
    r.check("y", y, printed, "the tutorial's printout", TOL_PRINTED, relative=False)

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
    r = Replay(title, _T000, _T000_ZH)
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
    r.check("y", y, printed, "the tutorial's printout", TOL_PRINTED, relative=False)
    return r


def _tutorial003_channel() -> Replay:
    r = Replay("One BatchNorm2d channel by hand, 1x2x3x4", "tutorial 003: BatchNorm2d, one channel by hand",
               "BatchNorm2d 手算一个通道")
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
    r.lines += [f"input x, shape {tuple(x.shape)} (the tutorial's printout), weight = {SEED003_WEIGHT}, bias = 0:",
                _indent(x), "",
                f"step 1: channel 0 holds {len(values)} elements (N = 1, so just x[0, 0]):",
                f"    mean = sum / {len(values)} = {hand_mean:.4f}   (normkit: {mean.flatten()[0].item():.4f}, "
                f"the tutorial printed {SEED003_PRINTED_STATS[0]})",
                f"    var  = sum((x - mean)^2) / {len(values)} = {hand_var:.4f}   (biased; normkit: "
                f"{var.flatten()[0].item():.4f}, the tutorial printed {SEED003_PRINTED_STATS[1]})"]
    r.check("channel 0 mean", mean.flatten()[0], hand_mean, "by hand", TOL_TORCH)
    r.check("channel 0 var", var.flatten()[0], hand_var, "by hand", TOL_TORCH)
    r.check("channel 0 mean, var", torch.stack([mean.flatten()[0], var.flatten()[0]]),
            torch.tensor(SEED003_PRINTED_STATS), "the tutorial's printout", TOL_PRINTED, relative=False)
    r.lines += ["", f"step 2: y[0, 0, 0, 0] = ({values[0]:.4f} - {hand_mean:.4f}) / sqrt({hand_var:.4f} + {ours.eps}) "
                    f"* {SEED003_WEIGHT[0]} + 0 = {hand_y:.4f}",
                f"    normkit.BatchNorm2d: {y[0, 0, 0, 0].item():.4f}   torch.nn.BatchNorm2d: "
                f"{y_torch[0, 0, 0, 0].item():.4f}   the tutorial printed {SEED003_PRINTED[0][0][0][0]}"]
    r.check("y[0, 0, 0, 0]", y[0, 0, 0, 0], hand_y, "by hand", TOL_TORCH)
    r.check("y", y, y_torch, "torch.nn.BatchNorm2d", TOL_TORCH)
    r.check("y", y, torch.tensor(SEED003_PRINTED), "the tutorial's printout (input printed rounded)",
            TOL_PRINTED_ROUNDED_INPUT, relative=False)
    r.lines += ["", "full output (normkit):", _indent(y)]
    return r


def _tutorial001_from_scratch() -> Replay:
    r = Replay("BatchNorm, LayerNorm, GroupNorm, InstanceNorm from scratch, checked with allclose",
               "tutorial 001: the four norms from scratch against torch", "深度学习(归一化)")
    r.lines += [
        "the tutorial's table: the axes each norm computes its statistics over (计算维度) and those that keep",
        "their own statistics (固定维度), for (N, C, H, W) input:",
        "    BatchNorm     over (N, H, W)          one per channel C",
        "    LayerNorm     over (C, H, W) [here: the last axis of (N, L, 1000)]   one per sample N",
        "    GroupNorm     over (C/G, H, W)        one per sample N and group G",
        "    InstanceNorm  over (H, W)             one per sample N and channel C",
        "",
        "its from-scratch models (mean, biased variance, (x - mean) / sqrt(var + eps) * gamma + beta) against",
        "normkit's modules and torch's, on the tutorial's random inputs (seeded here):"]
    gen = torch.Generator().manual_seed(0)
    x_img, x_seq = torch.randn(20, 10, 50, 50, generator=gen), torch.randn(20, 10, 1000, generator=gen)

    def scratch(x: Tensor, dims: tuple[int, ...], view: tuple[int, ...] | None = None) -> Tensor:
        v = x if view is None else x.reshape(view)
        mean, var = v.mean(dim=dims, keepdim=True), v.var(dim=dims, unbiased=False, keepdim=True)
        return ((v - mean) / torch.sqrt(var + 1e-5)).reshape(x.shape)  # gamma 1, beta 0 at init

    cases = [
        ("BatchNorm2d(10)", x_img, scratch(x_img, (0, 2, 3)), nkm.BatchNorm2d(10, backend="reference"),
         nn.BatchNorm2d(10)),
        ("LayerNorm(1000)", x_seq, scratch(x_seq, (-1,)), nkm.LayerNorm(1000, backend="reference"), nn.LayerNorm(1000)),
        ("GroupNorm(2, 10)", x_img, scratch(x_img, (-1,), (20, 2, -1)), nkm.GroupNorm(2, 10, backend="reference"),
         nn.GroupNorm(2, 10)),
        ("InstanceNorm2d(10)", x_img, scratch(x_img, (-1,), (200, -1)), nkm.InstanceNorm2d(10, backend="reference"),
         nn.InstanceNorm2d(10)),
    ]
    for name, x, by_hand, ours, theirs in cases:
        with torch.no_grad():
            y, y_torch = ours(x), theirs(x)
        r.lines.append(f"  {name} on {tuple(x.shape)}:")
        r.allclose(f"{name} y", y, y_torch, f"torch.nn.{name.split('(')[0]}")
        r.allclose(f"{name} y", y, by_hand, "the tutorial's from-scratch model")
    return r


def _tutorial002_lazy() -> Replay:
    r = Replay("LazyBatchNorm2d infers C on its first call, and refuses another C",
               "tutorial 002: batch normalization with LazyBatchNorm2d", "批量归一化")
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 1)
    ours, theirs = nkm.LazyBatchNorm2d(backend="reference"), nn.LazyBatchNorm2d()
    x = torch.ones(1, 2, 28, 28)
    with torch.no_grad():
        h = conv(x)
        y, y_torch = ours(h), theirs(h)
    r.lines += ["conv = Conv2d(2, 3, 1); norm = LazyBatchNorm2d() (no num_features: it is size(1) of the first input)",
                f"step 1: norm(conv(ones(1, 2, 28, 28))): input {tuple(h.shape)}, so C = 3 is inferred:",
                f"    normkit: {type(ours).__name__}(num_features={ours.num_features}), "
                f"weight {tuple(ours.weight.shape)}, "
                f"running_mean {tuple(ours.running_mean.shape)}   torch: num_features={theirs.num_features}",
                "    (a constant input per channel: every output is 0, the batch variance 0 against eps)"]
    r.check("num_features", float(ours.num_features), float(theirs.num_features), "torch.nn.LazyBatchNorm2d", 0.0)
    r.check("y", y, y_torch, "torch.nn.LazyBatchNorm2d", TOL_TORCH)
    r.check("running_var", ours.running_var, theirs.running_var, "torch.nn.LazyBatchNorm2d", TOL_TORCH)
    errors = []
    for module in (ours, theirs):
        try:
            module(torch.ones(1, 4, 28, 28))
            errors.append("no error")
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    r.lines += ["step 2: norm(ones(1, 4, 28, 28)), a 4-channel input to the now 3-channel layer, raises:",
                f"    normkit: {errors[0]}", f"    torch:   {errors[1]}"]
    r.check("the error for C = 4", float(errors[0] == errors[1] and errors[0] != "no error"), 1.0,
            "torch's error, type and message", 0.0)
    return r


def _tutorial004_image() -> list[Replay]:
    arange = torch.stack([torch.arange(1, 26), torch.arange(11, 36), torch.arange(31, 56)]).float()
    x = arange.reshape(1, 3, 5, 5)
    whole = Replay("LayerNorm([3, 5, 5]) over a whole 1x3x5x5 image", "tutorial 004: nn.LayerNorm, two ways",
                   "nn.LayerNorm的实现及原理")
    ours, theirs = nkm.LayerNorm([3, 5, 5], backend="reference"), nn.LayerNorm([3, 5, 5])
    with torch.no_grad():
        y, y_torch = ours(x), theirs(x)
    u = x.mean()
    s = (x - u).pow(2).mean()
    whole.lines += ["input: channels arange(1, 26), arange(11, 36), arange(31, 56) as 5x5 images, shape (1, 3, 5, 5)",
                    f"by hand: u = x.mean() = {u.item():.4f}, s = ((x - u)^2).mean() = {s.item():.4f}, "
                    "y = (x - u) / sqrt(s + 1e-5)",
                    f"    y[0, 0, 0] = [{_fmt(y[0, 0, 0])}]"]
    whole.check("y", y, (x - u) / torch.sqrt(s + 1e-5), "by hand", TOL_TORCH)
    whole.check("y", y, y_torch, "torch.nn.LayerNorm", TOL_TORCH)
    whole.check("y[0, 0, 0]", y[0, 0, 0], torch.tensor([-1.7584, -1.6890, -1.6196, -1.5502, -1.4808]),
                "the tutorial's printout", TOL_PRINTED, relative=False)

    pixel = Replay("LayerNorm over C at every pixel: permute to channels-last, or LayerNorm2d",
                   "tutorial 004: nn.LayerNorm, two ways", "nn.LayerNorm的实现及原理")
    nhwc = x.permute(0, 2, 3, 1).contiguous()
    per_pixel, ln2d = nkm.LayerNorm(3, backend="reference"), nkm.LayerNorm2d(3, backend="reference")
    with torch.no_grad():
        y_nhwc, y_nhwc_torch, y2d = per_pixel(nhwc), nn.LayerNorm(3)(nhwc), ln2d(x)
    u_c = x.mean(dim=1, keepdim=True)
    s_c = (x - u_c).pow(2).mean(1, keepdim=True)
    hand_1e6 = (x - u_c) / torch.sqrt(s_c + 1e-6)
    pixel.lines += ["LayerNorm(3) normalizes the last axis, "
                    "so the tutorial permutes (1, 3, 5, 5) to (1, 5, 5, 3) first:",
                    f"    every pixel: [{_fmt(y_nhwc[0, 0, 0])}]   (the three channels 1, 11, 31 of pixel (0, 0))",
                    "by hand, back in (1, 3, 5, 5): u = x.mean(dim=1), s = ((x - u)^2).mean(dim=1), y = (x - u) / "
                    "sqrt(s + 1e-6): the tutorial's eps is 1e-6, LayerNorm's default 1e-5 (a difference of "
                    f"{(y_nhwc.permute(0, 3, 1, 2) - hand_1e6).abs().max().item():.1e} here)",
                    "normkit.LayerNorm2d(3) computes the same per-pixel LayerNorm on (N, C, H, W) directly, "
                    "no permutes"]
    pixel.check("y (channels-last)", y_nhwc, y_nhwc_torch, "torch.nn.LayerNorm", TOL_TORCH)
    pixel.check("y[0, 0, 0]", y_nhwc[0, 0, 0], torch.tensor([-1.0690, -0.2673, 1.3363]), "the tutorial's printout",
                TOL_PRINTED, relative=False)
    pixel.check("y", y_nhwc.permute(0, 3, 1, 2), hand_1e6, "by hand with eps 1e-6", 1e-4)
    pixel.check("LayerNorm2d y", y2d, y_nhwc.permute(0, 3, 1, 2), "LayerNorm(3) on the permuted input", TOL_TORCH)
    return [whole, pixel]


def replay_tutorials() -> list[Replay]:
    """The worked examples of the five tutorials, computed by normkit's modules on the reference
    backend, each step checked against torch, the tutorial's printout or a hand computation."""
    return [
        _tutorial000_batch_norm(),
        _layer_norm_replay("LayerNorm(4) over a 2x3x4 sequence batch", SEED000_LN_INPUT, [4],
                           torch.tensor(SEED000_LN_PRINTED).expand(2, 3, 4)),
        _layer_norm_replay("LayerNorm([2, 3, 3]) over whole images, 2x2x3x3", SEED000_LN_IMAGE_INPUT, [2, 3, 3],
                           torch.tensor(SEED000_LN_IMAGE_PRINTED)),
        _tutorial001_from_scratch(),
        _tutorial002_lazy(),
        _tutorial003_channel(),
        *_tutorial004_image(),
    ]
