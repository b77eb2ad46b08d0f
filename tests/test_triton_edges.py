"""The Triton backend at its edges: function transforms, failed calls, and inputs that break
naive numerics (large offsets, huge magnitudes, constant rows, ``eps=0``, NaN).

Runs on CUDA when there is a device, else under Triton's interpreter (``TRITON_INTERPRET=1``
before Triton is imported). Shapes are tiny: the interpreter runs every program in Python.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import torch.func as tf  # noqa: E402

from cases import seed_of  # noqa: E402
from kernel_bound import assert_within_bound  # noqa: E402
from normkit import functional  # noqa: E402
from normkit.ops.triton import batch_norm as B  # noqa: E402

f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16

# ---- torch.func on every triton op ------------------------------------------------------------

# Every op as ``f(x, weight, bias, backend)`` on an (N, C, L) input, C = 4 channels in 2 groups;
# the trailing norms normalize L. ``weight`` and ``bias`` have max(C, L) elements, of which an op
# uses the first C (per channel) or L (per column); ops without a bias ignore it. The add-norms'
# residual, ``x.roll(1, 1) - x``, sums with x exactly (Sterbenz) at any offset, so that the
# float64 oracle normalizes what the fp32 kernels do.
def _rows(x, p):
    return p[: x.shape[-1]]


def _chans(x, p):
    return p[: x.shape[1]]


OPS: dict[str, Callable] = {
    "layer_norm": lambda x, w, b, be: functional.layer_norm(
        x, x.shape[-1:], _rows(x, w), _rows(x, b), backend=be),
    "rms_norm": lambda x, w, b, be: functional.rms_norm(x, x.shape[-1:], _rows(x, w), backend=be),
    "add_layer_norm": lambda x, w, b, be: functional.add_layer_norm(
        x, x.roll(1, 1) - x, x.shape[-1:], _rows(x, w), _rows(x, b), backend=be),
    "add_rms_norm": lambda x, w, b, be: functional.add_rms_norm(
        x, x.roll(1, 1) - x, x.shape[-1:], _rows(x, w), backend=be),
    "group_norm": lambda x, w, b, be: functional.group_norm(x, 2, _chans(x, w), _chans(x, b), backend=be),
    "group_norm_act": lambda x, w, b, be: functional.group_norm_act(
        x, 2, _chans(x, w), _chans(x, b), act="gelu", backend=be),
    "instance_norm": lambda x, w, b, be: functional.instance_norm(
        x, None, None, _chans(x, w), _chans(x, b), backend=be),
    "batch_norm_train": lambda x, w, b, be: functional.batch_norm(
        x, None, None, _chans(x, w), _chans(x, b), True, backend=be),
    "batch_norm_eval": lambda x, w, b, be: functional.batch_norm(
        x, torch.linspace(-1, 1, x.shape[1], device=x.device, dtype=x.dtype),
        torch.linspace(0.5, 2, x.shape[1], device=x.device, dtype=x.dtype),
        _chans(x, w), _chans(x, b), False, backend=be),
    "batch_norm_act": lambda x, w, b, be: functional.batch_norm_act(
        x, None, None, _chans(x, w), _chans(x, b), True, act="silu", backend=be),
}


def _loss(op: Callable, backend: str, dys: tuple[torch.Tensor, ...]) -> Callable:
    """``sum(out * dy)`` over the op's outputs: a random upstream gradient per output."""
    def loss(x, w, b):
        out = op(x, w, b, backend)
        outs = out if isinstance(out, tuple) else (out,)
        return sum((o * dy).sum() for o, dy in zip(outs, dys, strict=True))

    return loss


