"""Bad inputs: normkit raises torch 2.13's exception, type and message, and touches nothing.

For every bad call in the tables below, the exception that torch.nn / torch.nn.functional raise
for the same input is computed at test time, and normkit must raise the same ``type`` with the
same ``str`` on every backend that runs CPU calls. A failed call leaves every tensor it was given
(weight, bias, running statistics, ``num_batches_tracked``) bit-identical and un-mutated (same
version counter), modules in training mode included: torch's own BatchNorm counts the failed
batch in ``num_batches_tracked``, normkit must not, so state is compared with the state before
the call, never with torch's.

The inputs that look wrong but torch accepts (a bf16 input with float32 parameters, ...) are in
:data:`LOOKALIKES`: normkit must run them too and agree with torch. Backend names that do not
exist or cannot run a call end the file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import normkit
import normkit.functional as NF
from cases import BACKENDS, MUST_RUN, assert_close_to_reference, randomize_, seed_of
from normkit.backends import _REGISTRY, Backend, BackendError, OpImpl, resolve

pytestmark = pytest.mark.filterwarnings(
    # torch's rms_norm warns when input and weight dtypes differ (it takes its unfused path), and
    # InstanceNorm without affine warns on a channel count it does not use.
    "ignore:Mismatch dtype between input and weight:UserWarning",
    "ignore:input's size at dim=:UserWarning",
)


def _runs_cpu_calls(name: str) -> bool:
    if name in MUST_RUN:
        return True
    x = torch.randn(2, 4)
    try:
        resolve("layer_norm", name, x, (4,), None, None, 1e-5)
    except BackendError:
        return False
    return True


CPU_BACKENDS = [b for b in BACKENDS if _runs_cpu_calls(b)]


# ---- helpers -----------------------------------------------------------------------------------


class Rand:
    """Random tensors from one seeded generator: a case builds the same tensors on every call."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, *shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Tensor:
        t = torch.randn(shape, generator=self.gen, dtype=torch.float64)
        return (t if dtype.is_floating_point else t * 3).to(dtype).to(device)

    def small(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Values of magnitude ~0.05: an eps of 7.8e-3 (bf16's finfo) is then far from negligible."""
        return (torch.randn(shape, generator=self.gen, dtype=torch.float64) * 0.05).to(dtype)

    def var(self, *shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Tensor:
        """Positive values, for running variances."""
        return (torch.rand(shape, generator=self.gen, dtype=torch.float64) + 0.5).to(dtype).to(device)


def _outcome(fn: Callable[[], Any]) -> BaseException | None:
    try:
        fn()
    except Exception as e:
        return e
    return None


def torch_error(fn: Callable[[], Any]) -> BaseException:
    """The exception torch raises for ``fn()``: a case of this file must be bad for torch too."""
    error = _outcome(fn)
    assert error is not None, "torch accepts this input: the case belongs in LOOKALIKES, not in the bad ones"
    return error


def assert_same_error(expected: BaseException, fn: Callable[[], Any]) -> None:
    actual = _outcome(fn)
    assert actual is not None, f"normkit accepted an input torch rejects with {type(expected).__name__}: {expected}"
    assert (type(actual), str(actual)) == (type(expected), str(expected)), (
        f"normkit raised {type(actual).__name__}({actual!s})\n   torch raised {type(expected).__name__}({expected!s})"
    )


def _tensors(values: Sequence[Any]) -> list[Tensor]:
    return [v for v in values if isinstance(v, Tensor)]


def _snapshot(tensors: Sequence[Tensor]) -> list[tuple[Tensor, Tensor, int]]:
    return [(t, t.detach().clone(), t._version) for t in tensors]


def assert_untouched(snapshot: list[tuple[Tensor, Tensor, int]], where: str = "") -> None:
    """Every tensor is bit-identical to its copy from before the call and was not written in
    place (its version counter did not move; on device 'meta' that is the only evidence)."""
    for i, (t, before, version) in enumerate(snapshot):
        label = f"{where}[{i}]" if where else f"tensor {i}"
        assert t._version == version, f"{label} was written in place by a failed call"
        assert (t.dtype, t.shape, t.device) == (before.dtype, before.shape, before.device), label
        if t.device.type != "meta":
            assert torch.equal(t.detach(), before), f"{label} changed: {before} -> {t.detach()}"


# ---- bad functional calls ----------------------------------------------------------------------


def _add_norm(norm: Callable[..., Tensor]) -> Callable[..., tuple[Tensor, Tensor]]:
    """torch's spelling of a residual-add norm: the norm of ``x + residual``, and the sum."""

    def call(x: Tensor, residual: Tensor | None, *args: Any) -> tuple[Tensor, Tensor]:
        summed = x if residual is None else x + residual
        return norm(summed, *args), summed

    return call


TORCH_OPS: dict[str, Callable[..., Any]] = {
    **{op: getattr(F, op) for op in NF.__all__ if hasattr(F, op)},
    "add_layer_norm": _add_norm(F.layer_norm),
    "add_rms_norm": _add_norm(F.rms_norm),
    # norm + activation: the norm's errors (the default activation never raises)
    "batch_norm_act": lambda *args: F.relu(F.batch_norm(*args)),
    "group_norm_act": lambda *args: F.silu(F.group_norm(*args)),
}


@dataclass(frozen=True)
class Call:
    """``op(*build(Rand(seed)))`` for torch.nn.functional and normkit.functional alike."""

    id: str
    op: str
    build: Callable[[Rand], tuple[Any, ...]]

    def args(self) -> tuple[Any, ...]:
        return self.build(Rand(seed_of(self.id)))


C = 3  # channels of the batch/instance norm cases
_f32, _f64, _bf16, _i64 = torch.float32, torch.float64, torch.bfloat16, torch.int64


def _bn(x: Callable[[Rand], Tensor], *, stats: Any = C, weight: Any = C, bias: Any = C, dtype: torch.dtype = _f32,
        training: bool = True, eps: float = 1e-5, device: str = "cpu") -> Callable[[Rand], tuple[Any, ...]]:
    """batch_norm / instance_norm arguments; ``stats``/``weight``/``bias`` are a size, a
    (size, dtype, device) triple or None."""

    def spec(s: Any) -> tuple[int, torch.dtype, str] | None:
        return None if s is None else (s if isinstance(s, tuple) else (s, dtype, device))

    def build(r: Rand) -> tuple[Any, ...]:
        st, w, b = spec(stats), spec(weight), spec(bias)
        mean = None if st is None else r(st[0], dtype=st[1], device=st[2])
        var = None if st is None else r.var(st[0], dtype=st[1], device=st[2])
        return (x(r), mean, var, None if w is None else r(w[0], dtype=w[1], device=w[2]),
                None if b is None else r(b[0], dtype=b[1], device=b[2]), training, 0.1, eps)

    return build


def _x(*shape: int, dtype: torch.dtype = _f32) -> Callable[[Rand], Tensor]:
    return lambda r: r(*shape, dtype=dtype)


X = _x(4, C, 5)  # a valid (N, C, L) input

BAD_CALLS: tuple[Call, ...] = (
    # -- batch_norm: wrong channel count (weight, bias, running statistics), train and eval
    Call("bn-weight-C+1", "batch_norm", _bn(X, weight=C + 1)),
    Call("bn-bias-C-1", "batch_norm", _bn(X, bias=C - 1)),
    Call("bn-running_mean-C+1", "batch_norm", lambda r: (r(4, C, 5), r(C + 1), r.var(C), r(C), r(C), True)),
    Call("bn-running_var-C+1-eval", "batch_norm", lambda r: (r(4, C, 5), r(C), r.var(C + 1), r(C), r(C), False)),
    Call("bn-all-C+1-2d", "batch_norm", _bn(_x(2, C, 4, 5), stats=C + 1, weight=C + 1, bias=C + 1)),
    # -- batch_norm: rank below 2
    Call("bn-0d", "batch_norm", _bn(_x())),
    Call("bn-1d-no-params", "batch_norm", _bn(_x(C), stats=None, weight=None, bias=None)),
    Call("bn-1d-stats", "batch_norm", _bn(_x(C), weight=None, bias=None)),
    Call("bn-1d-weight", "batch_norm", _bn(_x(C), stats=None, bias=None)),
    Call("bn-1d-size1-train", "batch_norm", _bn(_x(1), stats=None, weight=None, bias=None)),
    # -- batch_norm: one value per channel in training
    Call("bn-1xC-train", "batch_norm", _bn(_x(1, C))),
    Call("bn-1xCx1-train", "batch_norm", _bn(_x(1, C, 1))),
    Call("bn-1xCx1x1-train", "batch_norm", _bn(_x(1, C, 1, 1))),
    Call("bn-1xCx1x1x1-train-no-stats", "batch_norm", _bn(_x(1, C, 1, 1, 1), stats=None)),
    # -- batch_norm: eps
    Call("bn-eps0-train", "batch_norm", _bn(X, eps=0.0)),
    Call("bn-eps-negative-train", "batch_norm", _bn(X, eps=-1e-5)),
    Call("bn-eps-negative-eval", "batch_norm", _bn(X, eps=-1e-5, training=False)),
    # -- batch_norm: eval without running statistics
    Call("bn-eval-no-stats", "batch_norm", _bn(X, stats=None, training=False)),
    Call("bn-eval-no-mean", "batch_norm", lambda r: (r(4, C, 5), None, r.var(C), r(C), r(C), False)),
    Call("bn-eval-no-var", "batch_norm", lambda r: (r(4, C, 5), r(C), None, r(C), r(C), False)),
    # -- batch_norm: dtypes (bf16 input with float32 parameters is valid: see LOOKALIKES)
    Call("bn-f32-weight-f64", "batch_norm", _bn(X, weight=(C, _f64, "cpu"))),
    Call("bn-f32-weight-bias-f64", "batch_norm", _bn(X, weight=(C, _f64, "cpu"), bias=(C, _f64, "cpu"))),
    Call("bn-f32-weight-bf16", "batch_norm", _bn(X, weight=(C, _bf16, "cpu"))),
    Call("bn-f32-stats-f64-eval", "batch_norm", _bn(X, stats=(C, _f64, "cpu"), training=False)),
    Call("bn-f64-weight-f32", "batch_norm", _bn(_x(4, C, 5, dtype=_f64), dtype=_f64, weight=(C, _f32, "cpu"))),
    Call("bn-f64-all-params-f32", "batch_norm", _bn(_x(4, C, 5, dtype=_f64))),
    Call("bn-bf16-weight-bf16-bias-f32", "batch_norm",
         _bn(_x(4, C, 5, dtype=_bf16), weight=(C, _bf16, "cpu"), bias=(C, _f32, "cpu"))),
    # -- batch_norm: integer input
    Call("bn-int64-no-params", "batch_norm", _bn(_x(4, C, 5, dtype=_i64), stats=None, weight=None, bias=None)),
    Call("bn-int64-float-params", "batch_norm", _bn(_x(4, C, 5, dtype=_i64))),
    Call("bn-int64-float-weight", "batch_norm", _bn(_x(4, C, 5, dtype=_i64), stats=None)),
    Call("bn-int64-float-stats-eval", "batch_norm", _bn(_x(4, C, 5, dtype=_i64), weight=None, bias=None,
                                                         training=False)),
    Call("bn-int32", "batch_norm", _bn(_x(4, C, 5, dtype=torch.int32), stats=None, weight=None, bias=None)),
    Call("bn-bool", "batch_norm", _bn(_x(4, C, 5, dtype=torch.bool), stats=None, weight=None, bias=None)),
    # -- batch_norm: parameters on another device
    Call("bn-weight-meta", "batch_norm", _bn(X, weight=(C, _f32, "meta"))),
    Call("bn-running-stats-meta", "batch_norm", _bn(X, stats=(C, _f32, "meta"))),
    # -- batch_norm / instance_norm: momentum=None is the modules' cumulative average, not the functional's
    Call("bn-momentum-None", "batch_norm", lambda r: (r(4, C, 5), r(C), r.var(C), None, None, True, None)),
    Call("bn-momentum-None-no-stats", "batch_norm", lambda r: (r(4, C, 5), None, None, None, None, True, None)),
    Call("in-momentum-None", "instance_norm", lambda r: (r(4, C, 5), r(C), r.var(C), None, None, True, None)),
    Call("bn-momentum-str", "batch_norm", lambda r: (r(4, C, 5), r(C), r.var(C), None, None, True, "0.1")),
    # -- instance_norm
    Call("in-weight-C+1", "instance_norm", _bn(X, stats=None, weight=C + 1)),
    Call("in-bias-C-1", "instance_norm", _bn(X, stats=None, bias=C - 1)),
    Call("in-running-stats-C+1", "instance_norm", _bn(X, stats=C + 1)),
    Call("in-weight-2d", "instance_norm", lambda r: (r(4, C, 5), None, None, r(C, 1), None)),
    Call("in-spatial-1-1d", "instance_norm", _bn(_x(4, C, 1), stats=None)),
    Call("in-spatial-1-2d", "instance_norm", _bn(_x(2, C, 1, 1))),
    Call("in-spatial-1-3d", "instance_norm", _bn(_x(2, C, 1, 1, 1), stats=None, weight=None, bias=None)),
    Call("in-2d-input", "instance_norm", _bn(_x(4, C), stats=None)),
    Call("in-only-running_mean", "instance_norm", lambda r: (r(4, C, 5), r(C), None)),
    Call("in-only-running_var", "instance_norm", lambda r: (r(4, C, 5), None, r.var(C))),
    Call("in-no-stats-use_input_stats-false", "instance_norm", _bn(X, stats=None, training=False)),
    Call("in-f32-weight-f64", "instance_norm", _bn(X, stats=None, weight=(C, _f64, "cpu"))),
    Call("in-f32-weight-bf16", "instance_norm", _bn(X, stats=None, weight=(C, _bf16, "cpu"))),
    Call("in-f64-weight-f32", "instance_norm", _bn(_x(4, C, 5, dtype=_f64), stats=None, dtype=_f64,
                                                  weight=(C, _f32, "cpu"))),
    Call("in-int64-no-params", "instance_norm", _bn(_x(4, C, 5, dtype=_i64), stats=None, weight=None, bias=None)),
    Call("in-int64-float-params", "instance_norm", _bn(_x(4, C, 5, dtype=_i64))),
    Call("in-weight-meta", "instance_norm", _bn(X, stats=None, weight=(C, _f32, "meta"))),
    Call("in-running-stats-meta", "instance_norm", _bn(X, stats=(C, _f32, "meta"), weight=None, bias=None)),
    # -- layer_norm / rms_norm: normalized_shape against the input (x is (2, 6, 4, 5))
    *(
        Call(f"{op}-{name}", op, lambda r, ns=ns: (r(2, 6, 4, 5), ns))
        for op in ("layer_norm", "rms_norm")
        for name, ns in (
            ("wrong-last-dim", (4,)),
            ("wrong-leading-dim", (3, 5)),
            ("swapped-dims", (5, 4)),
            ("too-long", (1, 2, 6, 4, 5)),
            ("empty-tuple", ()),
            ("empty-list", []),
        )
    ),
    Call("layer_norm-too-long-2d", "layer_norm", lambda r: (r(4, 5), (1, 4, 5))),
    Call("rms_norm-too-long-2d", "rms_norm", lambda r: (r(4, 5), (1, 4, 5))),
    Call("layer_norm-0d-input", "layer_norm", lambda r: (r(), (1,))),
    Call("rms_norm-0d-input", "rms_norm", lambda r: (r(), (1,))),
    # -- layer_norm / rms_norm: weight and bias shapes
    Call("layer_norm-weight-trailing-only", "layer_norm", lambda r: (r(2, 4, 5), (4, 5), r(5), r(4, 5))),
    Call("layer_norm-bias-flat", "layer_norm", lambda r: (r(2, 4, 5), (4, 5), r(4, 5), r(20))),
    Call("layer_norm-weight-and-shape-wrong", "layer_norm", lambda r: (r(2, 4, 5), (3, 5), r(5), r(20))),
    Call("rms_norm-weight-trailing-only", "rms_norm", lambda r: (r(2, 4, 5), (4, 5), r(5))),
    Call("rms_norm-weight-flat", "rms_norm", lambda r: (r(2, 4, 5), (4, 5), r(20))),
    Call("rms_norm-too-long-weight-wrong", "rms_norm", lambda r: (r(4, 5), (1, 4, 5), r(4, 5))),
    # -- layer_norm / rms_norm: dtypes, integers, devices (rms_norm upcasts mixed dtypes: LOOKALIKES)
    Call("layer_norm-f32-weight-f64", "layer_norm", lambda r: (r(3, 5), (5,), r(5, dtype=_f64), r(5))),
    Call("layer_norm-f32-params-bf16", "layer_norm", lambda r: (r(3, 5), (5,), r(5, dtype=_bf16), r(5, dtype=_bf16))),
    Call("layer_norm-f64-params-f32", "layer_norm", lambda r: (r(3, 5, dtype=_f64), (5,), r(5), r(5))),
    Call("layer_norm-int64", "layer_norm", lambda r: (r(3, 5, dtype=_i64), (5,))),
    Call("layer_norm-int64-float-params", "layer_norm", lambda r: (r(3, 5, dtype=_i64), (5,), r(5), r(5))),
    Call("rms_norm-int64", "rms_norm", lambda r: (r(3, 5, dtype=_i64), (5,))),
    Call("rms_norm-int64-float-weight", "rms_norm", lambda r: (r(3, 5, dtype=_i64), (5,), r(5))),
    Call("layer_norm-weight-meta", "layer_norm", lambda r: (r(3, 5), (5,), r(5, device="meta"), r(5))),
    Call("layer_norm-bias-meta", "layer_norm", lambda r: (r(3, 5), (5,), r(5), r(5, device="meta"))),
    Call("rms_norm-weight-meta", "rms_norm", lambda r: (r(3, 5), (5,), r(5, device="meta"))),
    # -- group_norm (x is (2, 6, 4, 5))
    Call("group_norm-6-channels-4-groups", "group_norm", lambda r: (r(2, 6, 4, 5), 4)),
    Call("group_norm-6-channels-5-groups-affine", "group_norm", lambda r: (r(2, 6, 4, 5), 5, r(6), r(6))),
    Call("group_norm-more-groups-than-channels", "group_norm", lambda r: (r(2, 6, 4), 12)),
    Call("group_norm-negative-groups", "group_norm", lambda r: (r(2, 6, 4), -2)),
    Call("group_norm-zero-groups", "group_norm", lambda r: (r(2, 6, 4), 0)),
    Call("group_norm-weight-size", "group_norm", lambda r: (r(2, 6, 4, 5), 2, r(4), r(6))),
    Call("group_norm-weight-2d", "group_norm", lambda r: (r(2, 6, 4, 5), 2, r(2, 3), r(6))),
    Call("group_norm-bias-size", "group_norm", lambda r: (r(2, 6, 4, 5), 2, r(6), r(5))),
    Call("group_norm-bias-2d-no-weight", "group_norm", lambda r: (r(2, 6, 4, 5), 2, None, r(2, 3))),
    Call("group_norm-1d-input", "group_norm", lambda r: (r(6), 2)),
    Call("group_norm-one-value-per-group", "group_norm", lambda r: (r(1, 6), 6)),
    Call("group_norm-one-value-per-group-3d", "group_norm", lambda r: (r(1, 6, 1), 6, r(6), r(6))),
    Call("group_norm-f32-weight-f64", "group_norm", lambda r: (r(2, 6, 4), 2, r(6, dtype=_f64), r(6))),
    Call("group_norm-f32-params-bf16", "group_norm", lambda r: (r(2, 6, 4), 2, r(6, dtype=_bf16), r(6, dtype=_bf16))),
    Call("group_norm-f64-params-f32", "group_norm", lambda r: (r(2, 6, 4, dtype=_f64), 2, r(6), r(6))),
    Call("group_norm-int64", "group_norm", lambda r: (r(2, 6, 4, dtype=_i64), 2)),
    Call("group_norm-int64-float-params", "group_norm", lambda r: (r(2, 6, 4, dtype=_i64), 2, r(6), r(6))),
    Call("group_norm-weight-meta", "group_norm", lambda r: (r(2, 6, 4), 2, r(6, device="meta"), r(6))),
    # -- local_response_norm
    Call("lrn-2d-input", "local_response_norm", lambda r: (r(2, 6), 2)),
    Call("lrn-1d-input", "local_response_norm", lambda r: (r(6), 2)),
    Call("lrn-0d-input", "local_response_norm", lambda r: (r(), 2)),
    Call("lrn-size0-3d", "local_response_norm", lambda r: (r(2, 6, 4), 0)),
    Call("lrn-size0-4d", "local_response_norm", lambda r: (r(2, 6, 4, 5), 0)),
    Call("lrn-size0-5d", "local_response_norm", lambda r: (r(2, 6, 4, 3, 2), 0)),
    Call("lrn-size-negative", "local_response_norm", lambda r: (r(2, 6, 4, 5), -1)),
    Call("lrn-bool", "local_response_norm", lambda r: (r(2, 6, 4, dtype=torch.bool), 2)),
    # -- residual-add norms: the norm's own errors, as torch raises them for x + residual
    Call("add_layer_norm-wrong-shape", "add_layer_norm", lambda r: (r(3, 5), r(3, 5), (4,))),
    Call("add_layer_norm-weight-size", "add_layer_norm", lambda r: (r(3, 5), r(3, 5), (5,), r(4), r(5))),
    Call("add_layer_norm-f32-weight-f64", "add_layer_norm", lambda r: (r(3, 5), r(3, 5), (5,), r(5, dtype=_f64))),
    Call("add_rms_norm-empty-shape", "add_rms_norm", lambda r: (r(3, 5), None, ())),
    Call("add_rms_norm-weight-meta", "add_rms_norm", lambda r: (r(3, 5), r(3, 5), (5,), r(5, device="meta"))),
    Call("add_rms_norm-int64", "add_rms_norm", lambda r: (r(3, 5, dtype=_i64), r(3, 5, dtype=_i64), (5,))),
    # -- ATen's own checks, enforced before any backend (issue 10, part 2): running statistics
    # that require grad, one of the two in training, a running statistic that is not a vector
    # (the reference backend used to scale it before failing), C = 0 with parameters, complex LRN
    Call("bn-running_mean-requires-grad", "batch_norm",
         lambda r: (r(4, C, 5), r(C).requires_grad_(), r.var(C), None, None, True)),
    Call("bn-running_var-requires-grad-eval", "batch_norm",
         lambda r: (r(4, C, 5), r(C), r.var(C).requires_grad_(), None, None, False)),
    Call("bn-running-requires-grad-int", "batch_norm",
         lambda r: (r(4, C, 5, dtype=_i64), r(C).requires_grad_(), r.var(C), None, None, True)),
    Call("in-running_mean-requires-grad", "instance_norm", lambda r: (r(4, C, 5), r(C).requires_grad_(), r.var(C))),
    Call("in-running_var-requires-grad-eval", "instance_norm",
         lambda r: (r(4, C, 5), r(C), r.var(C).requires_grad_(), None, None, False)),
    Call("bn-only-running_mean-train", "batch_norm", lambda r: (r(4, C, 5), r(C), None, r(C), r(C), True)),
    Call("bn-only-running_var-train", "batch_norm", lambda r: (r(4, C, 5), None, r.var(C), None, None, True)),
    Call("bn-only-running_mean-2d-train", "batch_norm", lambda r: (r(4, C, 5), r(C, 1), None, None, None, True)),
    Call("bn-running_mean-Cx1-train", "batch_norm", lambda r: (r(4, C, 5), r(C, 1), r.var(C), r(C), r(C), True)),
    Call("bn-running_mean-1xC-train", "batch_norm", lambda r: (r(4, C, 5), r(1, C), r.var(C), r(C), r(C), True)),
    Call("bn-running_var-1x1xC-train", "batch_norm", lambda r: (r(4, C, 5), r(C), r.var(1, 1, C), None, None, True)),
    Call("bn-running_var-1xC-eval", "batch_norm", lambda r: (r(4, C, 5), r(C), r.var(1, C), None, None, False)),
    Call("bn-running-0d-C1-train", "batch_norm", lambda r: (r(4, 1, 5), r(), r.var(), None, None, True)),
    Call("bn_act-running_mean-1xC-train", "batch_norm_act",
         lambda r: (r(4, C, 5), r(1, C), r.var(C), r(C), r(C), True)),
    Call("in-running_mean-1xC", "instance_norm", lambda r: (r(4, C, 5), r(1, C), r.var(1, C))),
    Call("bn-C0-weight-train", "batch_norm", _bn(_x(4, 0, 5), stats=0, weight=0, bias=0)),
    Call("bn-C0-bias-eval", "batch_norm", _bn(_x(4, 0, 5), stats=0, weight=None, bias=0, training=False)),
    Call("in-C0-weight", "instance_norm", _bn(_x(4, 0, 5), stats=None, weight=0, bias=None)),
    Call("lrn-complex-3d", "local_response_norm", lambda r: (r(2, 6, 4).to(torch.complex64), 2)),
    Call("lrn-complex-4d", "local_response_norm", lambda r: (r(2, 6, 4, 3).to(torch.complex128), 2)),
    # -- argument types, as torch's argument parser (and torch.nn.functional's Python) reject them
    # (issue 10, part 8)
    *(
        Call(f"{op}-normalized_shape-{name}", op, lambda r, v=v: (r(2, 4, 5), v))
        for op in ("layer_norm", "rms_norm")
        for name, v in (("int", 5), ("float-element", (5.0,)), ("bool-element", (True,)), ("None", None),
                        ("str", "5"), ("second-element-str", [4, "5"]), ("tensor", torch.tensor([5])),
                        ("None-element", (None,)))
    ),
    *(
        Call(f"{op}-{arg}-{type(v).__name__}", op, lambda r, op=op, i=i, v=v: (
            *((r(2, 4, 5), (5,), r(5), r(5), 1e-5) if op == "layer_norm" else (r(2, 4, 5), (5,), r(5), 1e-5))[:i],
            v,
            *((r(2, 4, 5), (5,), r(5), r(5), 1e-5) if op == "layer_norm" else (r(2, 4, 5), (5,), r(5), 1e-5))[i + 1:],
        ))
        for op, positions in (("layer_norm", {"input": 0, "weight": 2, "bias": 3, "eps": 4}),
                              ("rms_norm", {"input": 0, "weight": 2, "eps": 3}))
        for arg, i in positions.items()
        for v in (("a", [1.0] * 5) if arg != "eps"
                  else ("a", torch.tensor([1e-5]), 1j) + ((None,) if op == "layer_norm" else ()))
    ),
    Call("layer_norm-two-bad-arguments", "layer_norm", lambda r: (r(2, 4, 5), 5, None, None, None)),
    *(
        Call(f"{op}-{arg}-{label}", op, lambda r, op=op, i=i, v=v, train=train: (
            *(r(4, C, 5), r(C), r.var(C), r(C), r(C), train, 0.1, 1e-5)[:i], v,
            *(r(4, C, 5), r(C), r.var(C), r(C), r(C), train, 0.1, 1e-5)[i + 1:],
        ))
        for op in ("batch_norm", "instance_norm", "batch_norm_act")
        for train in (True, False)
        for arg, i, label, v in (
            ("input", 0, "list", [[1.0]]), ("running_mean", 1, "list", [0.0] * C), ("weight", 3, "ndarray-like", "w"),
            ("training", 5, "None", None), ("training", 5, "int", 1), ("training", 5, "tensor", torch.tensor(True)),
            ("momentum", 6, "str", "0.1"), ("momentum", 6, "1d-tensor", torch.ones(1)),
            ("momentum", 6, "requires-grad", torch.tensor(0.1, requires_grad=True)), ("momentum", 6, "complex", 1j),
            ("eps", 7, "None", None), ("eps", 7, "str", "a"),
        )
        if not (arg == "training" and not train)
    ),
    *(
        Call(f"{op}-{arg}-{label}", op, lambda r, i=i, v=v: (
            *(r(2, 6, 4), 2, r(6), r(6), 1e-5)[:i], v, *(r(2, 6, 4), 2, r(6), r(6), 1e-5)[i + 1:]))
        for op in ("group_norm", "group_norm_act")
        for arg, i, label, v in (
            ("num_groups", 1, "float", 2.0), ("num_groups", 1, "str", "2"), ("num_groups", 1, "None", None),
            ("num_groups", 1, "bool", True), ("num_groups", 1, "float-tensor", torch.tensor(2.0)),
            ("weight", 2, "list", [1.0] * 6), ("bias", 3, "float", 1.0),
            ("eps", 4, "None", None), ("eps", 4, "str", "a"),
            ("input", 0, "list", [[1.0]]),
        )
    ),
    *(
        Call(f"lrn-{arg}-{label}-{dim}d", "local_response_norm", lambda r, i=i, v=v, dim=dim: (
            *(r(2, 6, 4, *(3,) * (dim - 3)), 2, 1e-4, 0.75, 1.0)[:i], v,
            *(r(2, 6, 4, *(3,) * (dim - 3)), 2, 1e-4, 0.75, 1.0)[i + 1:]))
        for dim in (3, 4)
        for arg, i, label, v in (
            ("size", 1, "float", 2.0), ("size", 1, "None", None), ("size", 1, "str", "2"), ("size", 1, "bool", True),
            ("alpha", 2, "None", None), ("alpha", 2, "str", "a"), ("beta", 3, "None", None), ("beta", 3, "str", "a"),
            ("k", 4, "None", None), ("k", 4, "list", [1.0]), ("input", 0, "list", [[1.0]]),
        )
    ),
    # torch.Size is a C type: torch's parser prints its module ("not torch.Size")
    Call("layer_norm-weight-torch.Size", "layer_norm", lambda r: (r(2, 5), (5,), torch.Size([5]))),
    # -- found by outside testing: layer_norm's CPU mixed-dtype check comes before its shape
    # checks (a 0-dim or wrong-shaped integer parameter is the dtype error)
    Call("layer_norm-int-0d-weight", "layer_norm", lambda r: (r(2, 3), (3,), r(dtype=_i64))),
    Call("layer_norm-int-weight-wrong-shape", "layer_norm", lambda r: (r(2, 3), (3,), r(4, dtype=_i64))),
    Call("layer_norm-int-0d-input-float-weight", "layer_norm", lambda r: (r(dtype=_i64), (3,), r(3))),
    Call("layer_norm-bf16-f64-weight-0d", "layer_norm", lambda r: (r(2, 3, dtype=_bf16), (3,), r(dtype=_f64))),
    Call("layer_norm-int-input-int-weight-f32-bias", "layer_norm",
         lambda r: (r(2, 3, dtype=_i64), (3,), r(3, dtype=_i64), r(3))),
    # too many positional arguments: torch's message, not Python's "(and 1 keyword-only argument)"
    Call("bn-9-positional", "batch_norm", lambda r: (r(4, C, 5), None, None, None, None, True, 0.1, 1e-5, 1)),
    Call("in-9-positional", "instance_norm", lambda r: (r(4, C, 5), None, None, None, None, True, 0.1, 1e-5, 1)),
    Call("layer_norm-6-positional", "layer_norm", lambda r: (r(2, 5), (5,), None, None, 1e-5, 1)),
    Call("rms_norm-5-positional", "rms_norm", lambda r: (r(2, 5), (5,), None, 1e-5, 1)),
    Call("group_norm-6-positional", "group_norm", lambda r: (r(2, 6, 4), 2, None, None, 1e-5, 1)),
    Call("lrn-6-positional", "local_response_norm", lambda r: (r(2, 6, 4), 2, 1e-4, 0.75, 1.0, 1)),
    # a tensor alpha / k / beta that does not broadcast: torch's operands (div first, then alpha)
    *(
        Call(f"lrn-{arg}-tensor-not-broadcast-{dim}d", "local_response_norm", lambda r, i=i, dim=dim: (
            *(r(2, 6, 4, *(5,) * (dim - 3)), 2, 1e-4, 0.75, 1.0)[:i], r(3),
            *(r(2, 6, 4, *(5,) * (dim - 3)), 2, 1e-4, 0.75, 1.0)[i + 1:]))
        for dim in (3, 4)
        for arg, i in (("alpha", 2), ("beta", 3), ("k", 4))
    ),
    # -- norm + activation: the norm's own errors, as torch raises them before the activation
    Call("bn_act-weight-C+1", "batch_norm_act", _bn(X, weight=C + 1)),
    Call("bn_act-1xC-train", "batch_norm_act", _bn(_x(1, C))),
    Call("bn_act-eval-no-stats", "batch_norm_act", _bn(X, stats=None, training=False)),
    Call("group_norm_act-6-channels-4-groups", "group_norm_act", lambda r: (r(2, 6, 4, 5), 4)),
    Call("group_norm_act-bias-size", "group_norm_act", lambda r: (r(2, 6, 4, 5), 2, r(6), r(5))),
)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in BAD_CALLS])
def test_functional_error_matches_torch(case: Call, backend: str) -> None:
    expected = torch_error(lambda: TORCH_OPS[case.op](*case.args()))
    args = case.args()
    snapshot = _snapshot(_tensors(args))
    assert_same_error(expected, lambda: getattr(NF, case.op)(*args, backend=backend))
    assert_untouched(snapshot, f"{case.op} argument")


def test_residual_shape_mismatch_is_a_value_error() -> None:
    """No torch twin: normkit's own error says what must hold, what came, and how to fix it."""
    x, residual = torch.randn(3, 5), torch.randn(5)
    for backend in CPU_BACKENDS:
        for op in ("add_layer_norm", "add_rms_norm"):
            with pytest.raises(ValueError) as info:
                getattr(NF, op)(x, residual, (5,), backend=backend)
            assert "[3, 5]" in str(info.value) and "[5]" in str(info.value), str(info.value)


def test_complex_rms_norm_runs_on_torch_and_auto() -> None:
    """torch's rms_norm runs complex input; the reference's statistics are real, so it declines
    by name (never a silent real result) and "auto" takes torch."""
    x = torch.randn(3, 5, dtype=torch.complex64)
    expected = F.rms_norm(x, (5,))
    torch.testing.assert_close(NF.rms_norm(x, (5,)), expected)
    torch.testing.assert_close(NF.add_rms_norm(x, x, (5,))[0], F.rms_norm(x + x, (5,)))
    for op, args in (("rms_norm", (x, (5,))), ("add_rms_norm", (x, None, (5,)))):
        with pytest.raises(BackendError, match="complex input"):
            getattr(NF, op)(*args, backend="reference")


# ---- inputs that look wrong but torch accepts --------------------------------------------------


def _float64(value: Any) -> Any:
    return value.detach().double() if isinstance(value, Tensor) else value


LOOKALIKES: tuple[Call, ...] = (
    Call("bn-bf16-params-f32", "batch_norm", _bn(_x(4, C, 5, dtype=_bf16))),
    Call("bn-bf16-params-f32-eval", "batch_norm", _bn(_x(4, C, 5, dtype=_bf16), training=False)),
    Call("bn-1xC-eval", "batch_norm", _bn(_x(1, C), training=False)),
    Call("bn-eps0-eval", "batch_norm", _bn(X, eps=0.0, training=False)),
    Call("bn-empty-batch-wrong-C", "batch_norm", _bn(_x(0, C, 4), stats=C + 1, weight=C + 1, bias=C + 1)),
    Call("bn-empty-batch-eval-no-stats", "batch_norm", _bn(_x(0, C, 4), stats=None, training=False)),
    Call("in-bf16-params-f32", "instance_norm", _bn(_x(4, C, 5, dtype=_bf16))),
    Call("in-f64-stats-f32", "instance_norm", _bn(_x(2, C, 4, dtype=_f64), weight=None, bias=None)),
    Call("in-f64-stats-f32-use_input_stats-false", "instance_norm",
         _bn(_x(2, C, 4, dtype=_f64), weight=None, bias=None, training=False)),
    Call("in-f32-stats-bf16", "instance_norm", _bn(X, stats=(C, _bf16, "cpu"), weight=None, bias=None)),
    Call("layer_norm-bf16-params-f32", "layer_norm", lambda r: (r(3, 5, dtype=_bf16), (5,), r(5), r(5))),
    Call("group_norm-bf16-params-f32", "group_norm", lambda r: (r(2, 6, 4, dtype=_bf16), 2, r(6), r(6))),
    Call("rms_norm-bf16-weight-f32", "rms_norm", lambda r: (r(3, 5, dtype=_bf16), (5,), r(5))),
    Call("rms_norm-f32-weight-f64", "rms_norm", lambda r: (r(3, 5), (5,), r(5, dtype=_f64))),
    Call("rms_norm-f64-weight-f32", "rms_norm", lambda r: (r(3, 5, dtype=_f64), (5,), r(5))),
    Call("rms_norm-f32-weight-bf16", "rms_norm", lambda r: (r(3, 5), (5,), r(5, dtype=_bf16))),
    # torch averages the integer squares in integer arithmetic (avg_pool truncates): alpha=1 shows it
    Call("lrn-int64", "local_response_norm", lambda r: (r(2, 6, 4, dtype=_i64), 3, 1.0)),
    Call("lrn-int64-4d", "local_response_norm", lambda r: (r(2, 6, 4, 5, dtype=_i64), 2, 1.0)),
    Call("lrn-empty-size0", "local_response_norm", lambda r: (r(0, 6, 4), 0)),
    # eps=None on half-precision input is finfo(float32).eps in torch (its opmath dtype), not
    # finfo(bf16).eps: only inputs of small magnitude show the difference.
    Call("rms_norm-bf16-eps-default", "rms_norm", lambda r: (r.small(4, 64, dtype=_bf16), (64,))),
    Call("rms_norm-f16-weight-f16-eps-default", "rms_norm",
         lambda r: (r.small(4, 64, dtype=torch.float16), (64,), r(64, dtype=torch.float16))),
    Call("add_rms_norm-bf16-eps-default", "add_rms_norm",
         lambda r: (r.small(4, 64, dtype=_bf16), r.small(4, 64, dtype=_bf16), (64,))),
    # C = 0 without parameters runs in ATen (an empty output), on every normkit backend too
    Call("bn-C0-train", "batch_norm", _bn(_x(4, 0, 5), stats=0, weight=None, bias=None)),
    Call("bn-C0-eval", "batch_norm", _bn(_x(4, 0, 5), stats=0, weight=None, bias=None, training=False)),
    Call("in-C0", "instance_norm", _bn(_x(4, 0, 5), stats=None, weight=None, bias=None)),
    Call("group_norm-C0", "group_norm", lambda r: (r(4, 0, 5), 1)),
    Call("lrn-C0", "local_response_norm", lambda r: (r(4, 0, 5), 2)),
    # argument types torch's parser accepts: numbers of any kind, 0-dim tensors, sequences of ints
    Call("bn-momentum-0d-tensor", "batch_norm",
         lambda r: (r(4, C, 5), r(C), r.var(C), r(C), r(C), True, torch.tensor(0.3))),
    Call("bn-eps-0d-tensor", "batch_norm",
         lambda r: (r(4, C, 5), r(C), r.var(C), r(C), r(C), True, 0.1, torch.tensor(1e-3))),
    Call("bn-momentum-int", "batch_norm", lambda r: (r(4, C, 5), r(C), r.var(C), r(C), r(C), True, 1)),
    Call("in-momentum-0d-tensor", "instance_norm",
         lambda r: (r(4, C, 5), r(C), r.var(C), None, None, True, torch.tensor(0.3))),
    Call("layer_norm-shape-list", "layer_norm", lambda r: (r(2, 4, 5), [4, 5], r(4, 5), r(4, 5))),
    Call("layer_norm-shape-size", "layer_norm", lambda r: (r(2, 4, 5), torch.Size([5]), r(5), r(5))),
    Call("layer_norm-shape-0d-tensor-element", "layer_norm", lambda r: (r(2, 4, 5), (torch.tensor(5),), r(5), r(5))),
    Call("layer_norm-eps-int", "layer_norm", lambda r: (r(2, 4, 5), (5,), r(5), r(5), 1)),
    Call("layer_norm-eps-0d-tensor", "layer_norm", lambda r: (r(2, 4, 5), (5,), r(5), r(5), torch.tensor(1e-2))),
    Call("rms_norm-eps-0d-tensor", "rms_norm", lambda r: (r(2, 4, 5), (5,), r(5), torch.tensor(1e-2))),
    # torch's rms_norm is composite and runs complex input (the reference declines it)
    Call("rms_norm-complex64", "rms_norm", lambda r: (r(3, 5).to(torch.complex64), (5,), r(5))),
    Call("rms_norm-complex128-eps", "rms_norm", lambda r: (r(3, 5).to(torch.complex128), (5,), None, 1e-3)),
)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in LOOKALIKES])
def test_lookalike_input_runs_like_torch(case: Call, backend: str) -> None:
    """torch runs these; normkit must run them too, with torch's result and state updates."""
    torch_args, args = case.args(), case.args()
    ref_args = [_float64(a) for a in case.args()]
    expected = TORCH_OPS[case.op](*torch_args)
    reference = TORCH_OPS[case.op](*ref_args)
    try:
        actual = getattr(NF, case.op)(*args, backend=backend)
    except BackendError as e:  # an optional backend may decline a call; the built-in ones may not
        # (except the reference on complex input: see test_complex_rms_norm_runs_on_torch_and_auto)
        if backend in MUST_RUN and not (backend == "reference" and any(t.is_complex() for t in _tensors(args))):
            raise
        pytest.skip(f"backend {backend!r} declines this call: {e}")
    outputs = zip(*(o if isinstance(o, tuple) else (o,) for o in (actual, expected, reference)), strict=True)
    for i, (a, e, ref) in enumerate(outputs):
        assert_close_to_reference(a, e, ref, name=f"output {i}")
    for i, (a, e, ref) in enumerate(zip(args, torch_args, ref_args, strict=True)):
        if not isinstance(a, Tensor):
            continue
        if a.is_floating_point():  # running statistics move as torch's do (or stay put)
            assert_close_to_reference(a, e, ref, name=f"argument {i} after the call")
        else:
            assert torch.equal(a, e), f"argument {i} changed"


