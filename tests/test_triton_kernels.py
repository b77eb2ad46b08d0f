"""The Triton row-norm kernels against a float64 oracle: forward, backward, determinism, compile.

Runs on CUDA when there is a device, else on CPU under Triton's interpreter (``TRITON_INTERPRET=1``
must be in the environment before Triton is imported; ``make test`` sets it). Shapes are small
because the interpreter runs every program in Python.

Accuracy is the self-calibrating bound of STYLE.md: the kernel's max error against the float64
oracle may be at most twice the error of torch's own op run in the same (low) precision, plus
``kernel_bound.ATOL[dtype]`` times the output's magnitude.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from kernel_bound import assert_within_bound  # noqa: E402
from normkit import functional  # noqa: E402
from normkit.backends import get_backend  # noqa: E402
from normkit.ops.triton import backend as triton_backend  # noqa: E402
from normkit.ops.triton import row_norm as T  # noqa: E402

# torch's own rms_norm warns when it cannot fuse a mixed-dtype call (the low-precision baseline).
pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")

f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16



def _add_norm(norm: Callable, round_residual: Callable, cast_y: bool) -> Callable:
    """``y = norm(residual_out)`` with ``residual_out = round(x + residual)``; y in x's dtype
    when ``cast_y`` (the float64 oracle keeps float64)."""

    def add_norm(x, residual, normalized_shape, *params, residual_dtype, y_dtype, **kw):
        r = round_residual(x if residual is None else x + residual, residual_dtype)
        # ATen's CPU kernels refuse a weight narrower than an fp32 input; upcasting is exact.
        params = [p.to(r.dtype) if isinstance(p, torch.Tensor) and p.itemsize < r.itemsize
                  else p for p in params]
        y = norm(r, normalized_shape, *params, **kw)
        return (y.to(y_dtype) if cast_y else y), r

    return add_norm


def _then_act(norm: Callable) -> Callable:
    """``act(norm(x, groups, weight, bias, eps))``: norm + activation composed."""

    def norm_act(x, groups, weight, bias, eps, act):
        return functional.activate(act, norm(x, groups, weight, bias, eps))

    return norm_act


def _stored(r: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """r rounded to ``dtype`` as the kernel stores it, with an identity gradient."""
    return r + (r.to(dtype).to(r.dtype) - r).detach()


# The oracle: torch.nn.functional in float64 on upcast inputs (normkit.reference can replace it
# here, one entry per op).
ORACLE = SimpleNamespace(
    layer_norm=F.layer_norm, rms_norm=F.rms_norm, group_norm=F.group_norm,
    instance_norm=F.instance_norm, group_norm_act=_then_act(F.group_norm),
    add_layer_norm=_add_norm(F.layer_norm, _stored, cast_y=False),
    add_rms_norm=_add_norm(F.rms_norm, _stored, cast_y=False),
)
# The same ops run by torch in the inputs' own precision: the calibration of the bound.
LOW_PRECISION = SimpleNamespace(
    layer_norm=F.layer_norm, rms_norm=F.rms_norm, group_norm=F.group_norm,
    instance_norm=F.instance_norm, group_norm_act=_then_act(F.group_norm),
    add_layer_norm=_add_norm(F.layer_norm, torch.Tensor.to, cast_y=True),
    add_rms_norm=_add_norm(F.rms_norm, torch.Tensor.to, cast_y=True),
)


def _triton_add_norm(fn: Callable) -> Callable:
    def add_norm(x, residual, normalized_shape, *params, residual_dtype, y_dtype, **kw):
        return tuple(fn(x, residual, normalized_shape, *params, residual_dtype=residual_dtype, **kw))

    return add_norm


TRITON = SimpleNamespace(
    layer_norm=T.layer_norm, rms_norm=T.rms_norm, group_norm=T.group_norm,
    instance_norm=T.instance_norm, add_layer_norm=_triton_add_norm(T.add_layer_norm),
    add_rms_norm=_triton_add_norm(T.add_rms_norm), group_norm_act=T.group_norm_act,
)


class Case(NamedTuple):
    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype = f32
    weight: bool = True
    bias: bool = True
    param_dtype: torch.dtype | None = None  # None: the input's dtype
    residual: bool = False  # add_* ops: pass a residual (else None)
    residual_dtype: torch.dtype | None = None  # add_* ops: None means x.dtype
    row_pad: int = 0  # > 0: the input is a view whose rows are this many elements apart + width
    block_n: int | None = None  # force this tile size (small: the chunked two-pass path)
    norm_ndim: int = 1  # layer/rms: len(normalized_shape)
    groups: int = 1  # group_norm
    channels_last: bool = False
    running_stats: bool = False  # instance_norm
    act: str | None = None  # group_norm_act

    def __str__(self) -> str:
        flags = [self.op, "x".join(map(str, self.shape)), str(self.dtype).removeprefix("torch.")]
        flags += [f for f, on in (("noW", not self.weight), ("noB", not self.bias),
                                  ("res", self.residual), ("chlast", self.channels_last),
                                  ("stats", self.running_stats)) if on]
        flags += [f"{k}={v}" for k, v in (("P", self.param_dtype), ("R", self.residual_dtype),
                                          ("pad", self.row_pad), ("block", self.block_n),
                                          ("G", self.groups), ("act", self.act))
                  if v not in (None, 0, 1)]
        return "-".join(str(f).replace("torch.", "") for f in flags)


CASES = [
    # trailing-axis norms: widths 1, primes, non-powers of two, one row, many rows
    Case("layer_norm", (1, 1)),
    Case("layer_norm", (5, 7)),
    Case("layer_norm", (64, 131), bf16),
    Case("layer_norm", (3, 4, 5), f16, norm_ndim=2),
    Case("layer_norm", (6, 40), weight=False, bias=False),
    Case("layer_norm", (6, 40), f16, weight=False),
    Case("layer_norm", (17, 96), bf16, param_dtype=f32),
    Case("layer_norm", (9, 300), block_n=64),  # chunked; 300 is not a multiple of the tile
    Case("layer_norm", (9, 300), bf16, bias=False, block_n=32),
    Case("layer_norm", (12, 50), bf16, row_pad=14),  # row-strided view, no copy
    Case("layer_norm", (2, 3, 33), row_pad=5, block_n=16),  # strided and chunked
    Case("rms_norm", (1, 1)),
    Case("rms_norm", (33, 131), bf16),
    Case("rms_norm", (7, 257), f16, block_n=64),
    Case("rms_norm", (16, 64), weight=False),
    Case("rms_norm", (16, 96), bf16, param_dtype=f32),
    Case("rms_norm", (10, 70), row_pad=6),
    # fused residual add
    Case("add_layer_norm", (8, 96), bf16, residual=True, residual_dtype=f32),
    Case("add_layer_norm", (8, 96), bf16, residual=True),
    Case("add_layer_norm", (5, 200), residual=True, block_n=64),
    Case("add_layer_norm", (4, 33), f16),  # residual=None: residual_out is x
    Case("add_layer_norm", (4, 33), bf16, residual_dtype=f32, param_dtype=f32),
    Case("add_rms_norm", (8, 128), bf16, residual=True, residual_dtype=f32, param_dtype=f32),
    Case("add_rms_norm", (6, 150), f16, residual=True, block_n=32),
    Case("add_rms_norm", (12, 48), bf16, residual=True, row_pad=16),
    # channel norms: (N, C, *spatial); rows are (sample, group) / (sample, channel)
    Case("group_norm", (2, 6, 5, 3), groups=3),
    Case("group_norm", (3, 8, 1, 1), bf16, groups=2),  # 1x1 spatial, 4 channels per group
    Case("group_norm", (2, 5, 7), groups=5),  # odd channel count, one channel per group
    Case("group_norm", (2, 6, 9, 9), groups=2, block_n=16),  # chunked along the spatial axis
    Case("group_norm", (2, 10, 3), groups=2, block_n=8),  # tiles of 2 channels x 4, chunked
    Case("group_norm", (1, 9, 4, 4), f16, param_dtype=f32, groups=3),
    Case("group_norm", (2, 4, 3, 3), bf16, weight=False, bias=False, groups=2),
    Case("group_norm", (2, 6, 4, 4), groups=3, channels_last=True),  # read in place, stride C
    Case("group_norm", (2, 6, 3, 5), bf16, param_dtype=f32, groups=2, channels_last=True, block_n=8),
    Case("group_norm", (4, 12), groups=4),  # no spatial axes
    # GroupNorm + activation in one pass; the backward recomputes the activation's input
    Case("group_norm_act", (2, 6, 5, 3), groups=3, act="silu"),
    Case("group_norm_act", (2, 6, 9, 9), bf16, param_dtype=f32, groups=2, block_n=16, act="gelu"),
    Case("group_norm_act", (3, 8, 1, 1), f16, bias=False, groups=2, act="relu"),
    Case("instance_norm", (2, 3, 5, 5), running_stats=True),
    Case("instance_norm", (3, 5, 7), bf16, param_dtype=f32, running_stats=True),
    Case("instance_norm", (2, 3, 6, 6), f16, weight=False, bias=False, block_n=8),
    Case("instance_norm", (2, 3, 4, 5), bf16, channels_last=True, running_stats=True),
    Case("group_norm_act", (2, 6, 3, 4), groups=2, channels_last=True, block_n=8, act="silu"),
]


class Inputs(NamedTuple):
    args: tuple  # positional arguments of the op, tensors included
    kwargs: dict
    tensors: dict[str, torch.Tensor]  # the ones to differentiate, by name


def make_inputs(case: Case, seed: int = 0) -> Inputs:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, dtype: torch.dtype = case.dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)

    shape = case.shape
    if case.row_pad:
        x = rand(*shape[:-1], shape[-1] + case.row_pad)[..., : shape[-1]]
    else:
        x = rand(*shape)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    param_dtype = case.param_dtype or case.dtype
    trailing = case.op in ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
    param_shape = shape[len(shape) - case.norm_ndim:] if trailing else shape[1:2]
    tensors = {"x": x}
    if case.residual:
        tensors["residual"] = rand(*shape, dtype=case.residual_dtype or case.dtype)
    if case.weight:
        tensors["weight"] = rand(*param_shape, dtype=param_dtype)
    if case.bias and "rms" not in case.op:
        tensors["bias"] = rand(*param_shape, dtype=param_dtype)
    weight, bias, residual = (tensors.get(k) for k in ("weight", "bias", "residual"))
    normalized_shape = list(param_shape)
    # RMSNorm's eps=None depends on the dtype, so the float64 oracle would use another one:
    # explicit here (test_rms_norm_default_eps_is_torchs checks the default itself).
    norm_params = (bias, 1e-5) if "layer" in case.op else (torch.finfo(f32).eps,)
    if case.op in ("layer_norm", "rms_norm"):
        return Inputs((x, normalized_shape, weight) + norm_params, {}, tensors)
    if case.op.startswith("add_"):
        args = (x, residual, normalized_shape, weight) + norm_params
        kwargs = {"residual_dtype": case.residual_dtype or case.dtype, "y_dtype": case.dtype}
        return Inputs(args, kwargs, tensors)
    if case.op == "group_norm":
        return Inputs((x, case.groups, weight, bias), {}, tensors)
    if case.op == "group_norm_act":
        return Inputs((x, case.groups, weight, bias, 1e-5, case.act), {}, tensors)
    channels = shape[1]
    stats = (rand(channels, dtype=f32), rand(channels, dtype=f32).abs()) if case.running_stats \
        else (None, None)
    return Inputs((x,) + stats + (weight, bias, True, 0.1, 1e-5), {}, tensors)


def _cast(inputs: Inputs, dtype: torch.dtype | None) -> tuple[tuple, dict[str, torch.Tensor]]:
    """The op's arguments with fresh leaves for the differentiable tensors and copies of the
    others (running stats: each run updates its own), cast to ``dtype`` unless it is None."""
    leaves = {k: t.detach().to(dtype or t.dtype).requires_grad_() for k, t in inputs.tensors.items()}
    leaf_of = {id(t): leaves[k] for k, t in inputs.tensors.items()}

    def convert(a):
        if not isinstance(a, torch.Tensor):
            return a
        if id(a) in leaf_of:
            return leaf_of[id(a)]
        return a.detach().to(dtype or a.dtype, copy=True)

    return tuple(convert(a) for a in inputs.args), leaves


def run(impl: SimpleNamespace, case: Case, inputs: Inputs, dtype: torch.dtype | None = None):
    """Outputs, gradients and updated running stats of ``case`` under ``impl``."""
    args, leaves = _cast(inputs, dtype)
    out = getattr(impl, case.op)(*args, **inputs.kwargs)
    outs = list(out) if isinstance(out, tuple) else [out]
    gen = torch.Generator().manual_seed(1)
    grads_out = [torch.randn(o.shape, generator=gen).to(device=DEVICE, dtype=o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, list(leaves.values()), grads_out)
    results = {f"out{i}": o.detach() for i, o in enumerate(outs)}
    results.update({f"d{k}": g for k, g in zip(leaves, grads, strict=True)})
    if case.running_stats:
        results.update(running_mean=args[1], running_var=args[2])
    return results


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_float64_oracle(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    if case.block_n is not None:
        monkeypatch.setenv(T.BLOCK_ENV_VAR, str(case.block_n))
    inputs = make_inputs(case)
    got = run(TRITON, case, inputs)
    want = run(ORACLE, case, inputs, torch.float64)
    low = run(LOW_PRECISION, case, inputs)
    assert_within_bound(got, want, low)
    if case.channels_last:  # the output and the input gradient keep the input's layout
        for name in ("out0", "dx"):
            assert got[name].is_contiguous(memory_format=torch.channels_last), name


@pytest.mark.gpu_schedule
@pytest.mark.parametrize("case", [
    Case("layer_norm", (40, 96), bf16, param_dtype=f32),
    Case("add_rms_norm", (24, 80), f16, residual=True, residual_dtype=f32, block_n=32),
    Case("group_norm", (4, 6, 3, 3), groups=3, block_n=4),
], ids=str)
def test_backward_is_deterministic(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    if case.block_n is not None:
        monkeypatch.setenv(T.BLOCK_ENV_VAR, str(case.block_n))
    inputs = make_inputs(case)
    first, second = run(TRITON, case, inputs), run(TRITON, case, inputs)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("dtype", [bf16, f16, f32], ids=str)
def test_rms_norm_default_eps_is_torchs(dtype: torch.dtype) -> None:
    """eps=None is finfo(float32).eps for every input dtype, as ATen does (its opmath dtype),
    not finfo(bf16).eps, which would dominate the mean square of this small input."""
    x = (torch.randn(3, 16, device=DEVICE) * 1e-2).to(dtype)
    want = T.rms_norm(x, [16], eps=torch.finfo(torch.float32).eps)
    assert torch.equal(T.rms_norm(x, [16]), want)
    assert torch.equal(T.add_rms_norm(x, None, [16]).y, want)
    torch.testing.assert_close(want, F.rms_norm(x, [16]))


def test_row_strided_input_is_not_copied() -> None:
    x = torch.randn(6, 40, device=DEVICE)[:, :32]
    assert x.reshape(-1, 32).data_ptr() == x.data_ptr()  # what _trailing_norm hands the kernel
    y = T.layer_norm(x, [32])
    torch.testing.assert_close(y, F.layer_norm(x, [32]), rtol=1e-5, atol=1e-5)


def test_invalid_block_n_is_refused() -> None:
    x = torch.randn(2, 1, 8, device=DEVICE)
    with pytest.raises(ValueError, match="power of two"):
        T.row_norm_fwd(x, None, None, None, groups=1, per_channel=False, eps=1e-5,
                       is_rms=False, residual_dtype=None, block_n=24)


def _model(x, residual, w, b, image, gw, gb):
    y = T.layer_norm(x, [x.shape[-1]], w, b)
    y, residual_out = T.add_rms_norm(y, residual, [x.shape[-1]], w, residual_dtype=f32)
    image = T.group_norm(image, 2, gw, gb)
    y = functional.layer_norm(y, [x.shape[-1]], w, b, backend="triton")  # through the registry
    return y, residual_out, image


def test_torch_compile_fullgraph_matches_eager() -> None:
    triton_backend.register()
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(*s, generator=gen).to(DEVICE) for s in
               ((6, 24), (6, 24), (24,), (24,), (2, 4, 3, 3), (4,), (4,))]
    tensors[0] = tensors[0].to(bf16)
    runs = []
    for fn in (_model, torch.compile(_model, fullgraph=True, backend="aot_eager")):
        leaves = [t.clone().requires_grad_() for t in tensors]
        outs = fn(*leaves)
        grads_out = [torch.ones_like(o) + torch.arange(o.numel(), device=DEVICE).view(o.shape) % 3
                     for o in outs]
        runs.append(outs + torch.autograd.grad(outs, leaves, grads_out))
    for eager, compiled in zip(*runs, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_backend_registration_and_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    triton_backend.register()
    backend = get_backend("triton")
    assert backend.is_available()
    x = torch.randn(4, 8, device=DEVICE)
    ops = backend.ops
    assert ops["layer_norm"].unsupported(x, [8]) is None
    assert "float64" in ops["layer_norm"].unsupported(x.double(), [8])
    assert "float64" in ops["rms_norm"].unsupported(x, [8], torch.ones(8, dtype=torch.float64))
    assert "empty" in ops["layer_norm"].unsupported(x[:0], [8])
    image = torch.randn(2, 4, 3, device=DEVICE)
    assert "use_input_stats" in ops["instance_norm"].unsupported(
        image, torch.zeros(4), torch.ones(4), use_input_stats=False)
    assert "shape" in ops["add_layer_norm"].unsupported(x, x[:2], [8])
    for name, op in ops.items():
        args = (image, 2) if name == "group_norm" else (image,) if name == "instance_norm" \
            else (x, None, [8]) if name.startswith("add_") else (x, [8])
        assert op.preferred(*args) is (DEVICE == "cuda" and name in triton_backend.MEASURED_FASTER)
        monkeypatch.setattr(triton_backend, "MEASURED_FASTER", frozenset({name}))
        assert op.preferred(*args) is (DEVICE == "cuda")
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        assert "TRITON_INTERPRET" in ops["layer_norm"].unsupported(x, [8])


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.channels_last_3d], ids=str)
def test_channel_norms_read_channels_last_input_in_place(memory_format, monkeypatch: pytest.MonkeyPatch) -> None:
    """GroupNorm/InstanceNorm hand the kernel a strided (N, C, S) view of the input itself,
    and allocate the output in the same layout: no copy either way."""
    seen = []
    launch = T.row_norm_fwd

    def spy(x, *args, **kwargs):
        seen.append(x)
        return launch(x, *args, **kwargs)

    monkeypatch.setattr(T, "row_norm_fwd", spy)
    shape = (2, 4, 3, 5) if memory_format == torch.channels_last else (2, 4, 2, 3, 2)
    x = torch.randn(shape, device=DEVICE).contiguous(memory_format=memory_format)
    for y in (T.group_norm(x, 2), T.instance_norm(x)):
        assert seen.pop().data_ptr() == x.data_ptr()
        assert y.is_contiguous(memory_format=memory_format)


class _OpNames(TorchDispatchMode):
    """The names of the ops dispatched inside the block."""

    def __enter__(self):
        self.names: list[str] = []
        super().__enter__()
        return self.names

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_add_norm_gradient_through_residual_out_alone() -> None:
    """The statistics' and an unused y's gradients are not materialized (issue 15 item 9): with
    only ``residual_out`` in the loss, its gradient flows to x and residual unchanged, the
    weight's is zero, and the eager step runs the kernels' custom-op bodies directly."""
    gen = torch.Generator().manual_seed(15)
    x, residual = (torch.randn(6, 12, generator=gen, device="cpu").to(DEVICE).requires_grad_()
                   for _ in range(2))
    weight = torch.randn(12, generator=gen).to(DEVICE).requires_grad_()
    upstream = torch.randn(6, 12, generator=gen).to(DEVICE)
    with _OpNames() as seen:
        out = T.add_rms_norm(x, residual, (12,), weight)
        out.residual_out.backward(upstream)
    assert not any(name.startswith("normkit::") for name in seen), seen
    # One zero tensor, for the unused y's gradient; none for the three statistics.
    assert seen.count("aten::zeros_like") == 1 and "aten::zeros" not in seen, seen
    assert torch.equal(x.grad, upstream) and torch.equal(residual.grad, upstream)
    assert torch.equal(weight.grad, torch.zeros_like(weight))
