"""The parity check behind ``normkit check``: every module and fused op, on every backend
available here, against torch.nn, over shapes and dtypes.

For each (op, backend, dtype) a torch module and its normkit twin start from the same random
parameters. Three training steps (random input, random upstream gradient) compare the output
and the input/parameter gradients; then the running statistics; then an eval-mode forward.
Errors are measured against torch run in float64 (the oracle), and each must stay within
:func:`normkit.testing.bound`, ``2 * (torch's own error in that dtype) + atol * max(1, |oracle|)``
with the floor of :data:`normkit.testing.TOLERANCES`: normkit may be as inexact as torch, twice
over, never more.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import modules as nkm
from ..backends import BackendError, backends, get_backend
from ..norms import NORMS
from ..testing import bound

__all__ = ["CASES", "DTYPES", "CheckCase", "CheckResult", "run_check"]

DTYPES: tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

@dataclass(frozen=True)
class CheckCase:
    name: str
    op: str  # the functional op the backend must provide
    torch_module: Callable[[], nn.Module]
    normkit_module: Callable[[str], nn.Module]
    shapes: tuple[tuple[int, ...], ...]  # batch of 1, odd and prime sizes, one wide row
    fused_add: bool = False  # forward(x, residual) -> (y, residual_out)


def _case(name: str, op: str, torch_cls: type, nk_cls: type, shapes: tuple[tuple[int, ...], ...],
          *args, **kwargs) -> CheckCase:
    return CheckCase(name, op, lambda: torch_cls(*args, **kwargs), lambda b: nk_cls(*args, **kwargs, backend=b), shapes)


def _unfused_add(norm_cls: type[nn.Module]) -> type[nn.Module]:
    """torch's ``norm_cls`` taking ``(x, residual)``: the unfused oracle of the fused-add modules."""

    class UnfusedAdd(norm_cls):  # type: ignore[valid-type, misc]
        def forward(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
            residual_out = x + residual
            return super().forward(residual_out), residual_out

    return UnfusedAdd


CASES: tuple[CheckCase, ...] = (
    _case("BatchNorm1d", "batch_norm", nn.BatchNorm1d, nkm.BatchNorm1d, ((6, 5, 7), (13, 5)), 5),
    _case("BatchNorm2d", "batch_norm", nn.BatchNorm2d, nkm.BatchNorm2d, ((4, 3, 5, 7), (1, 3, 2, 3)), 3),
    _case("BatchNorm3d", "batch_norm", nn.BatchNorm3d, nkm.BatchNorm3d, ((2, 3, 3, 4, 5),), 3),
    _case("BatchNorm2d(momentum=None)", "batch_norm", nn.BatchNorm2d, nkm.BatchNorm2d, ((3, 4, 5, 5),), 4,
          momentum=None),
    _case("LazyBatchNorm2d", "batch_norm", nn.LazyBatchNorm2d, nkm.LazyBatchNorm2d, ((3, 5, 4, 3),)),
    _case("InstanceNorm1d", "instance_norm", nn.InstanceNorm1d, nkm.InstanceNorm1d, ((3, 4, 9), (4, 11)), 4,
          affine=True, track_running_stats=True),
    _case("InstanceNorm2d", "instance_norm", nn.InstanceNorm2d, nkm.InstanceNorm2d, ((2, 5, 6, 7), (1, 5, 3, 3)), 5,
          affine=True, track_running_stats=True),
    _case("InstanceNorm3d", "instance_norm", nn.InstanceNorm3d, nkm.InstanceNorm3d, ((2, 3, 3, 4, 5),), 3),
    _case("LazyInstanceNorm2d", "instance_norm", nn.LazyInstanceNorm2d, nkm.LazyInstanceNorm2d, ((2, 3, 5, 5),)),
    _case("LayerNorm", "layer_norm", nn.LayerNorm, nkm.LayerNorm, ((4, 7, 33), (1, 33), (33,)), 33),
    _case("LayerNorm(4100)", "layer_norm", nn.LayerNorm, nkm.LayerNorm, ((3, 4100),), 4100),
    _case("LayerNorm([C,H,W])", "layer_norm", nn.LayerNorm, nkm.LayerNorm, ((2, 3, 5, 5),), [3, 5, 5]),
    _case("GroupNorm", "group_norm", nn.GroupNorm, nkm.GroupNorm, ((3, 6, 5, 7), (1, 6, 13)), 3, 6),
    _case("RMSNorm", "rms_norm", nn.RMSNorm, nkm.RMSNorm, ((4, 7, 33), (1, 33)), 33),
    _case("RMSNorm(4100)", "rms_norm", nn.RMSNorm, nkm.RMSNorm, ((3, 4100),), 4100),
    _case("LocalResponseNorm", "local_response_norm", nn.LocalResponseNorm, nkm.LocalResponseNorm,
          ((2, 7, 4, 5), (3, 6, 11)), 3),
    CheckCase("FusedAddLayerNorm", "add_layer_norm", lambda: _unfused_add(nn.LayerNorm)(48),
              lambda b: nkm.FusedAddLayerNorm(48, backend=b), ((5, 48), (1, 3, 48)), fused_add=True),
    CheckCase("FusedAddRMSNorm", "add_rms_norm", lambda: _unfused_add(nn.RMSNorm)(48),
              lambda b: nkm.FusedAddRMSNorm(48, backend=b), ((5, 48), (1, 3, 48)), fused_add=True),
)

assert {c.op for c in CASES} >= set(NORMS), "every norm of the table needs a check case"


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

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _randomize(module: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters():
            if not isinstance(p, nn.parameter.UninitializedParameter):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5 + (1.0 if p.dim() else 0.0))


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

    def add(self, name: str, ours: Tensor | None, torch_low: Tensor | None, oracle: Tensor | None) -> None:
        if ours is None and oracle is None:
            return
        if ours is None or oracle is None:
            self.worst = (math.inf, math.inf, 0.0, f"{name} (missing)")
            return
        b = bound(ours, oracle, torch_low, self.dtype)
        ratio = b.ratio if math.isfinite(b.error) else math.inf
        if ratio > self.worst[0]:
            self.worst = (ratio, b.error, b.limit, name)


def _run_case(case: CheckCase, shape: tuple[int, ...], backend: str, dtype: torch.dtype, steps: int,
              track: _Tracker, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    oracle = _materialize(shape, case.torch_module()).double()
    _randomize(oracle, gen)
    # torch in the dtype under test, and normkit: parameters in fp32 for half inputs (mixed).
    param_dtype = dtype if dtype in (torch.float64, torch.float32) else torch.float32
    low = copy.deepcopy(oracle).to(param_dtype)
    ours = _materialize(shape, case.normkit_module(backend)).to(param_dtype)
    ours.load_state_dict(low.state_dict())

    def step(train: bool) -> None:
        for m in (oracle, low, ours):
            m.train(train)
        inputs = [torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5]
        if case.fused_add:
            inputs.append(torch.randn(shape, generator=gen, dtype=torch.float64))
        runs = []
        for m, dt in ((oracle, torch.float64), (low, dtype), (ours, dtype)):
            xs = [t.detach().clone().to(dt).requires_grad_(train) for t in inputs]
            try:
                outs = m(*xs)
            except NotImplementedError:
                if m is not low:
                    raise
                # torch has no kernel for this dtype here: hold normkit to the oracle rounded
                # to the dtype instead (the error of a single final rounding).
                outs = tuple(o.detach().to(dt) for o in runs[0][1])
                xs = [None] * len(xs)
            outs = outs if isinstance(outs, tuple) else (outs,)
            runs.append((xs, outs))
        for i in range(len(runs[0][1])):
            track.add(f"output[{i}]" if case.fused_add else "output", runs[2][1][i], runs[1][1][i], runs[0][1][i])
        if not train:
            return
        grads = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in runs[0][1]]
        low_ran = runs[1][0][0] is not None
        for m, (_, outs) in zip((oracle, low, ours), runs):
            m.zero_grad()
            if m is not low or low_ran:
                torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(grads, outs)])

        def baseline(low_grad: Tensor | None, oracle_grad: Tensor | None) -> Tensor | None:
            return low_grad if low_ran or oracle_grad is None else oracle_grad.to(dtype)

        for i in range(len(inputs)):
            x_low = runs[1][0][i]
            track.add(f"grad input[{i}]", runs[2][0][i].grad,
                      baseline(None if x_low is None else x_low.grad, runs[0][0][i].grad), runs[0][0][i].grad)
        low_params, ref_params = dict(low.named_parameters()), dict(oracle.named_parameters())
        for name, p in ours.named_parameters():
            ref_grad = ref_params[name].grad
            track.add(f"grad {name}", p.grad, baseline(low_params[name].grad, ref_grad), ref_grad)

    for _ in range(steps):
        step(train=True)
    low_buffers, ref_buffers = dict(low.named_buffers()), dict(oracle.named_buffers())
    for name, b in ours.named_buffers():
        if name.endswith("num_batches_tracked"):
            if not torch.equal(b, ref_buffers[name]):
                track.worst = (math.inf, float(b), 0.0, name)
        else:
            track.add(name, b, low_buffers[name], ref_buffers[name])
    step(train=False)