# ---- bad module calls --------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleCall:
    """``Module(*args, **kwargs)`` (torch.nn's and normkit's) called on an input of ``shape``."""

    module: str
    args: tuple[Any, ...]
    shape: tuple[int, ...]
    kwargs: tuple[tuple[str, Any], ...] = ()
    x_dtype: torch.dtype = torch.float32
    train: bool = True
    note: str = ""

    @property
    def id(self) -> str:
        parts = [self.module, "x".join(map(str, self.shape)) or "scalar", str(self.x_dtype).removeprefix("torch.")]
        parts += ([f"{k}={v}" for k, v in self.kwargs] + ([] if self.train else ["eval"])
                  + ([self.note] if self.note else []))
        return "-".join(parts)

    def build(self, lib: Any, **extra: Any) -> nn.Module:
        module = getattr(lib, self.module)(*self.args, **dict(self.kwargs), **extra)
        return randomize_(module, seed_of(self.id)).train(self.train)

    def input(self) -> Tensor:
        return Rand(seed_of(self.id, "x"))(*self.shape, dtype=self.x_dtype)


def _m(module: str, args: tuple[Any, ...], shape: tuple[int, ...], x_dtype: torch.dtype = _f32, train: bool = True,
       note: str = "", **kwargs: Any) -> ModuleCall:
    return ModuleCall(module, args, shape, tuple(kwargs.items()), x_dtype, train, note)


