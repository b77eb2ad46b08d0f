"""The one table of test cases and the one table of tolerances for normkit's tests.

Every test file reads these tables instead of inventing its own shapes and bounds:

- :data:`NORM_CASES`: one row per (module, constructor arguments, input shape, memory layout).
  Per family it covers a batch of 1 where training allows it, odd and prime sizes, a trailing
  width above 4096 (LayerNorm, RMSNorm), non-contiguous inputs (a transposed or a strided view),
  ``channels_last`` / ``channels_last_3d`` inputs, 1d/2d/3d variants, inputs without a batch dim
  and empty batches. :data:`LAZY_CASES`, :data:`FUSED_ADD_CASES` and :data:`FUNCTIONAL_CASES`
  are the same idea for the lazy modules, the residual-add norms and ``normkit.functional``.
- :data:`TOLERANCES` (:mod:`normkit.testing`'s, the library's one table): every bound a test may
  use, each with the reason for its number (QuACK's ``TOLERANCES``), and
  :func:`assert_close_to_reference`, which applies them.
- :data:`BACKENDS` (``normkit.backends()`` at import) and :data:`DTYPES`: tests parametrize over
  them, so a new backend or dtype is tested without editing any test.

Low precision (bf16, fp16) is judged against float64, not against torch's low-precision output
(torch's own bf16 LayerNorm weight gradient on the CPU is off by several percent), with the
self-calibrating bound of flash-attn: normkit's error may be at most twice torch's error in the
same dtype, plus one unit in the last place at the magnitude of the result.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import normkit
from normkit.backends import BackendError
from normkit.norms import NORMS
from normkit.testing import LOW_PRECISION, TOLERANCES, Tolerance, assert_close_to_reference

__all__ = [
    "BACKENDS",
    "Host",
    "MODULE_CLASSES",
    "MODULE_ROWS",
    "DTYPES",
    "FUNCTIONAL_CASES",
    "FUSED_ADD_CASES",
    "LAZY_CASES",
    "LOW_PRECISION",
    "MUST_RUN",
    "NORM_CASES",
    "STEPS",
    "TOLERANCES",
    "FunctionalCase",
    "FusedAddCase",
    "NormCase",
    "REFERENCE",
    "Tolerance",
    "assert_close_to_reference",
    "make_input",
    "module_call",
    "randomize_",
    "run_or_skip",
    "seed_of",
    "skip_if_declined",
    "torch_rms_eps",
]

# The cases are tiny: ATen's OpenMP pool costs more than it saves on them, and on a busy 2-core
# machine its spin-waits make one CPU batch_norm call take 5-30 ms instead of 0.1 ms. One thread
# for the whole session (every test file imports this table).

BACKENDS: list[str] = normkit.backends()
# The built-in CPU backends run every call torch runs: a BackendError from them is a bug unless
# torch cannot run the call either; other backends (triton) may decline a CPU call: skipped.
MUST_RUN = frozenset({"torch", "reference"})

DTYPES: tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# Training steps per stateful test: enough for running statistics to mix several batches
# (and for momentum=None's cumulative average to differ from a plain exponential one).
STEPS = 3



def run_or_skip(backend: str, fn: Callable[[], Any]) -> Any:
    """``fn()``; a BackendError from an optional backend (one that declines CPU calls, e.g.
    triton) skips the test, from the built-in ones it fails."""
    try:
        return fn()
    except BackendError as e:
        if backend in MUST_RUN:
            raise
        pytest.skip(f"backend {backend!r} declines this call: {e}")


def skip_if_declined(test: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a test taking a ``backend`` argument with :func:`run_or_skip`."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> Any:
        return run_or_skip(kwargs.get("backend"), lambda: test(*args, **kwargs))

    return run


class _Reference:
    """The reference of every op as one namespace (``REFERENCE.layer_norm``, ``REFERENCE.dyt``):
    :mod:`normkit.reference`'s functions, and for the rows of the table of norms whose reference
    lives in :mod:`normkit.blocks` the row's ``reference_op``."""

    def __getattr__(self, op: str) -> Any:
        return NORMS[op].reference_op if op in NORMS else getattr(normkit.reference, op)