def run_check(
    cases: Iterable[CheckCase] = CASES,
    backend_names: Iterable[str] | None = None,
    dtypes: Iterable[torch.dtype] = DTYPES,
    *,
    steps: int = 3,
    seed: int = 0,
    progress: Callable[[CheckResult], None] | None = None,
) -> list[CheckResult]:
    """Run every case on every backend and dtype; a backend that cannot run a case on the CPU
    (Triton without a GPU) is skipped for it."""
    names = list(backend_names) if backend_names is not None else backends()
    results = []
    for case in cases:
        for name in names:
            entry = get_backend(name).ops.get(case.op)
            if entry is None:
                continue
            for dtype in dtypes:
                track = _Tracker(dtype)
                try:
                    for shape in case.shapes:
                        _run_case(case, shape, name, dtype, steps, track, seed)
                    ratio, err, tol, worst = track.worst
                    result = CheckResult(case.name, name, _dtype_name(dtype), err, tol, worst, ratio <= 1.0)
                except BackendError:  # this backend cannot run here (e.g. Triton without a GPU)
                    continue
                except Exception as exc:  # reported as a failed row, the others still run
                    result = CheckResult(case.name, name, _dtype_name(dtype), math.nan,
                                         math.nan, "exception", False, f"{type(exc).__name__}: {exc}")
                results.append(result)
                if progress is not None:
                    progress(result)
    return results
