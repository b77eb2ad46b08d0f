"""The numba channel norms (``normkit.ops.numba.channel_norm``) called directly: BatchNorm,
batch_norm_act, GroupNorm, group_norm_act, InstanceNorm, in every layout the kernels read in
place (NC* contiguous, channels_last(_3d), ``(N, C)``, ``(N, C, L)``).

* float64 against torch's op in float64 (the oracle), output and the gradients of input,
  weight and bias under random weights, biases and upstream gradients; float32 against torch
  float32 and bfloat16 within the self-calibrating bound (:mod:`normkit.testing`).
* Running statistics (unbiased variance, momentum, InstanceNorm's batch average), eval mode,
  empty input, the output's memory format.
* Deterministic: bit-identical at 1 and 2 threads and on a second run. Batch-invariant
  (GroupNorm, InstanceNorm): a sample alone and inside larger batches gives the same bits.
* ``torch.compile(fullgraph=True)`` through the custom ops, relu's NaN, ``eps=0`` on a constant
  channel, a large common offset, what the kernels decline.

Shapes are small and few dtypes are used: every (kernel, dtype) pair is a numba compilation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from cases import seed_of
from normkit.testing import TOLERANCES, assert_within_bound

pytest.importorskip("numba")
cn = pytest.importorskip("normkit.ops.numba.channel_norm")

ACTS: dict[str | None, Callable[[Tensor], Tensor]] = {None: lambda y: y, "relu": F.relu, "silu": F.silu,
                                                      "gelu": F.gelu}


class Op(NamedTuple):
    mine: Callable[..., Tensor]  # (x, w, b) -> y
    torch: Callable[..., Tensor]  # the same call on torch.nn.functional


def _bn(training: bool, act: str | None = None) -> Op:
    def stats(x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        if training:
            return None, None
        g = torch.Generator().manual_seed(seed_of("running", x.shape[1]))
        return (torch.randn(x.shape[1], generator=g).to(x.dtype),
                torch.rand(x.shape[1], generator=g).to(x.dtype) + 0.5)

    return Op(lambda x, w, b: cn.batch_norm_act(x, *stats(x), w, b, training, 0.1, 1e-5, act),
              lambda x, w, b: ACTS[act](F.batch_norm(x, *stats(x), w, b, training, 0.1, 1e-5)))


def _gn(groups: int, act: str | None = None) -> Op:
    return Op(lambda x, w, b: cn.group_norm_act(x, groups, w, b, 1e-5, act),
              lambda x, w, b: ACTS[act](F.group_norm(x, groups, w, b, 1e-5)))


_IN = Op(lambda x, w, b: cn.instance_norm(x, None, None, w, b),
         lambda x, w, b: F.instance_norm(x, None, None, w, b))

OPS: dict[str, Op] = {
    "batch_norm": _bn(True),
    "batch_norm_eval": _bn(False),
    "batch_norm_relu": _bn(True, "relu"),
    "batch_norm_silu": _bn(True, "silu"),
    "batch_norm_gelu_eval": _bn(False, "gelu"),
    "group_norm": _gn(3),
    "group_norm_silu": _gn(2, "silu"),
    "instance_norm": _IN,
}

FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


class Case(NamedTuple):
    op: str
    shape: tuple[int, ...]
    channels_last: bool = False

    @property
    def id(self) -> str:
        return f"{self.op}-{'x'.join(map(str, self.shape))}{'-cl' if self.channels_last else ''}"


# Primes and non-powers of two; batch 1; (N, C) and (N, C, L); more rows than one
# channels_last block (16384 // C); 3-D spatial.
CASES = [
    *(Case(op, (3, 6, 5, 7), cl) for op in OPS for cl in (False, True)),
    Case("batch_norm", (7, 6)),
    Case("batch_norm_relu", (1, 6, 11)),
    Case("batch_norm", (5, 6, 13)),
    Case("batch_norm", (2, 6, 3, 4, 5), True),
    Case("batch_norm_eval", (9, 6)),
    Case("batch_norm", (3, 4, 37, 41), True),
    Case("group_norm", (1, 6, 3, 4, 5), True),
    Case("group_norm_silu", (2, 6, 13)),
    Case("instance_norm", (2, 6, 13)),
    Case("instance_norm", (1, 6, 2, 3, 4), True),
]


def _input(case: Case, dtype: torch.dtype) -> Tensor:
    g = torch.Generator().manual_seed(seed_of(case.id))
    x = (torch.randn(case.shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=FORMATS[x.dim()])
    return x


def _run(fn: Callable[..., Tensor], x: Tensor, seed: int, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """``{"y", "dx", "dw", "db"}`` of ``fn`` on ``x`` (cast to ``dtype``) under random
    weights, biases and upstream gradient."""
    dtype = dtype or x.dtype
    g = torch.Generator().manual_seed(seed)
    C = x.shape[1]
    w, b = (torch.randn(C, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for _ in range(2))
    xs = x.detach().to(dtype).requires_grad_()
    y = fn(xs, w, b)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
    dx, dw, db = torch.autograd.grad(y, (xs, w, b), dy)
    return {"y": y.detach(), "dx": dx, "dw": dw, "db": db}


def _assert_bits(a: dict[str, Tensor], b: dict[str, Tensor], what: str) -> None:
    for name in a:
        assert torch.equal(a[name].reshape(-1).view(torch.uint8), b[name].reshape(-1).view(torch.uint8)), \
            f"{what}: {name} differs"


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_float64_matches_torch(case: Case) -> None:
    x = _input(case, torch.float64)
    got = _run(OPS[case.op].mine, x, seed_of(case.id, "p"))
    want = _run(OPS[case.op].torch, x, seed_of(case.id, "p"))
    tol = TOLERANCES[torch.float64]
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=tol.rtol, atol=tol.atol, msg=lambda m: f"{name}: {m}")
    if case.channels_last:
        assert got["y"].is_contiguous(memory_format=FORMATS[x.dim()])
        assert got["dx"].is_contiguous(memory_format=FORMATS[x.dim()])


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES[:len(OPS) * 2]])
def test_float32_matches_torch_and_bfloat16_stays_within_the_bound(case: Case) -> None:
    x = _input(case, torch.float64)
    seed = seed_of(case.id, "low")
    op = OPS[case.op]
    got, want = _run(op.mine, x, seed, torch.float32), _run(op.torch, x, seed, torch.float32)
    tol = TOLERANCES[torch.float32]
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=tol.rtol, atol=tol.atol, msg=lambda m: f"{name}: {m}")
    assert_within_bound(_run(op.mine, x, seed, torch.bfloat16), _run(op.torch, x, seed, torch.float64),
                        _run(op.torch, x, seed, torch.bfloat16))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("momentum", [0.1, 1 / 3])  # 1/3: a module's momentum=None after two batches
def test_batch_norm_running_statistics(channels_last: bool, momentum: float) -> None:
    x = _input(Case("batch_norm", (4, 6, 3, 5), channels_last), torch.float64)
    g = torch.Generator().manual_seed(seed_of("bn-running"))
    mean, var = torch.randn(6, generator=g, dtype=torch.float64), torch.rand(6, generator=g, dtype=torch.float64)
    ours, theirs = (mean.clone(), var.clone()), (mean.clone(), var.clone())
    y = cn.batch_norm(x, *ours, None, None, True, momentum, 1e-5)
    want = F.batch_norm(x, *theirs, None, None, True, momentum, 1e-5)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-12, atol=1e-12)  # unbiased
    assert not torch.equal(ours[1], var)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_instance_norm_running_statistics_are_the_batch_average(channels_last: bool) -> None:
    x = _input(Case("instance_norm", (3, 6, 4, 5), channels_last), torch.float64)
    ours, theirs = (torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)), \
        (torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64))
    y = cn.instance_norm(x, *ours, None, None, True, 0.25, 1e-5)
    want = F.instance_norm(x, *theirs, None, None, True, 0.25, 1e-5)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_running_statistics_of_the_wrong_size_are_both_left_untouched() -> None:
    x = torch.randn(4, 6, 5)
    mean, var = torch.zeros(6), torch.ones(5)
    with pytest.raises(RuntimeError, match="running statistics"):
        cn.batch_norm(x, mean, var, None, None, True, 0.1, 1e-5)
    assert torch.equal(mean, torch.zeros(6)) and torch.equal(var, torch.ones(5))


@pytest.mark.parametrize("op", OPS)
def test_bits_do_not_depend_on_thread_count(op: str, restore_threads) -> None:
    for case in (Case(op, (5, 6, 9, 11)), Case(op, (5, 6, 9, 11), True)):
        x = _input(case, torch.float32)
        results = []
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            results.append(_run(OPS[op].mine, x, seed_of(case.id, "threads")))
        _assert_bits(results[0], results[1], f"{case.id} at 1 and 2 threads")
        _assert_bits(results[1], results[2], f"{case.id} run twice")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("op", ["group_norm", "group_norm_silu", "instance_norm"])
def test_a_sample_does_not_depend_on_its_batch(op: str, channels_last: bool, restore_threads) -> None:
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(seed_of(op, "batch"))
    sample, dy_sample = torch.randn(2, 1, 6, 7, 9, generator=g) * 3 + 1
    w, b = torch.randn(6, generator=g), torch.randn(6, generator=g)

    def result(batch: Tensor, at: int) -> dict[str, Tensor]:
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        x = batch.requires_grad_()
        y = OPS[op].mine(x, w, b)
        dy = torch.randn(batch.shape, generator=g)
        dy[at] = dy_sample[0]
        dx = torch.autograd.grad(y, x, dy)[0]
        return {"y": y[at].detach(), "dx": dx[at]}

    alone = result(sample.clone(), 0)
    for n in (2, 5):
        batch = torch.randn(n, 6, 7, 9, generator=g) * 10
        at = (n * 3) // 5
        batch[at] = sample[0]
        _assert_bits(alone, result(batch, at), f"{op}: sample {at} of {n}")


def test_empty_batch_norm_gives_an_empty_output_and_updates_nothing() -> None:
    x = torch.randn(0, 3, 4, requires_grad=True)
    w, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    mean, var = torch.zeros(3), torch.ones(3)
    y = cn.batch_norm(x, mean, var, w, b, True, 0.1, 1e-5)
    assert y.shape == x.shape
    dw, db = torch.autograd.grad(y.sum(), (w, b))
    assert torch.equal(dw, torch.zeros(3)) and torch.equal(db, torch.zeros(3))
    assert torch.equal(mean, torch.zeros(3)) and torch.equal(var, torch.ones(3))


def test_relu_keeps_nan_as_torch() -> None:
    x = torch.randn(4, 3, 5)
    b = torch.tensor([0.5, float("nan"), -0.5])
    y = cn.batch_norm_act(x, None, None, None, b, True, 0.1, 1e-5, "relu")
    want = F.relu(F.batch_norm(x, None, None, None, b, True))
    assert torch.equal(y.isnan(), want.isnan()) and y[:, 1].isnan().all()
    torch.testing.assert_close(y, want, equal_nan=True)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_constant_channel_with_eps_zero_gives_the_bias_and_zero_gradient(channels_last: bool) -> None:
    x = torch.full((3, 4, 2, 5), 2.5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w, b = torch.randn(4), torch.randn(4)
    for y in (cn.batch_norm(x, None, None, w, b, True, 0.1, 0.0), cn.group_norm(x, 2, w, b, 0.0)):
        dx = torch.autograd.grad(y, x, torch.randn(3, 4, 2, 5))[0]
        assert torch.equal(y, b[:, None, None].expand(3, 4, 2, 5))
        assert torch.equal(dx, torch.zeros_like(dx))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_large_common_offset_cancels(channels_last: bool) -> None:
    x = 1e4 + torch.randn(6, 3, 5, 7, dtype=torch.float64)
    x32 = x.float().contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for got, want in ((cn.batch_norm(x32, None, None, None, None, True, 0.1, 1e-5),
                       F.batch_norm(x32.double(), None, None, None, None, True)),
                      (cn.instance_norm(x32), F.instance_norm(x32.double()))):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-3)  # x32's own rounding: 5e-4


def test_compiles_fullgraph_without_graph_break() -> None:
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(seed_of("compile-channel"))
    x = torch.randn(4, 6, 5, 3, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    w, b = torch.randn(6, generator=g).requires_grad_(), torch.randn(6, generator=g).requires_grad_()
    dy = torch.randn(4, 6, 5, 3, generator=g)

    def f(x, w, b, mean, var):
        y = cn.batch_norm_act(x, mean, var, w, b, True, 0.1, 1e-5, "relu")
        return cn.group_norm_act(y, 3, w, b, 1e-5, "silu") + cn.instance_norm(x, None, None, w, b)

    stats = [(torch.zeros(6), torch.ones(6)) for _ in range(2)]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    want = torch.autograd.grad(f(x, w, b, *stats[0]), (x, w, b), dy)
    got = torch.autograd.grad(compiled(x, w, b, *stats[1]), (x, w, b), dy)
    _assert_bits(dict(enumerate(want)), dict(enumerate(got)), "compiled")
    _assert_bits(dict(enumerate(stats[0])), dict(enumerate(stats[1])), "running statistics, compiled")


@pytest.mark.parametrize(("op", "args", "reason"), [
    ("batch_norm", (torch.randn(2, 3, 4, dtype=torch.float16), None, None), "float16"),
    ("group_norm", (torch.randn(2, 4, device="meta"), 2), "CPU tensors"),
    ("group_norm", (torch.randn(0, 4, 3), 2), "empty"),
    ("instance_norm", (torch.randn(2, 3, 4), torch.zeros(3), torch.ones(3), None, None, False), "use_input_stats"),
])
def test_declines_with_a_reason(op: str, args: tuple, reason: str) -> None:
    assert reason in cn.UNSUPPORTED[op](*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_takes_cpu_float_input(dtype: torch.dtype) -> None:
    x = torch.randn(2, 4, 3, dtype=dtype)
    assert cn.UNSUPPORTED["batch_norm"](x, None, None, None, None, True) is None
    assert cn.UNSUPPORTED["group_norm"](x, 2) is None
    assert cn.UNSUPPORTED["instance_norm"](x) is None