REFERENCE = _Reference()


# ---- tolerances --------------------------------------------------------------------------------
# One table for the library, check and the tests: normkit.testing (TOLERANCES, the self-calibrating
# bound, assert_close_to_reference), re-exported here under the names the tests import.


def torch_rms_eps(dtype: torch.dtype) -> float:
    """torch's RMSNorm ``eps=None`` for input of ``dtype``: the machine epsilon of ATen's opmath
    type (float32 for fp16/bf16), not of the input's dtype as torch's docs say. A float64
    reference of a low-precision call must use this eps, not float64's."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


# ---- inputs and parameters ---------------------------------------------------------------------

# Memory layouts of an input of logical shape ``shape``:
#   contiguous        plain row-major
#   channels_last     4-D NHWC strides (torch.channels_last)
#   channels_last_3d  5-D NDHWC strides (torch.channels_last_3d)
#   transposed        the last two dims swapped in memory: x = buffer.transpose(-1, -2)
#   sliced            every other element of the last dim: x = buffer[..., ::2]
LAYOUTS = ("contiguous", "channels_last", "channels_last_3d", "transposed", "sliced")


def seed_of(*parts: object) -> int:
    """A seed that depends only on ``parts`` (a test is reproducible alone and in any order)."""
    return zlib.crc32(repr(parts).encode())


def make_input(
    shape: Iterable[int],
    dtype: torch.dtype,
    seed: int,
    layout: str = "contiguous",
    *,
    scale: float = 1.0,
    requires_grad: bool = True,
) -> Tensor:
    """Random input, ``(randn * 1.5 + 0.5) * scale`` (off-centre, so a missing mean subtraction
    shows), drawn in float64 and rounded once to ``dtype``, laid out in memory as ``layout``."""
    shape = tuple(shape)
    gen = torch.Generator().manual_seed(seed)
    if layout == "transposed":
        storage = shape[:-2] + (shape[-1], shape[-2])
    elif layout == "sliced":
        storage = shape[:-1] + (2 * shape[-1],)
    else:
        storage = shape
    x = ((torch.randn(storage, generator=gen, dtype=torch.float64) * 1.5 + 0.5) * scale).to(dtype)
    if layout == "transposed":
        x = x.transpose(-1, -2)
    elif layout == "sliced":
        x = x[..., ::2]
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif layout != "contiguous":
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    assert tuple(x.shape) == shape
    if layout != "contiguous" and x.numel() > 1:
        assert not x.is_contiguous(), f"layout {layout!r} of {shape} should not be contiguous"
    return x.requires_grad_(requires_grad)


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Random parameters and statistics, never the 1/0 init (with unit weight and ``y.sum()`` the
    input gradient of a norm is identically zero and a test asserts nothing).

    weight ~ N(0, 1) (both signs), bias ~ N(0, 1), running_mean ~ N(0, 0.25), running_var ~
    U(0.5, 1.5), num_batches_tracked = 2 (so momentum=None's ``1 / (n + 1)`` is not 1).
    """
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    for name, b in module.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(torch.randn(b.shape, generator=gen, dtype=torch.float64) * 0.5)
        elif name.endswith("running_var"):
            b.copy_(torch.rand(b.shape, generator=gen, dtype=torch.float64) + 0.5)
        elif name.endswith("num_batches_tracked"):
            b.fill_(2)
    return module


# ---- the table of module cases -----------------------------------------------------------------