_TRACKED = {"affine": True, "track_running_stats": True}  # InstanceNorm with every tensor it can hold

BAD_MODULE_CALLS: tuple[ModuleCall, ...] = (
    # wrong rank, each module: one rank too low and one too high, train and eval
    *(
        _m(name, (C,), shape, train=train, **kw)
        for name, shapes, kw in (
            ("BatchNorm1d", ((C,), (2, C, 4, 5)), {}),
            ("BatchNorm2d", ((2, C, 4), (2, C, 4, 5, 6)), {}),
            ("BatchNorm3d", ((2, C, 4, 5), (2, C, 4, 5, 6, 7)), {}),
            ("InstanceNorm1d", ((C,), (2, C, 4, 5)), _TRACKED),
            ("InstanceNorm2d", ((C, 4), (2, C, 4, 5, 6)), _TRACKED),
            ("InstanceNorm3d", ((C, 4, 5), (2, C, 4, 5, 6, 7)), _TRACKED),
        )
        for shape in shapes
        for train in (True, False)
    ),
    # wrong channel count
    _m("BatchNorm1d", (C,), (4, C + 1)),
    _m("BatchNorm2d", (C,), (2, C + 1, 4, 5)),
    _m("BatchNorm2d", (C,), (2, C - 1, 4, 5), train=False),
    _m("BatchNorm3d", (C,), (2, C + 1, 2, 3, 4), affine=False),
    _m("InstanceNorm1d", (C,), (2, C + 1, 5), affine=True),
    _m("InstanceNorm2d", (C,), (2, C + 1, 4, 5), **_TRACKED),
    _m("InstanceNorm2d", (C,), (C + 1, 4, 5), note="unbatched", affine=True),
    _m("InstanceNorm3d", (C,), (2, C + 1, 2, 3, 4), track_running_stats=True),  # no affine: fails in the op
    # one value per channel in training
    _m("BatchNorm1d", (C,), (1, C)),
    _m("BatchNorm1d", (C,), (1, C, 1)),
    _m("BatchNorm2d", (C,), (1, C, 1, 1)),
    _m("BatchNorm3d", (C,), (1, C, 1, 1, 1), momentum=None),
    _m("InstanceNorm1d", (C,), (4, C, 1), **_TRACKED),
    _m("InstanceNorm1d", (C,), (C, 1), note="unbatched", **_TRACKED),
    _m("InstanceNorm2d", (C,), (2, C, 1, 1), **_TRACKED),
    _m("InstanceNorm3d", (C,), (2, C, 1, 1, 1)),
    _m("GroupNorm", (6, 6), (1, 6)),
    # eps
    _m("BatchNorm2d", (C,), (2, C, 4, 5), eps=0.0),
    _m("BatchNorm2d", (C,), (2, C, 4, 5), eps=-1e-3),
    _m("BatchNorm1d", (C,), (4, C), eps=-1e-3, train=False),
    # GroupNorm / LayerNorm / RMSNorm shapes
    _m("GroupNorm", (2, 6), (2, 5, 4)),
    _m("GroupNorm", (2, 6), (2, 8, 4), note="divisible-but-not-6"),
    _m("GroupNorm", (2, 6), (6,)),
    _m("LayerNorm", ((4, 5),), (2, 5, 4)),
    _m("LayerNorm", ((2, 3, 4),), (3, 4)),
    _m("RMSNorm", ((4, 5),), (2, 5, 4)),
    _m("RMSNorm", ((2, 3, 4),), (3, 4)),
    _m("LocalResponseNorm", (2,), (2, 6)),
    _m("LocalResponseNorm", (0,), (2, 6, 4, 5)),
    # dtypes
    _m("BatchNorm2d", (C,), (2, C, 4, 5), x_dtype=_f64),
    _m("BatchNorm2d", (C,), (2, C, 4, 5), x_dtype=_f64, train=False),
    _m("BatchNorm2d", (C,), (2, C, 4, 5), dtype=_f64),
    _m("BatchNorm1d", (C,), (4, C), dtype=_bf16),
    _m("InstanceNorm2d", (C,), (2, C, 4, 5), affine=True, dtype=_f64),
    _m("LayerNorm", (5,), (3, 5), dtype=_f64),
    _m("LayerNorm", (5,), (3, 5), x_dtype=_f64),
    _m("GroupNorm", (2, 6), (2, 6, 4), dtype=_bf16),
    # integer input
    _m("BatchNorm2d", (C,), (2, C, 4, 5), x_dtype=_i64),
    _m("BatchNorm1d", (C,), (4, C), x_dtype=_i64, train=False),
    _m("InstanceNorm2d", (C,), (2, C, 4, 5), x_dtype=_i64, **_TRACKED),
    _m("InstanceNorm1d", (C,), (2, C, 5), x_dtype=_i64),
    _m("LayerNorm", (5,), (3, 5), x_dtype=_i64),
    _m("RMSNorm", (5,), (3, 5), x_dtype=_i64),
    _m("GroupNorm", (2, 6), (2, 6, 4), x_dtype=_i64),
    # parameters and buffers on another device
    _m("BatchNorm2d", (C,), (2, C, 4, 5), device="meta"),
    _m("BatchNorm2d", (C,), (2, C, 4, 5), device="meta", train=False),
    _m("InstanceNorm2d", (C,), (2, C, 4, 5), device="meta", **_TRACKED),
    _m("LayerNorm", (5,), (3, 5), device="meta"),
    _m("RMSNorm", (5,), (3, 5), device="meta"),
    _m("GroupNorm", (2, 6), (2, 6, 4), device="meta"),
)


