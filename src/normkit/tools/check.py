"""The parity check behind ``normkit check``: every module of normkit, on every backend
available here, against its oracle, over shapes and dtypes. The cases are every row of the table
of norms (:data:`normkit.norms.NORMS`, its own example), then the variants and modules the rows
do not generate.

For each (case, backend, dtype) the oracle and normkit's module start from the same random
parameters and buffers. Three training steps (random input, random upstream gradient) compare
the output and the input/parameter gradients; then the running statistics; then an eval-mode
forward. The oracle is torch's twin module run in float64 where torch has one, else normkit's
own reference backend run in float64 (FrozenBatchNorm, GhostBatchNorm, BatchRenorm, the Act
layers, LayerNorm2d/RMSNorm2d, masked statistics, the norms of today's blocks). Each error must stay within
:func:`normkit.testing.bound`: ``2 * (the baseline's error in that dtype) + atol * max(1,
|oracle|)``, the baseline being torch run in the dtype under test (the twin, or normkit's module on
the torch backend): normkit may be as inexact as torch, twice over, never more.

A (case, backend, dtype) that cannot run here is not left out silently: it becomes a skipped
row with its reason (Triton without a GPU, an op a backend does not have). ``compile=True``
adds, per case and backend, the module under ``torch.compile`` against the same module eager
(outputs, gradients and buffers): Inductor has shipped wrong norm graphs before.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import modules as nkm
from ..backends import BackendError, backends, get_backend
from ..norms import NORMS, Extra, NormSpec
from ..testing import TOLERANCES, bound

__all__ = ["CASES", "DTYPES", "CheckCase", "CheckResult", "run_check", "select_cases"]

DTYPES: tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class CheckCase:
    """One module configuration. ``torch_module`` builds its torch twin, or is None: the oracle is
    then ``normkit_module("reference")`` in float64. ``extra`` inputs: ``"residual"`` (a second
    tensor of the input's shape: the fused add norms' ``forward(x, residual) -> (y,
    residual_out)``, QK-norm's ``forward(q, k)``, the sandwich norm's ``forward(hidden,
    residual)``) or ``"mask"`` (``forward(x, mask)``, mask ``(N, L)``, True = real token).
    ``inputs``: the per-call tensors of a row of the table (adaLN's shift and scale, the gate),
    random and differentiable, shaped by their rows' rules."""

    name: str
    op: str  # the functional op the backend must provide
    normkit_module: Callable[[str], nn.Module]
    shapes: tuple[tuple[int, ...], ...]  # batch of 1, odd and prime sizes, one wide row
    torch_module: Callable[[], nn.Module] | None = None
    extra: str | None = None
    inputs: tuple[Extra, ...] = ()

    @property
    def oracle(self) -> str:
        return "torch f64" if self.torch_module is not None else "reference f64"


def _case(name: str, op: str, nk_cls: type, shapes: tuple[tuple[int, ...], ...], *args: Any,
          torch_cls: type | None = None, extra: str | None = None, inputs: tuple[Extra, ...] = (),
          **kwargs: Any) -> CheckCase:
    twin = None if torch_cls is None else (lambda: torch_cls(*args, **kwargs))
    return CheckCase(name, op, lambda b: nk_cls(*args, **kwargs, backend=b), shapes, twin, extra, inputs)


def _twin(name: str, op: str, cls_name: str, shapes: tuple[tuple[int, ...], ...], *args: Any,
          **kwargs: Any) -> CheckCase:
    """A case whose torch twin is ``torch.nn.<cls_name>`` with the same arguments."""
    return _case(name, op, getattr(nkm, cls_name), shapes, *args, torch_cls=getattr(nn, cls_name), **kwargs)


def _unfused_add(norm_cls: type[nn.Module]) -> type[nn.Module]:
    """torch's ``norm_cls`` taking ``(x, residual)``: the unfused oracle of the fused-add modules."""

    class UnfusedAdd(norm_cls):  # type: ignore[valid-type, misc]
        def forward(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
            residual_out = x + residual
            return super().forward(residual_out), residual_out

    return UnfusedAdd


def _table_case(spec: NormSpec) -> CheckCase:
    """A row of :data:`normkit.norms.NORMS` as a case: its own example (module, arguments, input
    size) against its torch twin, or against the reference in float64 where it has none."""
    ex = spec.example()
    shown = [*map(repr, ex.module_args), *(f"{k}={v!r}" for k, v in ex.module_kwargs.items())]
    return _case(f"{ex.module}({', '.join(shown)})", spec.name, getattr(nkm, ex.module), (ex.sizes.shape,),
                 *ex.module_args, torch_cls=getattr(nn, ex.module) if spec.twin is not None else None,
                 inputs=spec.inputs, **ex.module_kwargs)


_BN_SHAPES = ((4, 3, 5, 7), (1, 3, 2, 3))
# Every row of the table of norms, then what the rows do not generate: the other ranks, batches
# of 1, odd and wide shapes, Lazy classes, option variants, and the modules beyond the table.
CASES: tuple[CheckCase, ...] = (
    *(_table_case(spec) for spec in NORMS.values()),
    _twin("BatchNorm1d", "batch_norm", "BatchNorm1d", ((6, 5, 7), (13, 5)), 5),
    _twin("BatchNorm2d", "batch_norm", "BatchNorm2d", _BN_SHAPES, 3),
    _twin("BatchNorm3d", "batch_norm", "BatchNorm3d", ((2, 3, 3, 4, 5),), 3),
    _twin("BatchNorm2d(momentum=None)", "batch_norm", "BatchNorm2d", ((3, 4, 5, 5),), 4, momentum=None),
    _twin("LazyBatchNorm1d", "batch_norm", "LazyBatchNorm1d", ((6, 5, 7),)),
    _twin("LazyBatchNorm2d", "batch_norm", "LazyBatchNorm2d", ((3, 5, 4, 3),)),
    _twin("LazyBatchNorm3d", "batch_norm", "LazyBatchNorm3d", ((2, 3, 3, 2, 3),)),
    _twin("SyncBatchNorm (one process)", "batch_norm", "SyncBatchNorm", _BN_SHAPES, 3),
    _twin("InstanceNorm1d", "instance_norm", "InstanceNorm1d", ((3, 4, 9), (4, 11)), 4, affine=True,
          track_running_stats=True),
    _twin("InstanceNorm2d", "instance_norm", "InstanceNorm2d", ((2, 5, 6, 7), (1, 5, 3, 3)), 5, affine=True,
          track_running_stats=True),
    _twin("InstanceNorm2d (torch's defaults)", "instance_norm", "InstanceNorm2d", ((2, 5, 6, 7),), 5),
    _twin("InstanceNorm3d", "instance_norm", "InstanceNorm3d", ((2, 3, 3, 4, 5),), 3),
    _twin("LazyInstanceNorm1d", "instance_norm", "LazyInstanceNorm1d", ((3, 4, 9),)),
    _twin("LazyInstanceNorm2d", "instance_norm", "LazyInstanceNorm2d", ((2, 3, 5, 5),)),
    _twin("LazyInstanceNorm3d", "instance_norm", "LazyInstanceNorm3d", ((2, 3, 3, 2, 3),)),
    _twin("LayerNorm", "layer_norm", "LayerNorm", ((4, 7, 33), (1, 33), (33,)), 33),
    _twin("LayerNorm(4100)", "layer_norm", "LayerNorm", ((3, 4100),), 4100),
    _twin("LayerNorm([C,H,W])", "layer_norm", "LayerNorm", ((2, 3, 5, 5),), [3, 5, 5]),
    _twin("GroupNorm", "group_norm", "GroupNorm", ((3, 6, 5, 7), (1, 6, 13)), 3, 6),
    _twin("RMSNorm", "rms_norm", "RMSNorm", ((4, 7, 33), (1, 33)), 33),
    _twin("RMSNorm(4100)", "rms_norm", "RMSNorm", ((3, 4100),), 4100),
    _twin("LocalResponseNorm", "local_response_norm", "LocalResponseNorm", ((2, 7, 4, 5), (3, 6, 11)), 3),
    CheckCase("FusedAddLayerNorm", "add_layer_norm", lambda b: nkm.FusedAddLayerNorm(48, backend=b),
              ((5, 48), (1, 3, 48)), lambda: _unfused_add(nn.LayerNorm)(48), extra="residual"),
    CheckCase("FusedAddRMSNorm", "add_rms_norm", lambda b: nkm.FusedAddRMSNorm(48, backend=b),
              ((5, 48), (1, 3, 48)), lambda: _unfused_add(nn.RMSNorm)(48), extra="residual"),
    # Beyond torch.nn: the float64 reference is the oracle.
    _case("LayerNorm2d", "normalize", nkm.LayerNorm2d, ((2, 6, 5, 7), (1, 6, 3, 3)), 6),
    _case("RMSNorm2d", "normalize", nkm.RMSNorm2d, ((2, 6, 5, 7),), 6),
    _case("FrozenBatchNorm1d", "batch_norm", nkm.FrozenBatchNorm1d, ((6, 5, 7),), 5),
    _case("FrozenBatchNorm2d", "batch_norm", nkm.FrozenBatchNorm2d, _BN_SHAPES, 3),
    _case("FrozenBatchNorm3d", "batch_norm", nkm.FrozenBatchNorm3d, ((2, 3, 3, 4, 5),), 3),
    _case("GhostBatchNorm1d", "batch_norm", nkm.GhostBatchNorm1d, ((6, 5, 7), (8, 5)), 5, 3),
    _case("GhostBatchNorm2d", "batch_norm", nkm.GhostBatchNorm2d, ((6, 3, 4, 5),), 3, 2),
    _case("BatchRenorm1d", "batch_norm", nkm.BatchRenorm1d, ((6, 5, 7),), 5, r_max=1.5, d_max=0.5),
    _case("BatchRenorm2d", "batch_norm", nkm.BatchRenorm2d, _BN_SHAPES, 3, r_max=1.5, d_max=0.5),
    _case("BatchRenorm3d", "batch_norm", nkm.BatchRenorm3d, ((2, 3, 3, 4, 5),), 3, warmup_steps=2),
    _case("BatchNormAct2d(relu)", "batch_norm_act", nkm.BatchNormAct2d, _BN_SHAPES, 3, act="relu"),
    _case("BatchNormAct2d(gelu)", "batch_norm_act", nkm.BatchNormAct2d, ((3, 4, 5, 5),), 4, act="gelu"),
    _case("GroupNormAct(silu)", "group_norm_act", nkm.GroupNormAct, ((3, 6, 5, 7),), 3, 6, act="silu"),
    _case("BatchNorm1d(x, mask)", "batch_norm", nkm.BatchNorm1d, ((4, 5, 9),), 5, extra="mask"),
    _case("InstanceNorm1d(x, mask)", "instance_norm", nkm.InstanceNorm1d, ((4, 5, 9),), 5, affine=True,
          track_running_stats=True, extra="mask"),
    # The fused multi-tensor blocks (the table's rows are above): (q, k) and (hidden, residual).
    _case("QKRMSNorm(32, weight_offset=1.0)", "qk_rms_norm", nkm.QKRMSNorm, ((2, 3, 4, 32),), 32,
          weight_offset=1.0, extra="residual"),
    _case("SandwichRMSNorm(48)", "sandwich_rms_norm", nkm.SandwichRMSNorm, ((2, 5, 48),), 48, extra="residual"),
)


def _folded(text: str) -> str:
    return re.sub(r"[\s_\-]", "", text.lower())


def select_cases(queries: Sequence[str] | None, cases: Iterable[CheckCase] = CASES) -> list[CheckCase]:
    """The cases ``normkit check --op`` selects: those whose name contains one of ``queries``
    (case, spaces, ``_`` and ``-`` ignored, so a row's name, ``scale_norm``, finds its
    ``ScaleNorm(64)``) or whose functional op is one of them; every case for none."""
    if not queries:
        return list(cases)
    folded = [_folded(q) for q in queries]
    return [c for c in cases if c.op in queries or any(q in _folded(c.name) for q in folded)]


@dataclass
class CheckResult:
    case: str
    backend: str
    dtype: str
    max_error: float  # of the quantity closest to its tolerance
    tolerance: float
    worst: str  # which quantity that was
    ok: bool
    error: str | None = None  # an exception raised by the run, if any
    skipped: str | None = None  # why this combination was not run (then ok is True and nothing was measured)
    oracle: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _randomize(module: nn.Module, gen: torch.Generator) -> None:
    """Random weights and biases (around 1 and 0), and random running statistics (variances
    positive): unit weights and fresh statistics would hide a wrong term."""
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if isinstance(t, nn.parameter.UninitializedParameter) or not t.is_floating_point():
                continue
            r = torch.randn(t.shape, generator=gen, dtype=torch.float64)
            if name.endswith("running_var"):
                t.copy_(r.abs() * 0.5 + 0.5)
            else:
                t.copy_(r * 0.5 + (1.0 if name.endswith("weight") else 0.0))


def _materialize(shape: tuple[int, ...], module: nn.Module) -> nn.Module:
    """Run a lazy module once in eval mode so it has parameters to randomize and copy."""
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters()):
        was_training = module.training
        module.eval()
        with torch.no_grad():
            module(torch.zeros(shape))
        module.train(was_training)
    return module


class _Tracker:
    """Keeps the quantity closest to its bound (:func:`normkit.testing.bound`)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.worst: tuple[float, float, float, str] = (-1.0, 0.0, 0.0, "")

    def add(self, name: str, ours: Tensor | None, baseline: Tensor | None, oracle: Tensor | None) -> None:
        if ours is None and oracle is None:
            return
        if ours is None or oracle is None:
            self.worst = (math.inf, math.inf, 0.0, f"{name} (missing)")
            return
        b = bound(ours, oracle, baseline, self.dtype)
        ratio = b.ratio if math.isfinite(b.error) else math.inf
        if ratio > self.worst[0]:
            self.worst = (ratio, b.error, b.limit, name)


class _CompileTracker(_Tracker):
    """Compiled against eager, the same module in the same dtype: within the dtype's direct
    tolerance (``TOLERANCES[dtype]``'s rtol and atol, as ``torch.testing.assert_close``)."""

    def add(self, name: str, ours: Tensor | None, baseline: Tensor | None, oracle: Tensor | None) -> None:
        if ours is None or oracle is None:
            return super().add(name, ours, baseline, oracle)
        tol = TOLERANCES[self.dtype] if self.dtype in TOLERANCES else TOLERANCES[torch.float32]
        rtol, atol = (tol.rtol, tol.atol) if tol.rtol else (2 * torch.finfo(self.dtype).eps, tol.atol)
        diff = (ours.double() - oracle.double()).abs()
        limit = atol + rtol * oracle.double().abs()
        err = diff.max().item() if diff.numel() else 0.0
        ratio = (diff / limit).max().item() if diff.numel() else 0.0
        if not math.isfinite(err):
            ratio = math.inf
        if ratio > self.worst[0]:
            self.worst = (ratio, err, atol, name)


def _inputs(case: CheckCase, shape: tuple[int, ...], gen: torch.Generator) -> tuple[list[Tensor], list[Tensor]]:
    """The differentiable inputs (float64) and the others (a mask)."""
    xs = [torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5]
    if case.extra == "residual":
        xs.append(torch.randn(shape, generator=gen, dtype=torch.float64))
    xs += [torch.randn(e.shape_for(shape), generator=gen, dtype=torch.float64) for e in case.inputs]
    if case.extra == "mask":
        lengths = torch.randint(1, shape[-1] + 1, (shape[0],), generator=gen)
        lengths[0] = shape[-1]  # one full row, one short one at least
        lengths[-1] = min(lengths[-1].item(), 2)
        return xs, [torch.arange(shape[-1])[None, :] < lengths[:, None]]
    return xs, []


def _steps(case: CheckCase, shape: tuple[int, ...], runs: Sequence[tuple[nn.Module, torch.dtype]], steps: int,
           track: _Tracker, gen: torch.Generator, *, baseline_may_fail: bool = True) -> None:
    """``steps`` training steps and an eval forward of ``runs`` = (oracle, baseline, ours), each in
    its dtype, on the same inputs and upstream gradients, every quantity given to ``track``."""
    (oracle, _), (low, dtype), (ours, _) = runs

    def step(train: bool) -> None:
        for m, _ in runs:
            m.train(train)
        inputs, others = _inputs(case, shape, gen)
        results = []
        for m, dt in runs:
            xs = [t.detach().clone().to(dt).requires_grad_(train) for t in inputs]
            try:
                outs = m(*xs, *others)
            except NotImplementedError:
                if m is not low or not baseline_may_fail:
                    raise
                # torch has no kernel for this dtype here: hold normkit to the oracle rounded
                # to the dtype instead (the error of a single final rounding).
                outs = tuple(o.detach().to(dt) for o in results[0][1])
                xs = [None] * len(xs)
            results.append((xs, outs if isinstance(outs, tuple) else (outs,)))
        for i in range(len(results[0][1])):
            track.add(f"output[{i}]" if len(results[0][1]) > 1 else "output", results[2][1][i], results[1][1][i],
                      results[0][1][i])
        if not train:
            return
        grads = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in results[0][1]]
        low_ran = results[1][0][0] is not None
        for (m, _), (_, outs) in zip(runs, results):
            m.zero_grad()
            if m is not low or low_ran:
                torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(grads, outs)])

        def baseline(low_grad: Tensor | None, oracle_grad: Tensor | None) -> Tensor | None:
            return low_grad if low_ran or oracle_grad is None else oracle_grad.to(dtype)

        for i in range(len(inputs)):
            x_low = results[1][0][i]
            track.add(f"grad input[{i}]", results[2][0][i].grad,
                      baseline(None if x_low is None else x_low.grad, results[0][0][i].grad), results[0][0][i].grad)
        low_params, ref_params = dict(low.named_parameters()), dict(oracle.named_parameters())
        for name, p in ours.named_parameters():
            ref_grad = ref_params[name].grad
            track.add(f"grad {name}", p.grad, baseline(low_params[name].grad, ref_grad), ref_grad)

    for _ in range(steps):
        step(train=True)
    low_buffers, ref_buffers = dict(low.named_buffers()), dict(oracle.named_buffers())
    for name, b in ours.named_buffers():
        if not b.is_floating_point():
            if not torch.equal(b, ref_buffers[name]):
                track.worst = (math.inf, float(b), 0.0, name)
        else:
            track.add(name, b, low_buffers[name], ref_buffers[name])
    step(train=False)