@dataclass(frozen=True)
class NormCase:
    """One module configuration and one input: ``getattr(lib, module)(*args, **kwargs)`` applied to
    an input of ``shape`` laid out as ``layout``, for ``lib`` torch.nn or normkit."""

    module: str
    args: tuple[Any, ...]
    shape: tuple[int, ...]
    kwargs: tuple[tuple[str, Any], ...] = ()
    layout: str = "contiguous"
    note: str = ""
    scale: float = 1.0  # of the input: 0.01 makes the variance comparable to eps

    @property
    def id(self) -> str:
        parts = [self.module + "(" + ",".join(map(str, self.args)).replace(" ", "") + ")",
                 "x".join(map(str, self.shape)) or "scalar"]
        if self.layout != "contiguous":
            parts.append(self.layout)
        if self.scale != 1.0:
            parts.append(f"scale={self.scale:g}")
        parts += [f"{k}={v}" for k, v in self.kwargs]
        if self.note:
            parts.append(self.note)
        return "-".join(parts)

    @property
    def op(self) -> str:
        """The functional op (and row of ``normkit.norms.NORMS``, where it has one)."""
        return op_of(self.module)

    @property
    def stateful(self) -> bool:
        """Whether the module keeps running statistics (then training steps differ from eval)."""
        return dict(self.kwargs).get("track_running_stats", self.module.removeprefix("Sync").startswith("BatchNorm"))

    def build(self, lib: ModuleType, **extra: Any) -> nn.Module:
        """The module from ``lib`` (``torch.nn`` or ``normkit``); ``extra`` adds keywords (``backend``)."""
        return getattr(lib, self.module)(*self.args, **dict(self.kwargs), **extra)

    def input(self, dtype: torch.dtype, seed: int, **kw: Any) -> Tensor:
        return make_input(self.shape, dtype, seed, self.layout, scale=self.scale, **kw)


def op_of(module: str) -> str:
    base = module.removeprefix("Lazy").removeprefix("FusedAdd").removeprefix("Sync")
    for spec in NORMS.values():
        if base.startswith(spec.module):
            return spec.name
    if base == "LocalResponseNorm":
        return "local_response_norm"
    raise KeyError(f"no norm in normkit.norms.NORMS for module {module!r}")


def _c(module: str, args: tuple[Any, ...], shape: tuple[int, ...], layout: str = "contiguous",
       note: str = "", scale: float = 1.0, **kwargs: Any) -> NormCase:
    return NormCase(module, args, shape, tuple(kwargs.items()), layout, note, scale)


# A local response norm with the default alpha=1e-4 is the identity to 4 decimals: a wrong window
# would pass any tolerance. alpha=1 makes the window matter.
_LRN_STRONG = {"alpha": 1.0, "beta": 0.75, "k": 1.0}