def _transforms(op: Callable, x, w, b, backend: str) -> dict[str, Callable[[], object]]:
    gen = torch.Generator().manual_seed(1)
    outs = op(x, w, b, "torch")
    outs = outs if isinstance(outs, tuple) else (outs,)
    dys = tuple(torch.randn(o.shape, generator=gen).to(DEVICE) for o in outs)
    tangents = tuple(torch.randn(t.shape, generator=gen).to(DEVICE) for t in (x, w, b))
    xs = torch.randn((2, *x.shape), generator=gen).to(DEVICE)
    f = lambda x, w, b: op(x, w, b, backend)  # noqa: E731
    loss = _loss(op, backend, dys)
    return {
        "grad": lambda: tf.grad(loss, argnums=(0, 1, 2))(x, w, b),
        "vmap": lambda: tf.vmap(f, in_dims=(0, None, None))(xs, w, b),
        "jacrev": lambda: tf.jacrev(f, argnums=(0, 1, 2))(x, w, b),
        "vmap_grad": lambda: tf.vmap(tf.grad(loss, argnums=(0, 1)), in_dims=(0, None, None))(xs, w, b),
        "jvp": lambda: tf.jvp(f, (x, w, b), tangents),
        "jacfwd": lambda: tf.jacfwd(f, argnums=(0, 1, 2))(x, w, b),
    }


TRANSFORMS = ("grad", "vmap", "jacrev", "vmap_grad", "jvp", "jacfwd")


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("op", list(OPS))
def test_function_transforms_give_torchs_result_or_refuse(op: str, transform: str) -> None:
    """torch.func on a triton op equals torch.func on torch's op, or raises an error that
    names the transform; never a silent wrong value (forward-mode AD once gave zero
    tangents)."""
    gen = torch.Generator().manual_seed(0)
    # One sample of 8 elements: jacrev runs one backward per output element, and the
    # interpreter takes ~0.2 s for each.
    x, w, b = (torch.randn(shape, generator=gen).to(DEVICE) for shape in ((1, 4, 2), (4,), (4,)))
    want = _transforms(OPS[op], x, w, b, "torch")[transform]()
    run = _transforms(OPS[op], x, w, b, "triton")[transform]
    if transform in ("jvp", "jacfwd"):
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            run()
        return
    got = run()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)



@pytest.mark.parametrize("op", ["batch_norm", "instance_norm"])
def test_grad_updates_running_statistics_as_torch(op: str) -> None:
    """torch.func.grad through a training norm updates captured running statistics, as ATen's
    kernels do (InstanceNorm's update was a copy_ that grad refuses)."""
    gen = torch.Generator().manual_seed(10)
    x, dy = (torch.randn(3, 4, 5, generator=gen).to(DEVICE) for _ in range(2))
    results = []
    for backend in ("torch", "triton"):
        stats = [torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)]
        call = getattr(functional, op)
        dx = tf.grad(lambda x: (call(x, *stats, None, None, True, backend=backend) * dy).sum())(x)
        results.append((dx, stats))
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-5)


def test_forward_ad_is_refused_and_second_order_is_the_composition() -> None:
    """Plain forward-mode AD raises (the kernels have a backward formula only): never zero
    tangents. A double backward goes through the op's torch composition (checked against
    torch in tests/test_triton_double_backward.py): never a silently dropped term."""
    gen = torch.Generator().manual_seed(8)
    x, t, dy = (torch.randn(2, 4, 3, generator=gen).to(DEVICE) for _ in range(3))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, t)
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            functional.group_norm(dual, 2, backend="triton")
    leaf = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(functional.layer_norm(leaf, (3,), backend="triton"), leaf, dy,
                               create_graph=True)
    (gg,) = torch.autograd.grad((g * dy).sum(), leaf)
    assert gg.abs().sum() > 0


@pytest.mark.parametrize("batched_stats", [False, True])
@pytest.mark.parametrize("op", ["batch_norm", "instance_norm"])
def test_vmap_with_running_statistics_as_torch(op: str, batched_stats: bool) -> None:
    """vmap over a training BatchNorm/InstanceNorm: per-element running statistics when they
    are batched too; torch's error, and nothing written, when they are shared."""
    gen = torch.Generator().manual_seed(9)
    xs = torch.randn(3, 2, 4, 5, generator=gen).to(DEVICE)
    shape = (3, 4) if batched_stats else (4,)
    results = []
    for backend in ("torch", "triton"):
        stats = [torch.zeros(shape, device=DEVICE), torch.ones(shape, device=DEVICE)]
        f = lambda x, m, v: getattr(functional, op)(x, m, v, None, None, True, backend=backend)  # noqa: E731
        in_dims = (0, 0, 0) if batched_stats else (0, None, None)
        try:
            results.append((tf.vmap(f, in_dims=in_dims)(xs, *stats), None, stats))
        except RuntimeError as e:
            results.append((None, str(e), stats))
    (want_y, want_err, want_stats), (y, err, stats) = results
    assert err == want_err and (err is None) == batched_stats
    torch.testing.assert_close(stats, want_stats)
    if y is not None:
        torch.testing.assert_close(y, want_y, rtol=1e-4, atol=1e-5)