def _module_state(module: nn.Module) -> list[tuple[Tensor, Tensor, int]]:
    return _snapshot([t for _, t in module.named_parameters()] + [t for _, t in module.named_buffers()])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in BAD_MODULE_CALLS])
def test_module_error_matches_torch_and_keeps_state(case: ModuleCall, backend: str) -> None:
    expected = torch_error(lambda: case.build(nn)(case.input()))
    module = case.build(normkit, backend=backend)
    state = _module_state(module)
    assert_same_error(expected, lambda: module(case.input()))
    assert_untouched(state, f"{case.module} parameter/buffer")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("num_groups", "num_channels"), [(4, 6), (5, 6), (12, 6), (0, 6)])
def test_group_norm_constructor_error_matches_torch(num_groups: int, num_channels: int, backend: str) -> None:
    expected = torch_error(lambda: nn.GroupNorm(num_groups, num_channels))
    assert_same_error(expected, lambda: normkit.GroupNorm(num_groups, num_channels, backend=backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_lazy_batch_norm_channel_count_change(backend: str, train: bool) -> None:
    """Seed 002: a LazyBatchNorm2d materialized on 3 channels (after a 2->3 conv) and then
    called with 4. torch raises; so must normkit, with nothing changed. (torch itself counts
    the failed batch in num_batches_tracked before failing; normkit does not, and that part is
    deliberately not compared with torch.)"""
    conv = nn.Conv2d(2, 3, 1)
    first, second = Rand(seed_of("seed002", 1))(2, 2, 7, 7), Rand(seed_of("seed002", 2))(2, 4, 7, 7)
    modules = {}
    for lib in (nn, normkit):
        extra = {"backend": backend} if lib is normkit else {}
        lazy = lib.LazyBatchNorm2d(**extra)
        with torch.no_grad():
            try:
                lazy(conv(first))
            except BackendError as e:  # an optional backend may decline the valid first call
                if backend in MUST_RUN:
                    raise
                pytest.skip(f"backend {backend!r} declines this call: {e}")
        modules[lib] = randomize_(lazy, seed_of("seed002")).train(train)
    assert type(modules[normkit]) is normkit.BatchNorm2d and modules[normkit].num_features == 3
    expected = torch_error(lambda: modules[nn](second))
    assert str(expected) == "running_mean should contain 4 elements not 3"  # what seed 002 observed
    state = _module_state(modules[normkit])
    assert_same_error(expected, lambda: modules[normkit](second))
    assert_untouched(state, "LazyBatchNorm2d parameter/buffer")
    assert modules[normkit].num_batches_tracked.item() == 2  # randomize_'s value: the failed batch is not counted


# ---- backend names -----------------------------------------------------------------------------


def _valid_layer_norm() -> tuple[Tensor, tuple[int, ...], Tensor, Tensor]:
    r = Rand(seed_of("valid layer_norm"))
    return r(3, 5), (5,), r(5), r(5)


def _assert_lists_known_names(error: BaseException, name: str) -> None:
    text = str(error)
    assert repr(name) in text, text
    for known in [*normkit.backends(), "auto"]:
        assert repr(known) in text, f"{known!r} missing from: {text}"


def test_unknown_backend_name_is_a_value_error_listing_known_names() -> None:
    with pytest.raises(ValueError) as info:
        NF.layer_norm(*_valid_layer_norm(), backend="nope")
    _assert_lists_known_names(info.value, "nope")


def test_unknown_backend_in_module_fails_at_construction_and_at_call_keeps_state() -> None:
    with pytest.raises(ValueError) as info:
        normkit.BatchNorm2d(C, backend="nope")
    _assert_lists_known_names(info.value, "nope")
    module = randomize_(normkit.BatchNorm2d(C), seed_of("nope module")).train()
    module.backend = "nope"  # a plain attribute: checked when the module runs
    state = _module_state(module)
    with pytest.raises(ValueError) as info:
        module(Rand(1)(2, C, 4, 5))
    _assert_lists_known_names(info.value, "nope")
    assert_untouched(state, "BatchNorm2d parameter/buffer")


def test_use_backend_unknown_name_fails_at_the_with_line() -> None:
    entered = False
    before = normkit.current_backend()
    with pytest.raises(ValueError) as info:
        with normkit.use_backend("nope"):
            entered = True
    assert not entered, "use_backend('nope') entered its block: the misspelt name would fail only at a later call"
    _assert_lists_known_names(info.value, "nope")
    assert normkit.current_backend() == before


def test_unknown_backend_from_environment_fails_at_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NORMKIT_BACKEND", "nope")
    with pytest.raises(ValueError) as info:
        NF.layer_norm(*_valid_layer_norm())
    _assert_lists_known_names(info.value, "nope")


_PICKY_REASON = "picky runs layer_norm only for an even width"


@pytest.fixture
def picky(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A registered backend that declines some calls; returns the log of the calls it ran."""
    ran: list[str] = []

    def layer_norm(*args: Any) -> Tensor:
        ran.append("layer_norm")
        return F.layer_norm(*args)

    def batch_norm(*args: Any) -> Tensor:
        ran.append("batch_norm")
        return F.batch_norm(*args)

    def odd_width(input: Tensor, *args: Any) -> str | None:
        return _PICKY_REASON if input.shape[-1] % 2 else None

    backend = Backend("picky", {"layer_norm": OpImpl(layer_norm, unsupported=odd_width),
                                "batch_norm": OpImpl(batch_norm, unsupported=odd_width)})
    monkeypatch.setitem(_REGISTRY, "picky", backend)
    return ran


def test_named_backend_that_declines_raises_backend_error_never_falls_back(picky: list[str]) -> None:
    args = _valid_layer_norm()  # width 5: declined
    with pytest.raises(BackendError, match=_PICKY_REASON):
        NF.layer_norm(*args, backend="picky")
    with normkit.use_backend("picky"):
        with pytest.raises(BackendError, match=_PICKY_REASON):
            NF.layer_norm(*args)
        with pytest.raises(BackendError, match=_PICKY_REASON):
            normkit.LayerNorm(5)(args[0])
        with pytest.raises(BackendError, match="has no group_norm"):
            NF.group_norm(torch.randn(2, 4, 3), 2)
    assert picky == []
    NF.layer_norm(torch.randn(3, 4), (4,), backend="picky")  # an even width: it runs
    assert picky == ["layer_norm"]
    assert issubclass(BackendError, NotImplementedError)


def test_declined_module_call_keeps_state(picky: list[str]) -> None:
    module = randomize_(normkit.BatchNorm2d(C, backend="picky"), seed_of("picky module")).train()
    state = _module_state(module)
    with pytest.raises(BackendError, match=_PICKY_REASON):
        module(Rand(2)(2, C, 4, 5))
    assert_untouched(state, "BatchNorm2d parameter/buffer")
    assert picky == []


def test_unavailable_backend_raises_backend_error(monkeypatch: pytest.MonkeyPatch) -> None:
    absent = Backend("absent", {"layer_norm": OpImpl(F.layer_norm)}, is_available=lambda: False)
    monkeypatch.setitem(_REGISTRY, "absent", absent)
    with pytest.raises(BackendError, match="not available"):
        NF.layer_norm(*_valid_layer_norm(), backend="absent")
    assert "absent" not in normkit.backends()


_TRITON_ON_CPU = textwrap.dedent(
    """
    import torch, normkit, normkit.functional as NF
    try:
        NF.layer_norm(torch.randn(3, 8), (8,), backend="triton")
    except normkit.BackendError as e:
        print("BackendError", e)
    except Exception as e:
        print("WRONG", type(e).__name__, e)
    else:
        print("RAN")
    """
)


def test_triton_on_cpu_without_interpreter_raises_backend_error() -> None:
    """Asked for by name, triton on CPU tensors without TRITON_INTERPRET=1 raises BackendError,
    whether triton is installed or not and whether a GPU is present or not; never a silent
    fallback to another backend. In a fresh process: the lazy backend registry is per process."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NORMKIT_BACKEND")}
    done = subprocess.run([sys.executable, "-c", _TRITON_ON_CPU], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("BackendError"), done.stdout + done.stderr



# ---- argument types of the ops without a torch twin, and the precision options ---------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_residual_ops_argument_types_name_the_op_and_its_positions(backend: str) -> None:
    """add_layer_norm / add_rms_norm take ``residual`` at position 2: their argument-type errors
    are torch's TypeError, naming them and their own positions."""
    x = torch.randn(3, 5)
    cases = {
        ("add_layer_norm", "normalized_shape"): (
            (x, x, 5),
            "add_layer_norm(): argument 'normalized_shape' (position 3) must be tuple of ints, not int"),
        ("add_layer_norm", "eps"): (
            (x, x, (5,), None, None, None),
            "add_layer_norm(): argument 'eps' (position 6) must be float, not NoneType"),
        ("add_rms_norm", "residual"): (
            (x, [1.0], (5,)), "add_rms_norm(): argument 'residual' (position 2) must be Tensor, not list"),
        ("add_rms_norm", "weight"): (
            (x, x, (5,), "w"), "add_rms_norm(): argument 'weight' (position 4) must be Tensor, not str"),
    }
    for (op, _), (args, message) in cases.items():
        with pytest.raises(TypeError) as info:
            getattr(NF, op)(*args, backend=backend)
        assert str(info.value) == message


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("option", ["out_dtype", "stats_dtype", "residual_dtype"])
def test_dtype_option_given_as_a_string_is_a_value_error(option: str, backend: str) -> None:
    """``out_dtype="float32"`` used to fail with AttributeError deep in the dispatch."""
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match=rf"{option} must be .*torch\.float32.*got 'float32'"):
        NF.add_layer_norm(x, x, (5,), **{option: "float32"}, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_running_statistics_that_require_grad_are_fine_outside_autograd(backend: str) -> None:
    """ATen refuses them only while grad mode is on: under no_grad the update runs, as torch's."""
    x = torch.randn(4, C, 5)
    stats = {lib: (torch.zeros(C, requires_grad=True), torch.ones(C, requires_grad=True)) for lib in ("torch", "nk")}
    with torch.no_grad():
        expected = F.batch_norm(x, *stats["torch"], training=True)
        actual = NF.batch_norm(x, *stats["nk"], training=True, backend=backend)
    torch.testing.assert_close(actual, expected)
    for a, e in zip(stats["nk"], stats["torch"], strict=True):
        torch.testing.assert_close(a, e)


# ---- Lazy modules: a failed first call materializes nothing -----------------------------------


LAZY_BAD_FIRST_CALLS: tuple[tuple[str, tuple[int, ...], torch.dtype], ...] = (
    ("LazyBatchNorm1d", (2, C, 4, 5), _f32),  # wrong rank
    ("LazyBatchNorm1d", (1, C), _f32),  # one value per channel in training
    ("LazyBatchNorm2d", (2, C, 4), _f32),
    ("LazyBatchNorm2d", (2, 0, 4, 4), _f32),  # no channels: ATen's IndexError on the empty weight
    ("LazyBatchNorm3d", (2, C, 2, 2, 2), _i64),  # integer input
    ("LazyInstanceNorm1d", (2, C, 4, 5), _f32),
    ("LazyInstanceNorm2d", (2, C, 4, 5), _i64),
    ("LazyInstanceNorm3d", (2, C, 1, 1, 1), _f32),  # one spatial element
)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("name", "shape", "dtype"), LAZY_BAD_FIRST_CALLS,
                         ids=[f"{n}-{'x'.join(map(str, s))}-{str(d)[6:]}" for n, s, d in LAZY_BAD_FIRST_CALLS])
def test_lazy_module_failed_first_call_materializes_nothing(name: str, shape: tuple[int, ...], dtype: torch.dtype,
                                                            backend: str) -> None:
    """torch materializes a Lazy module in a pre-hook, before its forward checks the input: a bad
    first call leaves it sized by the bad input. normkit raises torch's error and leaves the
    module lazy, so the next (good) call sizes it and runs as torch's first good call."""
    bad = Rand(seed_of(name, "bad"))(*shape, dtype=dtype)
    expected = torch_error(lambda: getattr(nn, name)()(bad))
    module = getattr(normkit, name)(backend=backend)
    assert_same_error(expected, lambda: module(bad))
    assert type(module) is getattr(normkit, name)
    assert module.has_uninitialized_params() and module.num_features == 0
    assert hasattr(module, "_initialize_hook") and len(module._forward_pre_hooks) == 1
    good = Rand(seed_of(name, "good"))(2, 4, *(5,) * int(name[-2]))  # the rank the module takes
    reference = getattr(nn, name)()
    expected_y = reference(good)
    y = module(good)
    assert type(module).__name__ == name.removeprefix("Lazy") and module.num_features == 4
    torch.testing.assert_close(y, expected_y)
    for (key, value), (_, ref) in zip(module.state_dict().items(), reference.state_dict().items(), strict=True):
        torch.testing.assert_close(value, ref, msg=key)