NORM_CASES: tuple[NormCase, ...] = (
    # BatchNorm1d: (N, C) and (N, C, L); (1, C) is illegal in training (one value per channel).
    _c("BatchNorm1d", (3,), (7, 3), note="primes"),
    _c("BatchNorm1d", (5,), (1, 5, 7), note="batch1"),
    _c("BatchNorm1d", (5,), (4, 5, 11), "transposed"),
    _c("BatchNorm1d", (3,), (6, 3), affine=False),
    _c("BatchNorm1d", (3,), (5, 3, 4), momentum=None),
    _c("BatchNorm1d", (3,), (4, 3, 5), track_running_stats=False),
    _c("BatchNorm1d", (3,), (4, 3), bias=False),
    _c("BatchNorm1d", (3,), (0, 3, 5), note="empty"),
    # SyncBatchNorm outside a process group: BatchNorm (tests/test_syncbn.py runs it distributed).
    _c("SyncBatchNorm", (3,), (7, 3), note="primes"),
    _c("SyncBatchNorm", (3,), (2, 3, 4, 5), "channels_last", momentum=None),
    _c("SyncBatchNorm", (3,), (0, 3, 4), note="empty"),
    # BatchNorm2d
    _c("BatchNorm2d", (3,), (1, 3, 5, 7), note="batch1"),
    _c("BatchNorm2d", (5,), (2, 5, 7, 3), note="primes"),
    _c("BatchNorm2d", (3,), (2, 3, 5, 7), "channels_last"),
    _c("BatchNorm2d", (3,), (2, 3, 6, 5), "transposed"),
    _c("BatchNorm2d", (4,), (3, 4, 3, 5), "sliced"),
    _c("BatchNorm2d", (3,), (2, 3, 4, 5), momentum=None),
    _c("BatchNorm2d", (3,), (2, 3, 4, 5), affine=False),
    _c("BatchNorm2d", (3,), (2, 3, 4, 5), track_running_stats=False),
    _c("BatchNorm2d", (3,), (2, 3, 4, 5), bias=False),
    _c("BatchNorm2d", (3,), (2, 3, 4, 5), eps=1e-3, momentum=0.3),
    _c("BatchNorm2d", (3,), (0, 3, 4, 4), note="empty"),
    _c("BatchNorm2d", (3,), (2, 3, 4, 5), scale=0.01),
    # BatchNorm3d
    _c("BatchNorm3d", (2,), (1, 2, 3, 5, 7), note="batch1"),
    _c("BatchNorm3d", (3,), (2, 3, 3, 4, 5), "channels_last_3d"),
    _c("BatchNorm3d", (3,), (2, 3, 2, 3, 5), momentum=None),
    _c("BatchNorm3d", (2,), (0, 2, 3, 3, 3), note="empty"),
    # InstanceNorm1d: torch's defaults are affine=False, track_running_stats=False.
    _c("InstanceNorm1d", (3,), (2, 3, 7)),
    _c("InstanceNorm1d", (3,), (3, 7), note="unbatched"),
    _c("InstanceNorm1d", (3,), (1, 3, 11), note="batch1", affine=True, track_running_stats=True),
    _c("InstanceNorm1d", (5,), (3, 5, 7), "transposed", affine=True),
    _c("InstanceNorm1d", (3,), (2, 3, 5), track_running_stats=True, momentum=None),
    _c("InstanceNorm1d", (3,), (0, 3, 5), note="empty"),
    # InstanceNorm2d
    _c("InstanceNorm2d", (3,), (2, 3, 5, 7), affine=True, track_running_stats=True),
    _c("InstanceNorm2d", (3,), (3, 5, 7), note="unbatched", affine=True, track_running_stats=True),
    _c("InstanceNorm2d", (3,), (2, 3, 5, 7), "channels_last", affine=True),
    _c("InstanceNorm2d", (3,), (1, 3, 4, 5), note="batch1"),
    _c("InstanceNorm2d", (3,), (2, 3, 4, 5), affine=True, bias=False),
    # InstanceNorm3d
    _c("InstanceNorm3d", (3,), (2, 3, 3, 4, 5), "channels_last_3d", affine=True, track_running_stats=True),
    _c("InstanceNorm3d", (2,), (2, 3, 4, 5), note="unbatched", affine=True),
    _c("InstanceNorm3d", (2,), (1, 2, 3, 3, 3), note="batch1"),
    # GroupNorm(num_groups, num_channels)
    _c("GroupNorm", (3, 6), (2, 6, 5, 7)),
    _c("GroupNorm", (2, 6), (1, 6, 5), note="batch1"),
    _c("GroupNorm", (1, 7), (3, 7, 11), note="primes"),
    _c("GroupNorm", (7, 7), (2, 7, 3), note="group_per_channel"),
    # (N, C) input; 3 channels per group: with 2 the input gradient is ~0 up to an eps-driven,
    # ill-conditioned remainder where float32 implementations differ by 1e-4 relative.
    _c("GroupNorm", (2, 6), (3, 6), note="2d_input"),
    _c("GroupNorm", (2, 6), (2, 6, 4, 5), "channels_last"),
    _c("GroupNorm", (3, 6), (2, 6, 3, 4, 5), "channels_last_3d"),
    _c("GroupNorm", (2, 6), (2, 6, 5, 4), "transposed"),
    _c("GroupNorm", (2, 6), (2, 6, 3, 3), affine=False),
    _c("GroupNorm", (2, 6), (2, 6, 3, 3), bias=False),
    _c("GroupNorm", (2, 4), (0, 4, 3, 3), note="empty"),
    _c("GroupNorm", (3, 6), (2, 6, 5), scale=0.01),
    # LayerNorm(normalized_shape)
    _c("LayerNorm", (7,), (3, 7)),
    _c("LayerNorm", ((5, 7),), (2, 3, 5, 7)),
    _c("LayerNorm", (13,), (13,), note="1d_input"),
    _c("LayerNorm", (4099,), (2, 4099), note="wide"),
    _c("LayerNorm", (5,), (3, 5), "transposed"),
    _c("LayerNorm", (6,), (3, 4, 6), "sliced"),
    _c("LayerNorm", ((4, 5),), (2, 3, 4, 5), "channels_last"),
    _c("LayerNorm", (17,), (1, 1, 17), note="batch1"),
    _c("LayerNorm", (7,), (3, 7), elementwise_affine=False),
    _c("LayerNorm", (7,), (3, 7), bias=False),
    _c("LayerNorm", (11,), (4, 11), eps=1e-3),
    _c("LayerNorm", (7,), (0, 7), note="empty"),
    _c("LayerNorm", (7,), (3, 7), scale=0.01),
    # RMSNorm(normalized_shape); eps=None means finfo(input.dtype).eps
    _c("RMSNorm", (7,), (3, 7)),
    _c("RMSNorm", ((5, 7),), (2, 3, 5, 7)),
    _c("RMSNorm", (13,), (13,), note="1d_input"),
    _c("RMSNorm", (4099,), (2, 4099), note="wide"),
    _c("RMSNorm", (5,), (3, 5), "transposed"),
    _c("RMSNorm", (6,), (3, 4, 6), "sliced"),
    _c("RMSNorm", (17,), (1, 1, 17), note="batch1"),
    _c("RMSNorm", (7,), (3, 7), elementwise_affine=False),
    _c("RMSNorm", (7,), (3, 7), eps=1e-6),
    _c("RMSNorm", (7,), (0, 7), note="empty"),
    # eps=None on an input whose mean square (~1e-4) is far above fp32's eps and far below
    # bf16's: tells torch's actual default (float32 eps for bf16 input) from its documented one
    _c("RMSNorm", (7,), (3, 7), scale=0.01),
    _c("RMSNorm", (4099,), (2, 4099), scale=0.01),
    # LocalResponseNorm(size): window sizes 1, 2, 3, 5 (even sizes window asymmetrically)
    *(
        _c("LocalResponseNorm", (size,), shape, **_LRN_STRONG)
        for size in (1, 2, 3, 5)
        for shape in ((2, 6, 7), (2, 6, 4, 5), (1, 6, 3, 4, 5))
    ),
    _c("LocalResponseNorm", (3,), (2, 7, 4, 5), "transposed", **_LRN_STRONG),
    _c("LocalResponseNorm", (2,), (2, 5, 4, 6)),
    _c("LocalResponseNorm", (3,), (0, 6, 4, 4), note="empty", **_LRN_STRONG),
)


