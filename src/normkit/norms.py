"""The table of norms: every normalization in normkit is one row of it, and the row generates.

Each norm is the same three steps: choose the axes to reduce over, compute a statistic over them,
normalize and apply the affine parameters. A :class:`NormSpec` row says each step as data:

* ``reduce`` (:class:`Reduce`): which axes keep their own statistics. For a channel-first input
  ``(N, C, *spatial)`` the kept axes are named (``("C",)`` for BatchNorm, ``("N", "C")`` for
  InstanceNorm, ``("N", "G")`` with the channels split into ``(G, C/G)`` for GroupNorm), every
  other axis is reduced; a trailing-axis norm (LayerNorm, RMSNorm) reduces the trailing
  ``normalized_shape`` axes and keeps the leading ones.
  ``groups`` with ``trailing`` splits the last dim into groups of ``group_size`` channels, each
  with its own statistic (gated RMSNorm).
* ``statistic`` (and ``centered``): ``"variance"`` (mean subtracted, ``rsqrt(Var[x] + eps)``),
  ``"mean_square"`` (not centred, ``rsqrt(E[x^2] + eps)``), ``"l2_norm"`` (not centred,
  ``1 / max(||x||_2, eps)``) or ``"none"`` (no statistic and no reduced axis: an elementwise
  squash standing in for a norm, DyT and Derf).
* ``param`` and ``affine``: the shape of each affine parameter (``"feature"``: the normalized
  shape, ``"channel"``: ``(C,)``, ``"scalar"``: one number) and their names; ``scalars``: learnable
  one-number parameters before them (DyT's ``alpha``).
* ``inputs`` (:class:`Extra`): the tensors a call takes besides the input, which are not the
  module's parameters (adaLN's ``shift`` and ``scale``, from the conditioning; Mamba2's ``gate``):
  their names, shape rule and what they do.
* ``running_stats``, ``eps`` (the default; ``None``: machine epsilon of the statistics' dtype,
  see :func:`normkit.numerics.rms_eps`) and ``twin``, the torch.nn module and function computing
  the same thing (``None`` where torch has none: then the oracle of tests and ``normkit check``
  is :mod:`normkit.reference` run in float64).
* ``call`` and ``constructor`` build a small example (:meth:`NormSpec.example`), and
  ``torch_op`` is what the ``"torch"`` backend runs (the twin's function, or a composition of
  torch ops) and ``reference_op`` what the ``"reference"`` backend runs.

:func:`layout` turns a row into concrete reduction dims for a tensor. The reference
implementation, the backend tables (:mod:`normkit.ops.builtin`), the modules' docs, the CLI and
the tests read this table: adding a norm is one row here plus its formula in
:mod:`normkit.reference`, or for the norms of today's blocks in :mod:`normkit.blocks` (their
reference and composition, looked up by the row's name when first used: :mod:`normkit.blocks`
imports the reference, which imports this table).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch.nn.functional as F
from torch import Tensor

from .numerics import acc_dtype

__all__ = ["NORMS", "Example", "Extra", "Layout", "NormSpec", "Reduce", "Sizes", "Twin", "layout"]


class Reduce(NamedTuple):
    """The reduce rule of a norm: the axes that each get their own statistics.

    ``kept`` names kept axes of a channel-first ``(N, C, *spatial)`` input (``"N"``, ``"C"``,
    or ``"G"`` when ``groups``: the channels viewed as ``(G, C/G)``, ``G`` kept, ``C/G``
    reduced); every other axis is reduced. ``trailing``: the norm reduces the trailing
    ``normalized_shape`` axes instead and keeps every leading one (``kept`` is then empty);
    ``trailing_ndim`` fixes how many (ScaleNorm: the last one) where the call does not say.
    ``trailing`` with ``groups``: the last dim viewed as ``(G, D/G)``, ``G`` kept (gated
    RMSNorm's ``group_size`` is ``D/G``)."""

    kept: tuple[str, ...] = ()
    groups: bool = False
    trailing: bool = False
    trailing_ndim: int | None = None


class Twin(NamedTuple):
    """The torch.nn names of a norm: the module family (``"BatchNorm"``, suffixed ``1d/2d/3d``
    where torch's classes are) and the ``torch.nn.functional`` function."""

    module: str
    function: str

    @property
    def torch_function(self) -> Callable[..., Tensor]:
        return getattr(F, self.function)


class Sizes(NamedTuple):
    """The sizes an example is built for: the input ``shape`` (channel-first for the channel
    norms), the number of trailing axes a trailing norm normalizes and GroupNorm's G (gated
    RMSNorm's: the groups of the last dim)."""

    shape: tuple[int, ...]
    normalized_ndim: int = 1
    num_groups: int = 1


class Extra(NamedTuple):
    """A tensor a norm takes per call besides its input, not a parameter of its module (adaLN's
    ``shift`` and ``scale``, Mamba2's ``gate``).

    ``shape``: ``"per_sample"``, broadcast against the input as ``(N, 1, ..., 1, D)`` (the op
    takes any shape that broadcasts to the input's: per token ``(N, L, D)`` too), or
    ``"input"``, the input's own shape. ``role`` says what it does, in words; ``neutral`` is a
    value that leaves the plain norm (``explain`` runs the norm with it)."""

    name: str
    shape: str
    role: str
    neutral: float

    def shape_for(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """This tensor's shape in an example on an input of ``input_shape``."""
        input_shape = tuple(input_shape)
        if self.shape == "input" or len(input_shape) < 2:
            return input_shape
        if self.shape == "per_sample":
            return (input_shape[0],) + (1,) * (len(input_shape) - 2) + input_shape[-1:]
        raise ValueError(f"unknown shape rule {self.shape!r} of input {self.name!r}")


class Example(NamedTuple):
    """One small use of a norm, for tests, ``normkit check`` and ``normkit explain``.

    ``module`` and ``module_args``/``module_kwargs`` build it as a layer (``getattr(lib,
    module)(*module_args, **module_kwargs)`` with ``lib`` normkit, or torch.nn where the norm
    has a twin); ``call(f, x, *params)`` is the same computation in training mode as a function
    call, for ``f`` any of ``torch.nn.functional`` (with a twin), ``normkit.functional`` and
    ``normkit.reference``, with ``params`` shaped ``param_shape`` (one per name of
    :attr:`NormSpec.affine`). A norm with per-call tensors (:attr:`NormSpec.inputs`) or scalar
    parameters takes ``call(f, x, *inputs, *scalars, *affine)``, shaped ``input_shapes`` and
    ``param_shapes``: :meth:`tensors` makes them all."""

    sizes: Sizes
    module: str
    module_args: tuple[Any, ...]
    module_kwargs: dict[str, Any]
    param_shape: tuple[int, ...]
    call: Callable[..., Tensor]
    input_shapes: tuple[tuple[int, ...], ...] = ()  # of the per-call tensors (NormSpec.inputs)
    param_shapes: tuple[tuple[int, ...], ...] = ()  # of every parameter (NormSpec.params)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.sizes.shape

    def tensors(self, make: Callable[..., Any]) -> tuple[Any, ...]:
        """``make(*shape)`` for the input, each per-call tensor and each parameter: the tensors
        of :attr:`call` after ``f``, in order."""
        return (make(*self.shape), *(make(*s) for s in self.input_shapes), *(make(*s) for s in self.param_shapes))


@dataclass(frozen=True)
class NormSpec:
    """One row of :data:`NORMS` (see the module docstring for what each field generates)."""

    name: str  # the functional op (normkit.functional.<name>, normkit.reference.<name>)
    module: str  # the normkit class family (BatchNorm -> BatchNorm1d/2d/3d)
    reduce: Reduce
    statistic: str  # "variance" | "mean_square" | "l2_norm" | "none"
    param: str  # shape of each affine parameter: "feature" | "channel" | "scalar"
    affine: tuple[str, ...]  # the affine parameters, in the functional's argument order
    running_stats: bool  # keeps running_mean / running_var for eval
    eps: float | None  # the default; None: machine epsilon of the statistics' dtype
    formula: str
    twin: Twin | None  # torch's module and function for the same norm, None where torch has none
    # call(f, x, sizes, *params): the norm in training mode through the namespace f
    call: Callable[..., Tensor] = field(repr=False)
    # the module's constructor arguments for an input of these sizes
    constructor: Callable[[Sizes], tuple[tuple[Any, ...], dict[str, Any]]] = field(repr=False)
    sizes: Sizes = Sizes((2, 4, 3, 5))  # the default example's
    # what the "torch" backend runs where the norm has no twin: a composition of torch ops (None
    # for the norms of normkit.blocks: its COMPOSITION, looked up by name)
    composition: Callable[..., Tensor] | None = field(default=None, repr=False)
    inputs: tuple[Extra, ...] = ()  # the per-call tensors after the input, in argument order
    scalars: tuple[str, ...] = ()  # learnable one-number parameters, before the affine ones
    # the fused ops that compute this norm more than once, or with a residual add, in one call:
    # op -> what it computes (normkit explain names the row for them)
    fused: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def params(self) -> tuple[str, ...]:
        """Every parameter of the functional, in argument order: the scalars, then the affine."""
        return self.scalars + self.affine

    @property
    def centered(self) -> bool:
        """Whether the mean is subtracted (False: the statistic is taken about 0)."""
        return self.statistic == "variance"

    @property
    def kept(self) -> str:
        """The kept axes, in words."""
        if self.statistic == "none":
            return "every axis"
        if self.reduce.trailing:
            return "leading axes and the groups of the last dim" if self.reduce.groups else "leading axes"
        return ", ".join(self.reduce.kept)

    @property
    def reduced(self) -> str:
        """The reduced axes, in words."""
        if self.statistic == "none":
            return "none (no statistics: elementwise)"
        if self.reduce.trailing:
            if self.reduce.groups:
                return "each group of group_size channels of the last dim"
            return "the last dim" if self.reduce.trailing_ndim == 1 else "normalized_shape (trailing)"
        axes = [a for a in ("N",) if a not in self.reduce.kept]
        if self.reduce.groups:
            axes.append("C/G")
        elif "C" not in self.reduce.kept:
            axes.append("C")
        return ", ".join([*axes, "*spatial"])

    @property
    def torch_op(self) -> Callable[..., Tensor]:
        """What the ``"torch"`` backend runs: the twin's function, else the composition."""
        if self.twin is not None:
            return self.twin.torch_function
        if self.composition is not None:
            return self.composition
        return self._blocks("COMPOSITION")

    @property
    def reference_op(self) -> Callable[..., Tensor]:
        """What the ``"reference"`` backend runs: :mod:`normkit.reference`'s function of this name."""
        from . import reference  # noqa: PLC0415  (normkit.reference imports this table)

        return getattr(reference, self.name)

    def _blocks(self, table: str) -> Callable[..., Tensor]:
        from . import blocks  # noqa: PLC0415  (normkit.blocks imports the reference, which imports this table)

        fn = getattr(blocks, table).get(self.name)
        assert fn is not None, f"norm {self.name!r} has no torch twin and no normkit.blocks.{table} entry"
        return fn

    def module_class(self, ndim: int) -> str:
        """The class name for an input of ``ndim`` dims (``BatchNorm2d`` for 4-D BatchNorm)."""
        suffixed = self.running_stats  # torch's classes with running statistics come per rank
        return f"{self.module}{max(ndim - 2, 1)}d" if suffixed else self.module

    def param_shape(self, sizes: Sizes) -> tuple[int, ...]:
        """The shape of each affine parameter in an example of ``sizes``."""
        if self.param == "scalar":
            return ()
        if self.param == "feature":
            ndim = self.reduce.trailing_ndim or sizes.normalized_ndim
            return tuple(sizes.shape[len(sizes.shape) - ndim:])
        return (sizes.shape[1],)

    def example(self, sizes: Sizes | None = None) -> Example:
        """A small use of this norm on an input of ``sizes`` (default :attr:`sizes`)."""
        sizes = self.sizes if sizes is None else sizes
        args, kwargs = self.constructor(sizes)

        def call(f: Any, x: Tensor, *params: Tensor | None) -> Tensor:
            return self.call(f, x, sizes, *params)

        param = self.param_shape(sizes)
        return Example(sizes, self.module_class(len(sizes.shape)), args, kwargs, param, call,
                       tuple(e.shape_for(sizes.shape) for e in self.inputs),
                       (*((1,) for _ in self.scalars), *(param for _ in self.affine)))


def _trailing(s: Sizes) -> tuple[int, ...]:
    return tuple(s.shape[len(s.shape) - s.normalized_ndim:])


def _scale_norm_composition(input: Tensor, g: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """ScaleNorm in torch ops: ``F.normalize`` (``x / max(||x||_2, eps)``) in the accumulation
    dtype, times ``g``, rounded once to the input's dtype."""
    acc = acc_dtype(input.dtype)
    y = F.normalize(input.to(acc), 2.0, -1, eps)
    return (y if g is None else y * g.to(acc)).to(input.dtype)


_VARIANCE = "y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias"

# adaLN's modulation (DiT, SD3, Flux): per call, from the conditioning embedding
_SHIFT = Extra("shift", "per_sample", "added after the norm and its affine (y + shift); per sample (N, 1, D) or "
               "per token (N, L, D), its gradient summed over the broadcast axes", 0.0)
_SCALE = Extra("scale", "per_sample", "multiplies the normalized x by (1 + scale), broadcast as shift", 0.0)
# Mamba2's gate: a constant gate scales each group by one number, which the RMS statistic undoes
# (a large one, so that eps stays negligible against the mean square)
_GATE = Extra("gate", "input", "z = x * silu(gate) is what gets normalized (norm_before_gate=True: the norm's output "
              "times silu(gate) instead); the input's shape", 8.0)


def _last(s: Sizes) -> int:
    return s.shape[-1]

NORMS: dict[str, NormSpec] = {
    spec.name: spec
    for spec in (
        NormSpec(
            "batch_norm", "BatchNorm", Reduce(kept=("C",)), "variance", "channel", ("weight", "bias"), True, 1e-5,
            _VARIANCE, Twin("BatchNorm", "batch_norm"),
            call=lambda f, x, s, w, b: f.batch_norm(x, None, None, w, b, True, 0.1, 1e-5),
            constructor=lambda s: ((s.shape[1],), {}),
            sizes=Sizes((16, 4, 5, 5)),
        ),
        NormSpec(
            "layer_norm", "LayerNorm", Reduce(trailing=True), "variance", "feature", ("weight", "bias"), False, 1e-5,
            _VARIANCE, Twin("LayerNorm", "layer_norm"),
            call=lambda f, x, s, w, b: f.layer_norm(x, _trailing(s), w, b, 1e-5),
            constructor=lambda s: ((_trailing(s),), {}),
            sizes=Sizes((8, 64)),
            fused={"add_layer_norm": "residual_out = x + residual, then this norm of residual_out, in one pass"},
        ),
        NormSpec(
            "group_norm", "GroupNorm", Reduce(kept=("N", "G"), groups=True), "variance", "channel",
            ("weight", "bias"), False, 1e-5, _VARIANCE, Twin("GroupNorm", "group_norm"),
            call=lambda f, x, s, w, b: f.group_norm(x, s.num_groups, w, b, 1e-5),
            constructor=lambda s: ((s.num_groups, s.shape[1]), {}),
            sizes=Sizes((4, 6, 5, 5), num_groups=2),
        ),
        NormSpec(
            "instance_norm", "InstanceNorm", Reduce(kept=("N", "C")), "variance", "channel", ("weight", "bias"),
            True, 1e-5, _VARIANCE, Twin("InstanceNorm", "instance_norm"),
            call=lambda f, x, s, w, b: f.instance_norm(x, None, None, w, b, True, 0.1, 1e-5),
            constructor=lambda s: ((s.shape[1],), {"affine": True}),
            sizes=Sizes((4, 3, 7, 7)),
        ),
        NormSpec(
            "rms_norm", "RMSNorm", Reduce(trailing=True), "mean_square", "feature", ("weight",), False, None,
            "y = x / sqrt(E[x^2] + eps) * weight", Twin("RMSNorm", "rms_norm"),
            call=lambda f, x, s, w: f.rms_norm(x, _trailing(s), w, 1e-5),
            constructor=lambda s: ((_trailing(s),), {}),
            sizes=Sizes((8, 64)),
            fused={
                "add_rms_norm": "residual_out = x + residual, then this norm of residual_out, in one pass",
                "qk_rms_norm": "this norm over the last (head) dim of q and of k (its own weight each), in one call",
                "sandwich_rms_norm": "residual_out = residual + this norm of hidden (post_weight), then this norm "
                                     "of residual_out (next_weight), in one pass: Gemma's post-norm and next pre-norm",
            },
        ),
        NormSpec(
            "scale_norm", "ScaleNorm", Reduce(trailing=True, trailing_ndim=1), "l2_norm", "scalar", ("g",), False, 1e-5,
            "y = g * x / max(||x||_2, eps)", None,
            call=lambda f, x, s, g: f.scale_norm(x, g, 1e-5),
            constructor=lambda s: ((s.shape[-1],), {}),
            sizes=Sizes((8, 64)),
            composition=_scale_norm_composition,
        ),
        # The norms of today's blocks: one norm of one input, with per-call tensors (inputs) or
        # scalar parameters; their reference and composition live in normkit.blocks.
        NormSpec(
            "modulated_layer_norm", "ModulatedLayerNorm", Reduce(trailing=True, trailing_ndim=1), "variance",
            "feature", ("weight", "bias"), False, 1e-6,
            "y = ((x - E[x]) / sqrt(Var[x] + eps) * weight + bias) * (1 + scale) + shift", None,
            call=lambda f, x, s, shift, scale, w, b: f.modulated_layer_norm(x, shift, scale, w, b, 1e-6),
            constructor=lambda s: ((_last(s),), {"elementwise_affine": True}),
            sizes=Sizes((2, 5, 48)),
            inputs=(_SHIFT, _SCALE),
        ),
        NormSpec(
            "modulated_rms_norm", "ModulatedRMSNorm", Reduce(trailing=True, trailing_ndim=1), "mean_square",
            "feature", ("weight",), False, None, "y = (x / sqrt(E[x^2] + eps) * weight) * (1 + scale) + shift", None,
            call=lambda f, x, s, shift, scale, w: f.modulated_rms_norm(x, shift, scale, w, 1e-6),
            constructor=lambda s: ((_last(s),), {"elementwise_affine": True}),
            sizes=Sizes((2, 5, 48)),
            inputs=(_SHIFT, _SCALE),
        ),
        NormSpec(
            "gated_rms_norm", "GatedRMSNorm", Reduce(trailing=True, trailing_ndim=1, groups=True), "mean_square",
            "feature", ("weight",), False, 1e-6,
            "y = z / sqrt(E[z^2] + eps) * weight over each group of the last dim, z = x * silu(gate)", None,
            call=lambda f, x, s, gate, w: f.gated_rms_norm(x, gate, w, 1e-6, group_size=_last(s) // s.num_groups,
                                                           norm_before_gate=False),
            constructor=lambda s: ((_last(s), 1e-6, _last(s) // s.num_groups), {}),
            sizes=Sizes((6, 64), num_groups=4),
            inputs=(_GATE,),
        ),
        NormSpec(
            "dyt", "DyT", Reduce(trailing=True, trailing_ndim=1), "none", "feature", ("weight", "bias"), False, None,
            "y = weight * tanh(alpha * x) + bias", None,
            call=lambda f, x, s, alpha, w, b: f.dyt(x, alpha, w, b),
            constructor=lambda s: ((_last(s),), {}),
            sizes=Sizes((8, 64)),
            scalars=("alpha",),
        ),
        NormSpec(
            "derf", "Derf", Reduce(trailing=True, trailing_ndim=1), "none", "feature", ("weight", "bias"), False, None,
            "y = weight * erf(alpha * x + shift) + bias", None,
            call=lambda f, x, s, alpha, shift, w, b: f.derf(x, alpha, shift, w, b),
            constructor=lambda s: ((_last(s),), {}),
            sizes=Sizes((8, 64)),
            scalars=("alpha", "shift"),
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
    """Concrete reduction dims for norm ``name`` on a tensor of ``shape``, from its row's
    :class:`Reduce` and ``param``.

    ``normalized_ndim`` is ``len(normalized_shape)`` for the trailing-axis norms and
    ``num_groups`` the G of GroupNorm (of gated RMSNorm: ``D / group_size``). A norm without
    statistics (``"none"``) reduces no dims.
    """
    spec = NORMS.get(name)
    if spec is None:
        raise KeyError(f"no layout for norm {name!r}; known: {sorted(NORMS)}")
    shape = tuple(shape)
    nd = len(shape)
    if spec.reduce.trailing:
        normalized_ndim = spec.reduce.trailing_ndim or normalized_ndim
        if spec.reduce.groups:  # the last dim as (G, D/G): each group its own statistic
            if shape[-1] % num_groups:
                raise ValueError(f"{name}: {num_groups} groups do not divide the last dim {shape[-1]}")
            view = shape[:-1] + (num_groups, shape[-1] // num_groups)
            return Layout(view, (nd,), view[-2:])
        dims = () if spec.statistic == "none" else tuple(range(nd - normalized_ndim, nd))
        param_view = () if spec.param == "scalar" else shape[nd - normalized_ndim:]
        return Layout(shape, dims, param_view)
    rule = spec.reduce
    channels, spatial = shape[1], shape[2:]
    # the channel axis as one axis (C) or two (G, C/G): named, then kept or reduced by name
    if rule.groups:
        view = (shape[0], num_groups, channels // num_groups) + spatial
        names = ("N", "G", "C/G") + ("*",) * len(spatial)
    else:
        view, names = shape, ("N", "C") + ("*",) * len(spatial)
    dims = tuple(i for i, a in enumerate(names) if a not in rule.kept)
    channel_axes = {"C", "G", "C/G"}
    if spec.param == "scalar":
        param_view: tuple[int, ...] = ()
    else:
        param_view = tuple(v if a in channel_axes else 1 for a, v in zip(names, view))
    return Layout(view, dims, param_view)