def _build(case: CheckCase, shape: tuple[int, ...], backend: str, dtype: torch.dtype,
           gen: torch.Generator) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(oracle in float64, baseline and ours in ``dtype``'s parameter dtype), the same state.

    With a torch twin the baseline is the twin in ``dtype``. Without one it is normkit's module
    on the torch backend (ATen's kernels composed: torch in that precision), and for the torch
    backend itself in float64/float32 the reference backend, so that it is not its own yardstick."""
    # the baseline and normkit: parameters in fp32 for half inputs (mixed precision)
    param_dtype = dtype if dtype in (torch.float64, torch.float32) else torch.float32
    if case.torch_module is not None:
        oracle = _materialize(shape, case.torch_module()).double()
        _randomize(oracle, gen)
        low = copy.deepcopy(oracle).to(param_dtype)
    else:
        oracle = _materialize(shape, case.normkit_module("reference")).double()
        _randomize(oracle, gen)
        yardstick = "reference" if backend == "torch" and param_dtype == dtype else "torch"
        low = _materialize(shape, case.normkit_module(yardstick)).to(param_dtype)
        low.load_state_dict(oracle.state_dict())
    ours = _materialize(shape, case.normkit_module(backend)).to(param_dtype)
    ours.load_state_dict(low.state_dict())
    return oracle, low, ours


def _run_case(case: CheckCase, shape: tuple[int, ...], backend: str, dtype: torch.dtype, steps: int,
              track: _Tracker, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    oracle, low, ours = _build(case, shape, backend, dtype, gen)
    _steps(case, shape, ((oracle, torch.float64), (low, dtype), (ours, dtype)), steps, track, gen)


def _run_compiled(case: CheckCase, shape: tuple[int, ...], backend: str, dtype: torch.dtype, steps: int,
                  track: _Tracker, seed: int, compile_backend: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    param_dtype = dtype if dtype in (torch.float64, torch.float32) else torch.float32
    eager = _materialize(shape, case.normkit_module(backend)).to(param_dtype)
    _randomize(eager, gen)
    baseline, module = copy.deepcopy(eager), copy.deepcopy(eager)  # the baseline is not read
    compiled = _Compiled(torch.compile(module, backend=compile_backend), module)
    _steps(case, shape, ((eager, dtype), (baseline, dtype), (compiled, dtype)), steps, track, gen,
           baseline_may_fail=False)


class _Compiled(nn.Module):
    """``torch.compile``'s wrapper with the compiled module's parameters and buffers as its own
    (its names carry an ``_orig_mod.`` prefix)."""

    def __init__(self, compiled: Callable[..., Any], module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self._fn = [compiled]

    def forward(self, *args: Any) -> Any:
        return self._fn[0](*args)

    def named_parameters(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return self.module.named_parameters(*args, **kwargs)

    def named_buffers(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return self.module.named_buffers(*args, **kwargs)


def _skip_reason(case: CheckCase, name: str) -> str | None:
    """Why backend ``name`` cannot run ``case`` here, known before running it; else None."""
    try:
        backend = get_backend(name)
    except BackendError as exc:
        return str(exc)
    if not backend.is_available():
        return f"backend {name!r} is not available on this machine"
    if case.op not in backend.ops:
        return f"backend {name!r} has no {case.op} op"
    return None


def run_check(
    cases: Iterable[CheckCase] = CASES,
    backend_names: Iterable[str] | None = None,
    dtypes: Iterable[torch.dtype] = DTYPES,
    *,
    steps: int = 3,
    seed: int = 0,
    compile: bool = False,
    compile_backend: str = "inductor",
    progress: Callable[[CheckResult], None] | None = None,
) -> list[CheckResult]:
    """Run every case on every backend and dtype. A combination that cannot run here (the
    backend lacks the op, or declines the call with a BackendError: Triton without a GPU) is a
    row with ``skipped`` set to the reason. ``compile``: also every case and backend under
    ``torch.compile(backend=compile_backend)`` against eager (rows named ``<case> [compiled]``)."""
    names = list(backend_names) if backend_names is not None else backends()
    dtypes = list(dtypes)
    results = []

    def record(result: CheckResult) -> None:
        results.append(result)
        if progress is not None:
            progress(result)

    for case in cases:
        for name in names:
            reason = _skip_reason(case, name)
            runs = [(case.name, case.oracle, dtype, _run_case, ()) for dtype in dtypes]
            if compile:
                runs += [(f"{case.name} [compiled]", "eager", dtype, _run_compiled,
                          (compile_backend,)) for dtype in dtypes]
            for label, oracle, dtype, fn, extra in runs:
                if reason is not None:
                    record(CheckResult(label, name, _dtype_name(dtype), math.nan, math.nan, "", True,
                                       skipped=reason, oracle=oracle))
                    continue
                track = (_CompileTracker if fn is _run_compiled else _Tracker)(dtype)
                try:
                    for shape in case.shapes:
                        fn(case, shape, name, dtype, steps, track, seed, *extra)
                    ratio, err, tol, worst = track.worst
                    result = CheckResult(label, name, _dtype_name(dtype), err, tol, worst, ratio <= 1.0,
                                         oracle=oracle)
                except BackendError as exc:  # this backend declines the call here (Triton without a GPU)
                    result = CheckResult(label, name, _dtype_name(dtype), math.nan, math.nan, "", True,
                                         skipped=str(exc).splitlines()[0], oracle=oracle)
                except Exception as exc:  # reported as a failed row, the others still run
                    result = CheckResult(label, name, _dtype_name(dtype), math.nan, math.nan, "exception", False,
                                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                                         oracle=oracle)
                record(result)
    return results