# ---- lazy modules ------------------------------------------------------------------------------


LAZY_CASES: tuple[NormCase, ...] = (
    _c("LazyBatchNorm1d", (), (4, 3, 5)),
    _c("LazyBatchNorm2d", (), (2, 3, 4, 5), "channels_last"),
    _c("LazyBatchNorm3d", (), (2, 3, 2, 3, 4)),
    _c("LazyBatchNorm2d", (), (2, 3, 4, 5), momentum=None),
    # torch's LazyInstanceNorm defaults are affine=True, track_running_stats=True (unlike InstanceNorm's)
    _c("LazyInstanceNorm1d", (), (2, 3, 7)),
    _c("LazyInstanceNorm2d", (), (2, 3, 4, 5)),
    _c("LazyInstanceNorm3d", (), (2, 3, 2, 3, 4)),
    # (torch's lazy instance norms read num_features from dim 1 even for unbatched input, so an
    # unbatched first call raises after materializing; normkit raises the same error without
    # materializing: tests/test_stricter.py.)
    # no parameters to materialize: num_features stays 0 and torch warns at every call
    _c("LazyInstanceNorm1d", (), (2, 3, 7), affine=False, track_running_stats=False),
)


# ---- residual-add norms ------------------------------------------------------------------------


@dataclass(frozen=True)
class FusedAddCase:
    """``add_layer_norm``/``add_rms_norm`` (and FusedAddLayerNorm/FusedAddRMSNorm) on ``x`` of
    ``shape`` with a residual (or ``None``) and ``residual_dtype``."""

    op: str  # "add_layer_norm" | "add_rms_norm"
    normalized_shape: tuple[int, ...]
    shape: tuple[int, ...]
    residual: bool = True
    residual_dtype: torch.dtype | None = torch.float32
    affine: bool = True
    layout: str = "contiguous"
    scale: float = 1.0  # of x and residual

    @property
    def id(self) -> str:
        parts = [self.op, "x".join(map(str, self.shape)),
                 f"res_dtype={str(self.residual_dtype).removeprefix('torch.')}"]
        if not self.residual:
            parts.append("no_residual")
        if not self.affine:
            parts.append("no_affine")
        if self.layout != "contiguous":
            parts.append(self.layout)
        if self.scale != 1.0:
            parts.append(f"scale={self.scale:g}")
        return "-".join(parts)

    @property
    def module(self) -> str:
        return "FusedAddLayerNorm" if self.op == "add_layer_norm" else "FusedAddRMSNorm"


