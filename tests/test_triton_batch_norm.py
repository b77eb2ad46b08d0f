"""The Triton BatchNorm (normkit.ops.triton.batch_norm) against the float64 oracle.

Each case trains for a few steps (new input and random upstream gradient each step, running
statistics carried over), then runs one eval step, and compares every step's output, input /
weight / bias gradients and running statistics with :func:`normkit.reference.batch_norm` in
float64. Accuracy is the self-calibrating bound of STYLE.md: at most twice the error of
``torch.nn.functional.batch_norm`` run in the case's own precision, plus ``kernel_bound.ATOL[dtype]`` times
the magnitude of the result.

Runs on CUDA when there is a device, else under Triton's interpreter (``TRITON_INTERPRET=1``
before Triton is imported); shapes are small because the interpreter runs programs in Python.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from kernel_bound import assert_within_bound  # noqa: E402
from normkit import functional, reference  # noqa: E402
from normkit.backends import get_backend  # noqa: E402
from normkit.ops.triton import backend as triton_backend  # noqa: E402
from normkit.ops.triton import batch_norm as B  # noqa: E402

f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16

MOMENTUM, EPS = 0.1, 1e-5


class Case(NamedTuple):
    shape: tuple[int, ...]
    dtype: torch.dtype = f32
    layout: str = "contiguous"  # channels_last | channels_last_3d | sliced | sliced_spatial
    weight: bool = True
    bias: bool = True
    stats: bool = True  # running statistics (else training uses the batch's only, no eval step)
    param_dtype: torch.dtype | None = None  # None: the input's dtype
    train_steps: int = 2  # then one eval step when there are running statistics
    block_n: int | None = None  # cap the tile: many tiles and programs on small shapes
    act: str | None = None  # batch_norm_act: the activation applied in the same pass

    def __str__(self) -> str:
        flags = ["x".join(map(str, self.shape)), str(self.dtype).removeprefix("torch."), self.layout]
        flags += [f for f, on in (("noW", not self.weight), ("noB", not self.bias),
                                  ("nostats", not self.stats)) if on]
        if self.param_dtype:
            flags.append("P=" + str(self.param_dtype).removeprefix("torch."))
        flags += [f"train{self.train_steps}"] + ([f"block{self.block_n}"] if self.block_n else [])
        flags += [f"act={self.act}"] if self.act else []
        return "-".join(flags)


CASES = [
    Case((4, 3)),  # (N, C): one element per sample and channel
    Case((2, 5, 7), bf16, param_dtype=f32),
    Case((2, 3, 4, 5), f16),
    Case((2, 3, 1, 1)),  # 1x1 spatial: two values per channel
    Case((2, 5, 2, 3, 4), bf16, param_dtype=f32, layout="channels_last_3d"),
    Case((2, 3, 4, 5), layout="channels_last"),
    Case((2, 5, 6, 6), f16, layout="channels_last", block_n=16),  # tiles of 4 rows x 4 channels
    Case((2, 3, 9, 9), block_n=32),  # 21 tiles of 8 rows x 4 channels, 4 programs
    Case((2, 5, 5, 6), layout="sliced"),  # every other sample, channels 1..5: a strided view
    Case((2, 3, 4, 5), bf16, layout="sliced_spatial"),  # width sliced: the one copied layout
    Case((2, 3, 4, 4), bf16, weight=False, bias=False),
    Case((3, 5, 4), f16, param_dtype=f32, bias=False, stats=False, train_steps=1),
    Case((1, 5, 3, 3), f16, param_dtype=f32, train_steps=0),  # eval with batch 1
    Case((1, 3, 2, 2), train_steps=0, weight=False),
    # BatchNorm + activation in one pass, training then eval (both backward kernels recompute
    # the activation's input)
    Case((2, 5, 3, 4), bf16, param_dtype=f32, act="silu"),
    Case((2, 3, 4, 5), layout="channels_last", block_n=16, act="gelu"),
    Case((3, 4, 5), f16, bias=False, act="relu"),
]


def _then_act(norm, act: str | None):
    """``act(norm(...))``: the composition the fused kernels must equal."""
    return lambda *args: functional.activate(act, norm(*args))


def make_input(case: Case, gen: torch.Generator) -> torch.Tensor:
    N, C, *spatial = case.shape
    if case.layout == "sliced":
        x = torch.randn(2 * N, C + 2, *spatial, generator=gen)[::2, 1 : C + 1]
    elif case.layout == "sliced_spatial":
        x = torch.randn(N, C, *spatial[:-1], spatial[-1] + 3, generator=gen)[..., : spatial[-1]]
    else:
        x = torch.randn(case.shape, generator=gen)
    x = x.to(device=DEVICE, dtype=case.dtype)
    if case.layout.startswith("channels_last"):
        x = x.contiguous(memory_format=getattr(torch, case.layout))
    return x


def run(impl, case: Case, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every step's output, gradients and running statistics; ``dtype`` (float64) upcasts all."""
    gen = torch.Generator().manual_seed(0)
    C = case.shape[1]
    param_dtype = dtype or case.param_dtype or case.dtype

    def rand(shape, lo: float = 0.0) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * 0.5 + lo).to(device=DEVICE, dtype=param_dtype)

    params = {n: rand(C, lo).requires_grad_() for n, lo, on in
              (("weight", 1.0, case.weight), ("bias", 0.0, case.bias)) if on}
    stats = (rand(C), rand(C, 1.0).abs()) if case.stats else (None, None)
    steps = [True] * case.train_steps + ([False] if case.stats else [])
    results = {}
    for step, training in enumerate(steps):
        x = make_input(case, gen)
        if dtype is not None:
            x = x.to(dtype)
        x.requires_grad_()
        y = impl(x, *stats, params.get("weight"), params.get("bias"), training, MOMENTUM, EPS)
        dy = torch.randn(y.shape, generator=gen).to(device=DEVICE, dtype=y.dtype)
        leaves = {"x": x, **params}
        grads = torch.autograd.grad(y, list(leaves.values()), dy)
        results[f"{step}:y"] = y.detach()
        results.update({f"{step}:d{k}": g for k, g in zip(leaves, grads, strict=True)})
        if case.stats:
            results.update({f"{step}:running_mean": stats[0].clone(),
                            f"{step}:running_var": stats[1].clone()})
    return results


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_float64_oracle(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    if case.block_n is not None:
        monkeypatch.setenv(B.BLOCK_ENV_VAR, str(case.block_n))
    got = run(functools.partial(B.batch_norm, act=case.act), case)
    want = run(_then_act(reference.batch_norm, case.act), case, torch.float64)
    low = run(_then_act(F.batch_norm, case.act), case)
    assert_within_bound(got, want, low)
    if case.layout.startswith("channels_last"):
        for name in (n for n in got if n.endswith(("y", "dx"))):
            assert got[name].is_contiguous(memory_format=getattr(torch, case.layout)), name


@pytest.mark.gpu_schedule
@pytest.mark.parametrize("case", [
    Case((4, 6, 5, 5), bf16, param_dtype=f32, block_n=16),
    Case((3, 5, 4, 4), f16, layout="channels_last", block_n=8),
], ids=str)
def test_is_deterministic(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(B.BLOCK_ENV_VAR, str(case.block_n))
    first, second = run(B.batch_norm, case), run(B.batch_norm, case)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channels_last_3d", "sliced"])
def test_channel_view_is_not_a_copy(layout: str) -> None:
    shape = (2, 3, 2, 3, 4) if layout == "channels_last_3d" else (2, 3, 4, 5)
    x = make_input(Case(shape, layout=layout), torch.Generator().manual_seed(0))
    assert B._channel_view(x).data_ptr() == x.data_ptr()


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_is_atens(training: bool) -> None:
    """No elements: an empty output, zero parameter gradients, running statistics unchanged."""
    x = torch.randn(0, 3, 4, device=DEVICE, requires_grad=True)
    results = []
    for impl in (B.batch_norm, F.batch_norm):
        w, b = (torch.randn(3, device=DEVICE, requires_grad=True) for _ in range(2))
        stats = [torch.randn(3, device=DEVICE), torch.rand(3, device=DEVICE) + 0.5]
        before = [s.clone() for s in stats]
        y = impl(x, *stats, w, b, training, MOMENTUM, EPS)
        grads = torch.autograd.grad(y, [x, w, b], torch.randn_like(y))
        assert all(torch.equal(s, s0) for s, s0 in zip(stats, before, strict=True))
        results.append((y.shape, *(g.shape for g in grads), grads[1].abs().sum(), grads[2].abs().sum()))
    assert results[0] == results[1]


def _model(x, running_mean, running_var, w, b):
    y = B.batch_norm(x, running_mean, running_var, w, b, True, MOMENTUM, EPS)
    y = functional.batch_norm(y, running_mean, running_var, w, b, True, 0.5, EPS, backend="triton")
    return B.batch_norm(y, running_mean, running_var, w, b, False, MOMENTUM, EPS)


def test_torch_compile_fullgraph_matches_eager() -> None:
    triton_backend.register()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=gen).to(DEVICE).contiguous(memory_format=torch.channels_last)
    params = [torch.randn(3, generator=gen).to(DEVICE) for _ in range(2)]
    stats = [torch.randn(3, generator=gen).to(DEVICE), torch.rand(3, generator=gen).to(DEVICE) + 0.5]
    dy = torch.randn(x.shape, generator=gen).to(DEVICE)
    runs = []
    for fn in (_model, torch.compile(_model, fullgraph=True, backend="aot_eager")):
        leaves = [t.clone().requires_grad_() for t in (x, *params)]
        running = [s.clone() for s in stats]
        y = fn(leaves[0], *running, *leaves[1:])
        runs.append((y, *running, *torch.autograd.grad(y, leaves, dy)))
    for eager, compiled in zip(*runs, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_backend_registration_and_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    triton_backend.register()
    op = get_backend("triton").ops["batch_norm"]
    x = torch.randn(4, 3, 5, device=DEVICE)
    stats = (torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE))
    assert op.unsupported(x, *stats, None, None, True) is None
    assert "float64" in op.unsupported(x.double(), None, None, None, None, True)
    assert "float64" in op.unsupported(x, stats[0].double(), stats[1], None, None, False)
    assert op.unsupported(x[:0], *stats, None, None, True) is None  # ATen's empty-batch result
    assert op.preferred(x, *stats) is (DEVICE == "cuda" and "batch_norm" in triton_backend.MEASURED_FASTER)
    monkeypatch.setattr(triton_backend, "MEASURED_FASTER", frozenset({"batch_norm"}))
    assert op.preferred(x, *stats) is (DEVICE == "cuda")