# ---- a failed call changes nothing -------------------------------------------------------------


def _inference(make: Callable[[], torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return make()


# (input is an inference tensor, running statistics are, weight requires grad, call inside
# inference_mode)
INFERENCE_CASES = [
    (True, False, True, False),  # autograd would save an inference input: refused
    (False, True, True, False),  # ... or inference running statistics (ATen saves them)
    (True, False, False, False),
    (False, True, False, False),  # no autograd: BatchNorm updates them as ATen does
    (False, False, True, True),
    (True, True, True, True),
]


@pytest.mark.parametrize("op", ["batch_norm", "instance_norm"])
@pytest.mark.parametrize("case", INFERENCE_CASES, ids=str)
def test_inference_tensors_as_torch_and_no_write_on_failure(op: str, case: tuple) -> None:
    """Inference tensors in a training call: torch's result or torch's error, and a failed
    call leaves the running statistics as they were (the triton BatchNorm used to update
    them, then raise)."""
    x_inf, stats_inf, w_grad, in_mode = case
    results = {}
    for backend in ("torch", "triton"):
        gen = torch.Generator().manual_seed(0)
        make_x = lambda: torch.randn(2, 3, 4, generator=gen).to(DEVICE)  # noqa: E731
        make_stats = lambda: (torch.randn(3, generator=gen).to(DEVICE),  # noqa: E731
                              torch.rand(3, generator=gen).to(DEVICE) + 0.5)
        x = _inference(make_x) if x_inf else make_x()
        stats = _inference(make_stats) if stats_inf else make_stats()
        before = [s.clone() for s in stats]
        w = torch.randn(3, generator=gen).to(DEVICE).requires_grad_(w_grad)
        call = getattr(functional, op)
        try:
            with torch.inference_mode(in_mode):
                y = call(x, *stats, w, None, True, 0.1, 1e-5, backend=backend)
            results[backend] = (None, y.detach().clone(), [s.clone() for s in stats])
        except RuntimeError as e:
            if backend == "triton":
                for s, s0 in zip(stats, before, strict=True):
                    assert torch.equal(s, s0), "a failed call wrote the running statistics"
            results[backend] = (str(e), None, None)
    (want_err, want_y, want_stats), (err, y, got_stats) = results["torch"], results["triton"]
    assert err == want_err
    if err is None:
        torch.testing.assert_close(y, want_y)
        torch.testing.assert_close(got_stats, want_stats)


def test_running_statistics_of_wrong_size_are_not_half_written() -> None:
    """The launcher checks every running statistic before writing any (direct callers of
    normkit.ops.triton skip normkit.functional's checks)."""
    x = torch.randn(2, 3, 4, device=DEVICE)
    running_mean, running_var = torch.zeros(3, device=DEVICE), torch.ones(4, device=DEVICE)
    with pytest.raises(RuntimeError):
        B.batch_norm(x, running_mean, running_var, None, None, True, 0.1, 1e-5)
    assert torch.equal(running_mean, torch.zeros(3, device=DEVICE))


# ---- numerics: large offsets, huge magnitudes, constant rows, eps=0, NaN ------------------------


def _forward_backward(op: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, backend: str,
                      dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Outputs and the gradients of x, w and b under random upstream gradients (seeded, so
    every run draws the same); ``dtype`` upcasts the inputs (the float64 oracle)."""
    x, w, b = (t.to(dtype or t.dtype).detach().requires_grad_() for t in (x, w, b))
    out = OPS[op](x, w, b, backend)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(2)
    dys = [torch.randn(o.shape, generator=gen).to(device=DEVICE, dtype=o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, (x, w, b), dys, allow_unused=True)
    results = {f"y{i}": o.detach() for i, o in enumerate(outs)}
    results.update({f"d{n}": g for n, g in zip("xwb", grads, strict=True) if g is not None})
    return results


def _inputs(kind: str, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(3, 4, 6, generator=gen)
    return {"mean 1e4": 1e4 + x, "mean 1e20": 1e20 + 1e15 * x, "scale 1e20": 1e20 * x}[kind]


@pytest.mark.parametrize("kind", ["mean 1e4", "mean 1e20", "scale 1e20"])
@pytest.mark.parametrize("op", [op for op in OPS if op != "batch_norm_eval"])
def test_large_offsets_and_magnitudes_within_bound(op: str, kind: str) -> None:
    """Output and gradients against float64 within twice torch's fp32 error, on input whose
    common offset dwarfs its spread (the shift makes it cancel exactly: InstanceNorm's weight
    gradient at mean 1e4 was 4.7x torch's error without it) or whose squares overflow fp32
    (BatchNorm gave NaN at |x| ~ 1e20; the kernels accumulate in power-of-two scaled units)."""
    gen = torch.Generator().manual_seed(3)
    x = _inputs(kind, gen).to(DEVICE)
    w, b = (torch.randn(6, generator=gen).to(DEVICE) for _ in range(2))
    got = _forward_backward(op, x, w, b, "triton")
    want = _forward_backward(op, x, w, b, "torch", torch.float64)
    low = _forward_backward(op, x, w, b, "torch")
    # Where torch's fp32 result is not finite (its squares overflow: NaN for layer_norm at mean
    # 1e20) it calibrates nothing: there the kernel must be within ATOL of float64.
    low = {k: torch.where(v.isfinite(), v, want[k].to(v.dtype)) for k, v in low.items()}
    for name, t in got.items():
        assert not t.isnan().any(), name
    assert_within_bound(got, want, low)


@pytest.mark.parametrize("kind", ["mean 1e4", "mean 1e20", "scale 1e20", "constant"])
@pytest.mark.parametrize("op", ["batch_norm", "instance_norm"])
def test_running_statistics_finite_and_not_negative(op: str, kind: str) -> None:
    """Finite input: running mean finite, running variance never NaN or negative (it is inf
    only where the variance itself exceeds fp32, as torch); a constant input adds exactly
    zero variance (InstanceNorm's recovered ``rstd^-2 - eps`` was -1e-12)."""
    gen = torch.Generator().manual_seed(4)
    x = (torch.full((3, 4, 6), 3.7) if kind == "constant" else _inputs(kind, gen)).to(DEVICE)
    stats = {}
    for backend in ("triton", "torch"):
        running = [torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)]
        getattr(functional, op)(x, *running, None, None, True, 1.0, 1e-5, backend=backend)
        stats[backend] = running
    mean, var = stats["triton"]
    assert mean.isfinite().all() and not var.isnan().any() and (var >= 0).all(), (mean, var)
    torch.testing.assert_close(stats["triton"], stats["torch"], rtol=1e-4, atol=1e-5)
    if kind == "constant":
        assert torch.equal(var, torch.zeros_like(var))


@pytest.mark.parametrize("eps", [0.0, 1e-5])
@pytest.mark.parametrize("op", ["layer_norm", "group_norm", "instance_norm", "batch_norm_train",
                                "group_norm_act"])
def test_constant_rows_give_the_bias(op: str, eps: float) -> None:
    """Each normalized set constant: y is act(bias) exactly and the weight gets no gradient;
    with ``eps=0`` neither does x (rstd is 0 when ``var + eps == 0``, ATen's batch/instance-norm
    rule; the kernels gave 0 * inf = NaN). torch agrees for instance_norm; its layer_norm and group_norm give NaN
    at eps=0, where normkit gives this defined result."""
    if op == "batch_norm_train" and eps == 0:
        pytest.skip("batch_norm refuses eps=0 in training, as torch")
    gen = torch.Generator().manual_seed(5)
    x = torch.full((2, 4, 6), 3.7).to(DEVICE)
    if op == "batch_norm_train":
        x = x * torch.arange(1.0, 5.0, device=DEVICE).view(4, 1)  # constant per channel
    w, b = (torch.randn(6, generator=gen).to(DEVICE) for _ in range(2))
    call = {"layer_norm": lambda x, w, b: functional.layer_norm(x, (6,), w, b, eps, backend="triton"),
            "group_norm": lambda x, w, b: functional.group_norm(x, 2, w[:4], b[:4], eps, backend="triton"),
            "group_norm_act": lambda x, w, b: functional.group_norm_act(
                x, 2, w[:4], b[:4], eps, act="relu", backend="triton"),
            "instance_norm": lambda x, w, b: functional.instance_norm(
                x, None, None, w[:4], b[:4], True, 0.1, eps, backend="triton"),
            "batch_norm_train": lambda x, w, b: functional.batch_norm(
                x, None, None, w[:4], b[:4], True, 0.1, eps, backend="triton")}[op]
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = call(*leaves)
    bias = leaves[2][:6] if op == "layer_norm" else leaves[2][:4].view(4, 1)
    expected = functional.activate("relu" if op == "group_norm_act" else None, bias.detach())
    assert torch.equal(y.detach(), expected.expand_as(y))
    dx, dw = torch.autograd.grad(y, leaves[:2], torch.randn(y.shape, generator=gen).to(DEVICE))
    assert torch.equal(dw, torch.zeros_like(dw))  # x_hat is exactly 0
    if eps == 0:  # rstd = 0: no gradient reaches x
        assert torch.equal(dx, torch.zeros_like(dx))
    if op == "instance_norm" and eps == 0:  # torch's x - mean is exactly 0 only then
        want = F.instance_norm(x, None, None, w[:4], b[:4], True, 0.1, eps)
        assert torch.equal(y.detach(), want)


@pytest.mark.parametrize("op", ["batch_norm_act", "group_norm_act"])
def test_relu_propagates_nan_forward_and_backward(op: str) -> None:
    """relu(NaN) is NaN and its gradient passes dy, as torch's relu (the kernels used
    maxnum, which returned 0 for NaN, and zeroed its gradient)."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 4, 5, generator=gen).to(DEVICE)
    x[1, 2, 3] = float("nan")
    w, b = (torch.randn(4, generator=gen).to(DEVICE) for _ in range(2))
    results = []
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        if op == "batch_norm_act":
            y = functional.batch_norm_act(leaves[0], None, None, *leaves[1:], True, act="relu",
                                          backend=backend)
        else:
            y = functional.group_norm_act(leaves[0], 2, *leaves[1:], act="relu", backend=backend)
        gen_dy = torch.Generator().manual_seed(7)
        grads = torch.autograd.grad(y, leaves, torch.randn(y.shape, generator=gen_dy).to(DEVICE))
        results.append((y.detach(), *grads))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["mean 1e4", "scale 1e20"])
@pytest.mark.parametrize("op", ["layer_norm", "group_norm", "instance_norm", "batch_norm_train"])
def test_large_offsets_and_magnitudes_in_tiles(op: str, kind: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """As above with tiles of 4 elements: the per-tile shifted, scaled moments merged across
    tiles (the chunked path of wide rows and of many-program BatchNorm)."""
    monkeypatch.setenv(B.BLOCK_ENV_VAR, "4")
    test_large_offsets_and_magnitudes_within_bound(op, kind)


# ---- parameters that are views with another stride ---------------------------------------------

# op -> f(x (2, 4, 5), weight (4,), bias (4,)) on a backend
VIEW_PARAM_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "layer_norm": lambda x, w, b, **kw: functional.layer_norm(x.transpose(1, 2), (4,), w, b, **kw),
    "rms_norm": lambda x, w, b, **kw: functional.rms_norm(x.transpose(1, 2), (4,), w, **kw),
    "add_rms_norm": lambda x, w, b, **kw: functional.add_rms_norm(x.transpose(1, 2), None, (4,), w, **kw)[0],
    "group_norm": lambda x, w, b, **kw: functional.group_norm(x, 2, w, b, **kw),
    "group_norm_act": lambda x, w, b, **kw: functional.group_norm_act(x, 2, w, b, act="silu", **kw),
    "instance_norm": lambda x, w, b, **kw: functional.instance_norm(x, weight=w, bias=b, **kw),
    "batch_norm": lambda x, w, b, **kw: functional.batch_norm(x, None, None, w, b, True, **kw),
    "batch_norm eval": lambda x, w, b, **kw: functional.batch_norm(
        x, torch.full((4,), 0.5, device=x.device), torch.full((4,), 2.0, device=x.device), w, b, False, **kw),
    "normalize": lambda x, w, b, **kw: functional.normalize(x, (1,), w, b, **kw),
}


@pytest.mark.parametrize("view", ["strided", "expanded"])
@pytest.mark.parametrize("op", list(VIEW_PARAM_OPS))
def test_parameters_that_are_strided_views(op: str, view: str) -> None:
    """A weight or bias that is a view with another stride (a column ``W[:, 0]``, an expanded
    scalar, a vmapped slice) is read through its strides: the kernels take dense parameters,
    so the launchers make them so (they once read such views as if dense: errors of order 1)."""
    gen = torch.Generator().manual_seed(seed_of("view params", op, view))

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(DEVICE)

    x = rand(2, 4, 5)
    if view == "strided":
        w_leaf, b_leaf = rand(4, 3).requires_grad_(), rand(4, 3).requires_grad_()
        w, b = w_leaf[:, 1], b_leaf[:, 2]
    else:
        w_leaf, b_leaf = rand(1).requires_grad_(), rand(1).requires_grad_()
        w, b = w_leaf.expand(4), b_leaf.expand(4)
    upstream = None
    fn = VIEW_PARAM_OPS[op]
    outs = []
    for kw in ({"backend": "torch"}, {"backend": "triton"}):
        w_leaf.grad = b_leaf.grad = None
        y = fn(x, w, b, **kw)
        upstream = rand(*y.shape) if upstream is None else upstream
        y.backward(upstream)
        outs.append((y.detach(), w_leaf.grad.clone(), None if b_leaf.grad is None else b_leaf.grad.clone()))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


# ---- an inf in an RMS row; eps=0 on tiny input ------------------------------------------------

# op -> f(x (2, 4, 6), weight, bias, eps, backend): RMS normalization over the last axis
RMS_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "rms_norm": lambda x, w, b, eps, be: functional.rms_norm(x, (6,), w, eps, backend=be),
    "add_rms_norm": lambda x, w, b, eps, be: functional.add_rms_norm(
        x, torch.zeros_like(x), (6,), w, eps, backend=be)[0],
    "normalize": lambda x, w, b, eps, be: functional.normalize(
        x, (-1,), w, b, 1e-5 if eps is None else eps, center=False, backend=be),
}


@pytest.mark.parametrize("tiles", [None, "2"])
@pytest.mark.parametrize("dtype", [f32, bf16, f16], ids=str)
@pytest.mark.parametrize("op", list(RMS_OPS))
def test_rms_row_with_an_inf_as_torch(op: str, dtype: torch.dtype, tiles: str | None,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An inf in a row: ``x * rsqrt(inf)`` is 0 at its finite elements and NaN at the inf, as
    torch and the reference give (the kernels scaled the row by its largest element, inf, and
    gave NaN everywhere). Other rows are untouched."""
    if tiles:
        monkeypatch.setenv(B.BLOCK_ENV_VAR, tiles)
    gen = torch.Generator().manual_seed(seed_of("rms inf", op, str(dtype)))
    x = torch.randn(2, 4, 6, generator=gen).to(DEVICE, dtype)
    x[0, 1, 2] = float("inf")
    x[1, 3, 5] = -float("inf")
    w, b = (torch.randn(6, generator=gen).to(DEVICE, dtype) for _ in range(2))
    got = RMS_OPS[op](x, w, b, None, "triton")
    want = RMS_OPS[op](x, w, b, None, "reference")
    rows = (torch.tensor([0, 1]), torch.tensor([1, 3]))  # 0 * w (+ b) besides the NaN: exact
    torch.testing.assert_close(got[rows], want[rows], equal_nan=True, rtol=0, atol=0)
    assert got[rows].isnan().sum() == 2
    # the other rows as before; bf16/fp16 outputs near 0 (the bias cancelling) round coarsely
    low = dtype != f32
    torch.testing.assert_close(got, want, equal_nan=True, atol=1e-2 if low else 1e-5,
                               rtol=1.6e-2 if low else 1.3e-6)


# op -> f(x (2, 4, 6), weight (6,), bias (6,), backend) with eps=0
TINY_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "layer_norm": lambda x, w, b, be: functional.layer_norm(x, (6,), w, b, 0.0, backend=be),
    "rms_norm": lambda x, w, b, be: functional.rms_norm(x, (6,), w, 0.0, backend=be),
    "group_norm": lambda x, w, b, be: functional.group_norm(x, 2, w[:4], b[:4], 0.0, backend=be),
    "instance_norm": lambda x, w, b, be: functional.instance_norm(
        x, None, None, w[:4], b[:4], True, 0.1, 0.0, backend=be),
}


@pytest.mark.parametrize("tiles", [None, "4"])
@pytest.mark.parametrize("op", list(TINY_OPS))
def test_eps_zero_on_tiny_float32_as_float64(op: str, tiles: str | None,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """``eps=0`` on float32 input of order 1e-36: the variance (1e-72) underflows fp32, yet
    the output and gradients are those of float64 (the kernels gave silent zeros: rstd was 0
    where var + eps == 0). Errors are relative to the largest value of each result."""
    if tiles:
        monkeypatch.setenv(B.BLOCK_ENV_VAR, tiles)
    gen = torch.Generator().manual_seed(seed_of("eps0 tiny", op))
    x = (1e-36 * torch.randn(2, 4, 6, generator=gen)).to(DEVICE)
    w, b = (torch.randn(6, generator=gen).to(DEVICE) for _ in range(2))
    dy = torch.randn(2, 4, 6, generator=gen).to(DEVICE)
    results = []
    for backend, dtype in (("triton", f32), ("torch", torch.float64)):
        leaves = [t.to(dtype).requires_grad_() for t in (x, w, b)]
        y = TINY_OPS[op](*leaves, backend)
        grads = torch.autograd.grad(y, leaves, dy.to(dtype), allow_unused=True)
        results.append([t.detach() for t in (y, *grads) if t is not None])
    for got, want in zip(*results, strict=True):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < 1e-5, (op, err)


def test_eps_zero_on_the_reported_tiny_row() -> None:
    """The reported row, 1e-38 (below fp32's smallest normal): LayerNorm and RMSNorm as float64."""
    x = torch.tensor([[1e-38, -1e-38, 2e-38, -2e-38]], device=DEVICE)
    for norm in (functional.layer_norm, functional.rms_norm):
        got = norm(x, (4,), None, eps=0.0, backend="triton") if norm is functional.rms_norm \
            else norm(x, (4,), None, None, 0.0, backend="triton")
        want = torch.tensor([[0.6324555, -0.6324555, 1.2649111, -1.2649111]], device=DEVICE)
        torch.testing.assert_close(got, want)


def test_first_call_naming_triton_may_come_inside_torch_compile() -> None:
    """A fresh process whose first use of the triton backend is while torch.compile traces: the
    backend's lazy registration runs inside dynamo, which must be able to trace it."""
    import subprocess
    import sys

    script = (
        "import torch, normkit\n"
        "for cls, args in ((normkit.RMSNorm, (8,)), (normkit.ModulatedLayerNorm, (8,))):\n"
        "    m = torch.compile(cls(*args, backend='triton'), fullgraph=True, backend='aot_eager')\n"
        "    x = torch.randn(2, 3, 8)\n"
        "    out = m(x) if cls is normkit.RMSNorm else m(x, x[:, :1], x[:, :1])\n"
        "    print(tuple(out.shape))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["(2,", "3,", "8)", "(2,", "3,", "8)"]