FUSED_ADD_CASES: tuple[FusedAddCase, ...] = tuple(
    FusedAddCase(op, ns, shape, residual, rdt, affine, layout, scale)
    for op in ("add_layer_norm", "add_rms_norm")
    for ns, shape, residual, rdt, affine, layout, scale in (
        ((7,), (3, 7), True, torch.float32, True, "contiguous", 1.0),
        ((7,), (3, 7), True, None, True, "contiguous", 1.0),
        ((7,), (3, 7), False, torch.float32, True, "contiguous", 1.0),
        ((4099,), (2, 4099), True, torch.float32, True, "contiguous", 1.0),
        ((5, 6), (2, 5, 6), True, torch.float32, False, "transposed", 1.0),
        ((17,), (1, 1, 17), True, None, True, "sliced", 1.0),
        # eps comparable to the variance: eps=None must be the one of the normalized stream
        ((7,), (3, 7), True, torch.float32, True, "contiguous", 0.01),
    )
)


# ---- functional calls --------------------------------------------------------------------------


@dataclass(frozen=True)
class FunctionalCase:
    """One ``torch.nn.functional``-style call: ``op`` on an input of ``shape``; ``kwargs`` say
    which optional tensors to pass (``weight``, ``bias``, ``stats`` for running statistics) and
    the remaining arguments (``training``, ``use_input_stats``, ``momentum``, ``eps``,
    ``normalized_shape``, ``num_groups``, ``size``, ``alpha``, ``beta``, ``k``)."""

    op: str
    shape: tuple[int, ...]
    kwargs: tuple[tuple[str, Any], ...] = ()
    layout: str = "contiguous"

    @property
    def id(self) -> str:
        parts = [self.op, "x".join(map(str, self.shape))]
        if self.layout != "contiguous":
            parts.append(self.layout)
        parts += [f"{k}={v}" for k, v in self.kwargs]
        return "-".join(parts)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.kwargs)


def _f(op: str, shape: tuple[int, ...], layout: str = "contiguous", **kwargs: Any) -> FunctionalCase:
    return FunctionalCase(op, shape, tuple(kwargs.items()), layout)


FUNCTIONAL_CASES: tuple[FunctionalCase, ...] = (
    _f("batch_norm", (5, 3), training=True, stats=True, weight=True, bias=True),
    _f("batch_norm", (2, 3, 4, 5), "channels_last", training=True, stats=False, weight=True, bias=True),
    _f("batch_norm", (2, 3, 4, 5), training=False, stats=True, weight=True, bias=False),
    _f("batch_norm", (2, 3, 2, 3, 4), training=False, stats=True, weight=False, bias=True, eps=1e-3),
    _f("batch_norm", (3, 4, 5), "transposed", training=True, stats=True, weight=False, bias=False, momentum=0.5),
    _f("instance_norm", (2, 3, 7), use_input_stats=True, stats=False, weight=True, bias=True),
    _f("instance_norm", (2, 3, 4, 5), use_input_stats=True, stats=True, weight=True, bias=True),
    _f("instance_norm", (2, 3, 4, 5), "channels_last", use_input_stats=False, stats=True, weight=True, bias=True),
    _f("instance_norm", (1, 2, 3, 3, 3), use_input_stats=True, stats=False, weight=False, bias=False),
    _f("layer_norm", (3, 7), normalized_shape=(7,), weight=True, bias=True),
    _f("layer_norm", (2, 3, 5), normalized_shape=(3, 5), weight=True, bias=False),
    _f("layer_norm", (2, 4099), normalized_shape=(4099,), weight=True, bias=True),
    _f("layer_norm", (4, 6), "sliced", normalized_shape=(6,), weight=False, bias=False, eps=1e-3),
    _f("rms_norm", (3, 7), normalized_shape=(7,), weight=True),
    _f("rms_norm", (2, 3, 5), "transposed", normalized_shape=(3, 5), weight=True, eps=1e-6),
    _f("rms_norm", (2, 4099), normalized_shape=(4099,), weight=False),
    _f("group_norm", (2, 6, 5), num_groups=3, weight=True, bias=True),
    _f("group_norm", (2, 6, 4, 5), "channels_last", num_groups=2, weight=True, bias=False),
    _f("group_norm", (1, 4, 3), num_groups=1, weight=False, bias=False, eps=1e-3),
    # norm + activation: the norm's arguments, then act (one pass on the triton backend)
    _f("batch_norm_act", (2, 3, 4, 5), training=True, stats=True, weight=True, bias=True, act="silu"),
    _f("batch_norm_act", (2, 3, 4, 5), "channels_last", training=False, stats=True, weight=True, bias=True,
       act="gelu"),
    _f("batch_norm_act", (5, 3), training=True, stats=False, weight=False, bias=True, act="relu"),
    _f("group_norm_act", (2, 6, 5), num_groups=3, weight=True, bias=True, act="silu"),
    _f("group_norm_act", (2, 6, 4, 5), "channels_last", num_groups=2, weight=True, bias=False, act="gelu"),
    _f("group_norm_act", (1, 4, 3), num_groups=1, weight=False, bias=False, act="relu"),
    *(
        _f("local_response_norm", shape, size=size, **_LRN_STRONG)
        for size in (1, 2, 3, 5)
        for shape in ((2, 6, 7), (2, 6, 4, 5), (1, 6, 3, 4, 5))
    ),
    _f("local_response_norm", (2, 5, 4, 6), size=3),  # torch's default alpha, beta, k
    _f("local_response_norm", (2, 5, 6), size=4, alpha=0.5, beta=0.5, k=2.0),
)


# Every public module class -> one representative (constructor args, keywords, input shape), for
# the tests that walk every class (tooling, fx, TorchScript); small inputs, few rows for the interpreter.
MODULE_ROWS: dict[str, tuple[tuple[Any, ...], dict[str, Any], tuple[int, ...]]] = {
    "BatchNorm1d": ((3,), {}, (4, 3, 2)),
    "BatchNorm2d": ((3,), {"momentum": None}, (2, 3, 2, 3)),
    "BatchNorm3d": ((3,), {}, (2, 3, 2, 1, 2)),
    "LazyBatchNorm1d": ((), {}, (4, 3, 2)),
    "LazyBatchNorm2d": ((), {}, (2, 3, 2, 3)),
    "LazyBatchNorm3d": ((), {}, (2, 3, 2, 1, 2)),
    "SyncBatchNorm": ((3,), {}, (2, 3, 2, 3)),
    "InstanceNorm1d": ((3,), {"affine": True, "track_running_stats": True}, (2, 3, 5)),
    "InstanceNorm2d": ((3,), {"affine": True}, (2, 3, 2, 3)),
    "InstanceNorm3d": ((3,), {"track_running_stats": True}, (2, 3, 2, 1, 2)),
    "LazyInstanceNorm1d": ((), {}, (2, 3, 5)),
    "LazyInstanceNorm2d": ((), {}, (2, 3, 2, 3)),
    "LazyInstanceNorm3d": ((), {}, (2, 3, 2, 1, 2)),
    "GroupNorm": ((2, 4), {}, (2, 4, 3)),
    "GroupNormAct": ((2, 4), {}, (2, 4, 3)),
    "BatchNormAct2d": ((3,), {"act": "silu"}, (2, 3, 2, 3)),
    "LayerNorm": ((5,), {}, (2, 3, 5)),
    "RMSNorm": ((5,), {"weight_offset": 1.0}, (2, 3, 5)),
    # the fused multi-tensor blocks (not rows of the table): (x, x.flip(0)) -> two results
    "QKRMSNorm": ((5,), {"weight_offset": 1.0}, (2, 3, 4, 5)),
    "SandwichRMSNorm": ((5,), {}, (2, 3, 5)),
    "LayerNorm2d": ((3,), {}, (2, 3, 2, 2)),
    "RMSNorm2d": ((3,), {}, (2, 3, 2, 2)),
    "LocalResponseNorm": ((3,), {"alpha": 1.0}, (2, 5, 3)),
    "FusedAddLayerNorm": ((5,), {}, (2, 3, 5)),
    "FusedAddRMSNorm": ((5,), {"residual_dtype": torch.float32}, (2, 3, 5)),
    "FrozenBatchNorm1d": ((3,), {}, (4, 3, 2)),
    "FrozenBatchNorm2d": ((3,), {}, (2, 3, 2, 3)),
    "FrozenBatchNorm3d": ((3,), {}, (2, 3, 2, 1, 2)),
    "GhostBatchNorm1d": ((3, 2), {}, (4, 3, 2)),
    "GhostBatchNorm2d": ((3, 2), {}, (4, 3, 2, 2)),
    "BatchRenorm1d": ((3,), {"r_max": 1.5, "d_max": 0.5}, (4, 3, 2)),
    "BatchRenorm2d": ((3,), {"r_max": 1.5, "d_max": 0.5}, (2, 3, 2, 3)),
    "BatchRenorm3d": ((3,), {"r_max": 1.5, "d_max": 0.5}, (2, 3, 2, 1, 2)),
}
# Every row of the table of norms has one through its own example (a new norm needs no row here).
MODULE_ROWS.update({
    ex.module: (ex.module_args, ex.module_kwargs, ex.shape)
    for ex in (spec.example() for spec in NORMS.values()) if ex.module not in MODULE_ROWS
})
MODULE_CLASSES = sorted(n for n in normkit.modules.__all__ if isinstance(getattr(normkit.modules, n), type))


# The modules taking a second tensor of the input's shape and returning two results.
_PAIRED = frozenset({"FusedAddLayerNorm", "FusedAddRMSNorm", "QKRMSNorm", "SandwichRMSNorm"})
_ROW_OF_MODULE = {spec.module: spec for spec in NORMS.values()}


def _derived(x: Tensor, rule: str, i: int) -> Tensor:
    """Per-call tensor ``i`` of shape rule ``rule`` made from ``x``, differentiable and traceable
    by fx (no shape is read): per sample, the first position of each sample (``x[:, :1]``);
    else ``x`` itself, reversed along the last dim and scaled so that the tensors differ."""
    t = x[:, :1] if rule == "per_sample" else x
    return t.flip(-1) * (0.5 - 0.25 * i)


def module_call(name: str) -> Callable[[nn.Module, Tensor], Tensor]:
    """How a model calls module class ``name`` on one input ``x``, as one tensor: the fused-add,
    QK and sandwich norms get ``x.flip(0)`` as their second tensor and return the product of
    their two results; a norm of the table with per-call tensors (shift/scale, gate) gets them
    made from ``x`` by their rows' shape rules."""
    if name in _PAIRED:
        return lambda norm, x: (lambda out: out[0] * out[1])(norm(x, x.flip(0)))
    extras = _ROW_OF_MODULE[name].inputs if name in _ROW_OF_MODULE else ()
    if not extras:
        return lambda norm, x: norm(x)
    return lambda norm, x: norm(x, *(_derived(x, e.shape, i) for i, e in enumerate(extras)))


class Host(nn.Module):
    """A model holding a norm as a submodule, as users hold and trace it (called by
    :func:`module_call`: the fused-add norms get a residual and return ``y * residual_out``)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        return module_call(type(self.norm).__name__)(self.norm, x) * 2.0
