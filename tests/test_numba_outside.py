"""An outside tester's attacks on the ``"numba"`` backend (issue 12), the way users would call it.

Every op the backend registers, through ``normkit.functional`` with ``backend="numba"`` and
through the default ("auto") path, against ``backend="reference"`` in float64 (the oracle) and
torch in the same precision (the baseline of :func:`normkit.testing.bound`): awkward shapes
(batch 1, primes, rows of length 1, 3-D/5-D), layouts (transposed, sliced, stride-0, storage
offsets, channels_last/_3d), mixed parameter dtypes, NaN/inf and extreme magnitudes, running
statistics, modules and ``normkit.convert``, autograd (random upstream gradients, double
backward, torch.func), threads, and a hypothesis fuzz over shapes, strides and dtypes.

The defects these attacks found were first written as ``xfail(strict=True)`` tests; all are
fixed, and their tests are plain ones now (a new defect gets the same treatment). Random
weights, biases and upstream gradients throughout.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import normkit
import normkit.functional as NF
from normkit.backends import BackendError
from normkit.testing import TOLERANCES, bound

pytest.importorskip("numba")
pytestmark = pytest.mark.skipif("numba" not in normkit.backends(), reason="numba backend not registered")

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- one table: op -> call(backend, x, w, b, r) on an (N, C, *) input -------------------------
# Row norms take per-last-dim parameters, channel norms per-channel ones ("params" says which);
# batch norms get fresh running statistics in x's dtype from a fixed seed, returned with y.


def _running(x: Tensor) -> tuple[Tensor, Tensor]:
    g = _gen(5)
    C = x.shape[1]
    return torch.randn(C, generator=g).to(x.dtype), (torch.rand(C, generator=g) + 0.5).to(x.dtype)


def _bn(act: str | None | bool, training: bool) -> Callable[..., object]:
    def call(be, x, w, b, r):
        rm, rv = _running(x)
        if act is False:
            y = NF.batch_norm(x, rm, rv, w, b, training, 0.3, backend=be)
        else:
            y = NF.batch_norm_act(x, rm, rv, w, b, training, 0.3, act=act, backend=be)
        return (y, rm, rv) if training else y
    return call


OPS: dict[str, tuple[str, Callable[..., object]]] = {
    "layer_norm": ("row", lambda be, x, w, b, r: NF.layer_norm(x, x.shape[-1:], w, b, backend=be)),
    "rms_norm": ("row", lambda be, x, w, b, r: NF.rms_norm(x, x.shape[-1:], w, backend=be)),
    "add_layer_norm": ("row", lambda be, x, w, b, r: NF.add_layer_norm(x, r, x.shape[-1:], w, b, backend=be)),
    "add_rms_norm": ("row", lambda be, x, w, b, r: NF.add_rms_norm(x, r, x.shape[-1:], w, backend=be)),
    "normalize_c": ("channel", lambda be, x, w, b, r: NF.normalize(x, (1,), w, b, backend=be)),
    "normalize_rms_c": ("channel", lambda be, x, w, b, r: NF.normalize(x, (1,), w, b, center=False, backend=be)),
    "group_norm": ("channel", lambda be, x, w, b, r: NF.group_norm(x, 3, w, b, backend=be)),
    "group_norm_gelu": ("channel", lambda be, x, w, b, r: NF.group_norm_act(x, 3, w, b, act="gelu", backend=be)),
    "instance_norm": ("channel", lambda be, x, w, b, r: NF.instance_norm(x, None, None, w, b, backend=be)),
    "batch_norm": ("channel", _bn(False, True)),
    "batch_norm_eval": ("channel", _bn(False, False)),
    "batch_norm_silu": ("channel", _bn("silu", True)),
    "batch_norm_relu_eval": ("channel", _bn("relu", False)),
}


def _layout(t: Tensor, kind: str) -> Tensor:
    """``t``'s values in another memory layout (the same values, other strides)."""
    if kind == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "sliced":
        return torch.repeat_interleave(t, 2, dim=-1)[..., ::2]
    if kind == "offset":
        return torch.cat([t.new_zeros(3), t.reshape(-1)])[3:].view(t.shape)
    if kind == "flipped":
        return t.flip(0).contiguous().flip(0)
    if kind == "expanded":
        return t[:1].expand(t.shape)
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    return t


def _run(op: str, be: str, dtype: torch.dtype, shape: tuple[int, ...], layout: str = "contiguous",
         seed: int = 0, scale: float = 1.0, shift: float = 0.0, affine: str = "both",
         grads: str = "all") -> dict[str, Tensor]:
    """The op's outputs and gradients (random upstream gradient) as a dict of tensors."""
    kind, call = OPS[op]
    g = _gen(seed)
    x64 = torch.randn(shape, generator=g, dtype=F64) * scale + shift
    r64 = torch.randn(shape, generator=g, dtype=F64)
    n = shape[-1] if kind == "row" else shape[1]
    w64, b64 = torch.randn(n, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)
    x = _layout(x64.to(dtype), layout).requires_grad_(grads in ("all", "x"))
    r = r64.to(dtype).requires_grad_(grads in ("all", "x"))
    w = w64.to(dtype).requires_grad_(grads in ("all", "params")) if affine != "none" else None
    b = b64.to(dtype).requires_grad_(grads in ("all", "params")) if affine == "both" else None
    out = call(be, x, w, b, r if op.startswith("add") else None)
    res: dict[str, Tensor] = {}
    if op.startswith("batch_norm") and isinstance(out, tuple):
        out, res["running_mean"], res["running_var"] = out
    if isinstance(out, tuple):  # (y, residual_out): one loss over both
        out = out[0] * 1.5 + out[1]
    res["y"] = out.detach()
    leaves = {"dx": x, "dw": w, "db": b, **({"dr": r} if op.startswith("add") else {})}
    need = {k: v for k, v in leaves.items() if v is not None and v.requires_grad}
    if need:
        dy = torch.randn(out.shape, generator=g, dtype=F64).to(out.dtype)
        got = torch.autograd.grad(out, list(need.values()), dy, allow_unused=True, materialize_grads=True)
        res.update(zip(need, got, strict=True))
    return res


def _assert_within(op: str, dtype: torch.dtype, **case) -> None:
    """numba in ``dtype`` against reference float64: float64 within its table tolerance,
    float32/bf16 within the self-calibrating bound (torch in ``dtype`` as the baseline)."""
    got = _run(op, "numba", dtype, **case)
    ref = _run(op, "reference", F64, **case)
    base = _run(op, "torch", dtype, **case) if dtype != F64 else ref
    assert got.keys() == ref.keys()
    for k, want in ref.items():
        assert got[k].shape == want.shape, (k, got[k].shape, want.shape)
        if dtype == F64:
            tol = TOLERANCES[F64]
            torch.testing.assert_close(got[k], want, rtol=tol.rtol, atol=tol.atol, msg=lambda m, k=k: f"{k}: {m}")
        else:
            b = bound(got[k], want, base[k], dtype)
            assert b.ok, f"{op} {k} ({dtype}, {case}): {b}"


SHAPES = [(1, 6, 7), (5, 3, 1), (3, 6, 5, 2), (2, 3, 2, 3, 5)]
LAYOUTS = ["contiguous", "transposed", "sliced", "offset", "flipped", "expanded", "channels_last"]


def _ok_shape(op: str, shape: tuple[int, ...]) -> bool:
    spatial = math.prod(shape[2:])
    if op == "instance_norm" and spatial < 2:
        return False
    return not (op.startswith("add") and len(shape) > 3)  # 4-D/5-D: their own test below


@pytest.mark.parametrize(("op", "shape"), [(op, s) for op in OPS for s in SHAPES if _ok_shape(op, s)], ids=str)
def test_float64_matches_the_reference_in_every_layout(op: str, shape: tuple[int, ...]) -> None:
    for layout in LAYOUTS:
        if layout == "channels_last" and len(shape) < 4:
            continue
        _assert_within(op, F64, shape=shape, layout=layout, seed=len(layout))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_low_precision_within_the_bound_with_partial_grads(op: str, dtype: torch.dtype) -> None:
    # Offset rows (a large common mean) and weight-only / input-only gradients.
    shape, layout = ((3, 6, 10), "transposed") if op.startswith("add") else ((3, 6, 5, 2), "channels_last")
    _assert_within(op, dtype, shape=shape, shift=50.0, grads="params", affine="w")
    _assert_within(op, dtype, shape=shape, layout=layout, grads="x")


# ---- defects ----------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 3, 2, 2, 4)], ids=str)
def test_add_norm_of_4d_and_5d_input(op: str, shape: tuple[int, ...]) -> None:
    _assert_within(op, torch.float32, shape=shape)


def test_default_path_add_rms_norm_of_a_large_4d_training_input() -> None:
    x = torch.randn(4, 16, 64, 64, generator=_gen(1), requires_grad=True)  # 2^18 elements: "large"
    w = torch.randn(64, generator=_gen(2))
    y, residual_out = NF.add_rms_norm(x, x.detach() * 0.5, (64,), w)
    want = NF.rms_norm(x.detach() * 1.5, (64,), w, backend="torch")
    torch.testing.assert_close(y, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64], ids=str)
def test_rms_norm_of_a_row_with_inf_matches_torch(dtype: torch.dtype) -> None:
    x = torch.randn(2, 8, generator=_gen(3)).to(dtype)
    x[1, 3] = float("inf")
    got = NF.rms_norm(x, (8,), backend="numba")
    torch.testing.assert_close(got, NF.rms_norm(x, (8,), backend="torch"), equal_nan=True)


@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm"])
@pytest.mark.parametrize("shape", [(262144, 1), (65536, 4), (16384, 16)], ids=str)
def test_auto_does_not_pick_numba_for_short_rows_it_was_never_measured_on(op: str, shape: tuple[int, int]) -> None:
    from normkit.backends import resolve

    x = torch.zeros(shape, requires_grad=True)
    args = (x, (shape[-1],), None, None) if op == "rms_norm" else (x, None, (shape[-1],), None, None, None)
    assert not resolve(op, None, *args).__module__.startswith("normkit.ops.numba")


@pytest.mark.parametrize("shape", [(4096, 64), (256, 1024), (4096, 64, 1, 1)], ids=str)
def test_auto_does_not_pick_numba_for_batch_norm_shapes_it_was_never_measured_on(shape: tuple[int, ...]) -> None:
    from normkit.backends import resolve

    x = torch.zeros(shape)
    w, b = torch.ones(shape[1], requires_grad=True), torch.zeros(shape[1], requires_grad=True)
    assert not resolve("batch_norm", None, x, None, None, w, b, True, 0.1, 1e-5).__module__.startswith(
        "normkit.ops.numba")


def test_float32_statistics_of_a_very_long_row_stay_within_the_bound() -> None:
    x = torch.randn(1, 64, 512, 512, generator=_gen(41))
    shape = x.shape[1:]
    got = NF.layer_norm(x, shape, backend="numba")
    want = NF.layer_norm(x.double(), shape, backend="torch")
    b = bound(got, want, NF.layer_norm(x, shape, backend="torch"))
    assert b.ok, b


# ---- non-finite input and extreme magnitudes ---------------------------------------------------


@pytest.mark.parametrize("op", ["layer_norm", "group_norm", "instance_norm", "batch_norm", "batch_norm_silu"])
def test_nan_and_inf_spread_as_torch(op: str) -> None:
    x = torch.randn(3, 6, 5, generator=_gen(4))
    x[0, 0, 0], x[1, 4, 2], x[2, 5, 4] = float("nan"), float("inf"), -float("inf")
    w, b = torch.randn(6, generator=_gen(5)), torch.randn(6, generator=_gen(6))
    if op == "layer_norm":
        w, b = w[:5], b[:5]
    call = OPS[op][1]
    got, want = (call(be, x, w, b, None) for be in ("numba", "torch"))
    got, want = (t[0] if isinstance(t, tuple) else t for t in (got, want))
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.isinf(), want.isinf())


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "group_norm", "batch_norm"])
def test_huge_float32_magnitudes_stay_finite_and_exact(op: str) -> None:
    # torch float32 gives NaN/0 here (its sums of squares overflow): no baseline to calibrate
    # with, so the float64 answer within the float32 table tolerance.
    case = dict(shape=(2, 6, 16), scale=1e30, grads="none")
    got, want = _run(op, "numba", torch.float32, **case), _run(op, "reference", F64, **case)
    tol = TOLERANCES[torch.float32]  # (a float32 running variance of 1e60 is inf: y only)
    torch.testing.assert_close(got["y"].double(), want["y"], rtol=tol.rtol, atol=tol.atol)


def test_float16_is_declined_by_every_op_with_the_reason_and_auto_runs_it() -> None:
    x = torch.randn(2, 6, 4, dtype=torch.float16)
    for op, (_, call) in OPS.items():
        with pytest.raises(BackendError, match="float16 is declined by the numba kernels"):
            call("numba", x, None, None, x if op.startswith("add") else None)
        call(None, x, None, None, x if op.startswith("add") else None)


def test_empty_input_declined_or_computed_as_torch() -> None:
    with pytest.raises(BackendError, match="empty input"):
        NF.layer_norm(torch.randn(0, 8), (8,), backend="numba")
    assert NF.layer_norm(torch.randn(0, 8), (8,)).shape == (0, 8)
    rm, rv = torch.zeros(4), torch.ones(4)
    assert NF.batch_norm(torch.randn(2, 4, 0), rm, rv, training=False, backend="numba").shape == (2, 4, 0)


def test_bfloat16_input_with_float32_parameters_is_torch_exactly() -> None:
    x = torch.randn(4, 6, 16, generator=_gen(7)).bfloat16().requires_grad_()
    w, b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    dy = torch.randn(4, 6, 16, generator=_gen(8)).bfloat16()
    res = {}
    for be in ("numba", "torch"):
        y = NF.layer_norm(x, (16,), w, b, backend=be)
        res[be] = (y, *torch.autograd.grad(y, (x, w, b), dy))
    for got, want in zip(res["numba"], res["torch"], strict=True):
        assert got.dtype == want.dtype
    torch.testing.assert_close(res["numba"][0], res["torch"][0], atol=2**-7, rtol=0)


# ---- running statistics and modules ---------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.0, 0.37, 1.0])
def test_running_statistics_follow_torch_into_strided_buffers(momentum: float) -> None:
    x = torch.randn(3, 5, 4, generator=_gen(9), dtype=F64)
    stats = {}
    for be in ("numba", "torch"):
        rm, rv = torch.randn(10, generator=_gen(10), dtype=F64), torch.rand(10, generator=_gen(11), dtype=F64)
        NF.batch_norm(x, rm[::2], rv[::2], training=True, momentum=momentum, backend=be)
        stats[be] = (rm, rv)
    for got, want in zip(stats["numba"], stats["torch"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)  # odd entries untouched too


def test_failed_calls_leave_running_statistics_untouched() -> None:
    x = torch.randn(3, 5, 4, generator=_gen(12))
    rm, rv = torch.zeros(5), torch.ones(5)
    with pytest.raises(RuntimeError, match="weight should contain 5 elements not 4"):
        NF.batch_norm(x, rm, rv, torch.randn(4), training=True, backend="numba")
    with pytest.raises(BackendError):
        NF.batch_norm(x.half(), rm, rv, training=True, backend="numba")
    assert torch.equal(rm, torch.zeros(5)) and torch.equal(rv, torch.ones(5))


def test_momentum_none_module_and_inference_mode_update_like_torch() -> None:
    mods = {"numba": normkit.BatchNorm2d(6, momentum=None, backend="numba").double(),
            "torch": nn.BatchNorm2d(6, momentum=None).double()}
    for m in mods.values():
        for i in range(3):
            m(torch.randn(2, 6, 3, 3, generator=_gen(13 + i), dtype=F64) * (i + 1) + i)
        with torch.inference_mode():
            m(torch.randn(2, 6, 3, 3, generator=_gen(20), dtype=F64))
        m.eval()
    for key, want in mods["torch"].state_dict().items():
        torch.testing.assert_close(mods["numba"].state_dict()[key], want, rtol=1e-12, atol=1e-12)
    x = torch.randn(2, 6, 3, 3, generator=_gen(21), dtype=F64)
    torch.testing.assert_close(mods["numba"](x), mods["torch"](x), rtol=1e-12, atol=1e-12)


def test_converted_model_trains_as_torch_and_round_trips_its_state_dict() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.GroupNorm(2, 8),
                          nn.Flatten(), nn.LayerNorm(288), nn.Linear(288, 4)).double()
    for p in model.parameters():
        nn.init.normal_(p)
    ours = normkit.convert(copy.deepcopy(model), backend="numba")
    x = torch.randn(4, 3, 8, 8, generator=_gen(22), dtype=F64)
    y, y_ours = model(x), ours(x)
    torch.testing.assert_close(y_ours, y)
    dy = torch.randn(y.shape, generator=_gen(23), dtype=F64)
    y.backward(dy)
    y_ours.backward(dy)
    for p, q in zip(model.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad)
    torch.testing.assert_close(ours[1].running_var, model[1].running_var)
    model.load_state_dict(ours.state_dict())
    assert list(model.state_dict()) == list(ours.state_dict())


# ---- autograd -----------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["layer_norm", "group_norm", "batch_norm"])
def test_double_backward_works_and_forward_mode_raises_clearly(op: str) -> None:
    x = torch.randn(3, 6, 4, generator=_gen(24), dtype=F64, requires_grad=True)
    w = torch.randn(6, dtype=F64, requires_grad=True)
    call = OPS[op][1]
    y = call("numba", x, w[:4] if op == "layer_norm" else w, None, None)
    y = y[0] if isinstance(y, tuple) else y
    # second-order gradients come from the differentiable composition: the reference's
    dy = torch.randn(y.shape, generator=_gen(29), dtype=F64)
    (gx,) = torch.autograd.grad(y, x, dy, create_graph=True)
    ref = call("reference", x, w[:4] if op == "layer_norm" else w, None, None)
    (rx,) = torch.autograd.grad(ref[0] if isinstance(ref, tuple) else ref, x, dy, create_graph=True)
    torch.testing.assert_close(torch.autograd.grad(gx.pow(2).sum(), (x, w)),
                               torch.autograd.grad(rx.pow(2).sum(), (x, w)))
    with pytest.raises(RuntimeError, match="forward-mode AD"):
        torch.func.jvp(lambda t: NF.rms_norm(t, (4,), backend="numba"), (x.detach(),), (torch.ones_like(x),))


def test_torch_func_grad_vmap_and_retain_graph_match_the_reference() -> None:
    x = torch.randn(3, 2, 6, 5, generator=_gen(25), dtype=F64)
    w = torch.randn(5, generator=_gen(26), dtype=F64)
    weights = torch.randn(5, generator=_gen(27), dtype=F64)

    def loss(be):
        return lambda t: (NF.layer_norm(t, (5,), w, backend=be) * weights).sum()

    for fn in (lambda be: torch.func.grad(loss(be))(x),
               lambda be: torch.func.vmap(torch.func.grad(loss(be)))(x),
               lambda be: torch.func.vmap(lambda t: NF.group_norm(t, 3, backend=be))(x)):
        torch.testing.assert_close(fn("numba"), fn("reference"))
    xs = x.clone().requires_grad_()
    y = NF.rms_norm(xs, (5,), w, backend="numba")
    dy = torch.randn(y.shape, generator=_gen(28), dtype=F64)
    y.backward(dy, retain_graph=True)
    first = xs.grad.clone()
    y.backward(dy)
    assert torch.equal(xs.grad, first * 2)


# ---- determinism, batch invariance, threads ---------------------------------------------------


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _bits(op: str, x: Tensor, dy: Tensor, dtype: torch.dtype) -> list[Tensor]:
    kind, call = OPS[op]
    n = x.shape[-1] if kind == "row" else x.shape[1]
    w, b = (torch.randn(n, generator=_gen(s)).to(dtype).requires_grad_() for s in (30, 31))
    xs = x.to(dtype).detach().requires_grad_()
    out = call("numba", xs, w, b, xs.detach() * 0.5 if op.startswith("add") else None)
    y = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad(y, (xs, w, b), dy.to(dtype), allow_unused=True, materialize_grads=True)
    return [y.detach(), *grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_and_samples_do_not_depend_on_their_batch_even_at_odd_offsets(dtype: torch.dtype) -> None:
    # Odd row lengths put each row at another alignment; a slice keeps the storage offset.
    for op, shape in [("rms_norm", (41, 1, 1001)), ("add_layer_norm", (41, 1, 13)),
                      ("group_norm", (9, 6, 7, 5)), ("instance_norm", (9, 6, 3, 5, 3))]:
        x = torch.randn(shape, generator=_gen(32)) * 3 + 1
        dy = torch.randn(shape, generator=_gen(33))
        if len(shape) > 3:
            x = _layout(x, "channels_last")
        whole = _bits(op, x, dy, dtype)[:2]
        for lo, hi in [(0, 1), (5, 6), (2, 7), (shape[0] - 1, shape[0])]:
            part = _bits(op, x[lo:hi], dy[lo:hi], dtype)[:2]
            for a, b in zip(part, whole, strict=True):
                assert torch.equal(a, b[lo:hi]), (op, lo, hi)


def test_bits_survive_thread_count_changes_and_concurrent_python_threads(restore_threads) -> None:
    x = torch.randn(6, 12, 9, 11, generator=_gen(34))
    dy = torch.randn(6, 12, 9, 11, generator=_gen(35))
    rows = torch.randn(257, 1, 1031, generator=_gen(36))
    drows = torch.randn(257, 1, 1031, generator=_gen(37))

    def job() -> list[Tensor]:
        return (_bits("rms_norm", rows, drows, torch.float32)
                + _bits("batch_norm", _layout(x, "channels_last"), dy, torch.float32)
                + _bits("group_norm_gelu", x, dy, torch.bfloat16))

    torch.set_num_threads(1)
    base = job()
    for n in (2, 3):
        torch.set_num_threads(n)
        assert all(torch.equal(a, b) for a, b in zip(job(), base, strict=True)), n
    errors: list[object] = []

    def worker() -> None:
        try:
            if not all(torch.equal(a, b) for a, b in zip(job(), base, strict=True)):
                errors.append("bits differ")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def toggle() -> None:
        for k in range(20):
            torch.set_num_threads(1 + k % 3)

    threads = [threading.Thread(target=worker) for _ in range(3)] + [threading.Thread(target=toggle)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# ---- precision options ------------------------------------------------------------------------


PRECISION_CALLS: dict[str, Callable[..., Tensor]] = {
    "layer_norm": lambda x, w, b, **kw: NF.layer_norm(x, (3,), w[:3], b[:3], **kw),
    "rms_norm": lambda x, w, b, **kw: NF.rms_norm(x, (3,), w[:3], **kw),
    "group_norm_gelu": lambda x, w, b, **kw: NF.group_norm_act(x, 3, w, b, act="gelu", **kw),
    "instance_norm": lambda x, w, b, **kw: NF.instance_norm(x, None, None, w, b, **kw),
    "batch_norm_silu": lambda x, w, b, **kw: NF.batch_norm_act(x, torch.zeros(6), torch.ones(6), w, b, True,
                                                               act="silu", **kw),
    "normalize_c": lambda x, w, b, **kw: NF.normalize(x, (1,), w, b, **kw),
}


@pytest.mark.parametrize("op", PRECISION_CALLS)
def test_stats_and_out_dtype_options_match_the_reference(op: str) -> None:
    x = torch.randn(4, 6, 5, 3, generator=_gen(38))
    w, b = torch.randn(6, generator=_gen(39)), torch.randn(6, generator=_gen(40))
    for kw in (dict(stats_dtype=F64, out_dtype=F64), dict(out_dtype=torch.bfloat16)):
        got, want = (PRECISION_CALLS[op](x, w, b, backend=be, **kw) for be in ("numba", "reference"))
        assert got.dtype == want.dtype == kw["out_dtype"]
        atol = 1e-12 if got.dtype == F64 else 2**-7 * 4  # bf16: one ulp at |y| < 4
        torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=atol)


# ---- hypothesis fuzz --------------------------------------------------------------------------


@st.composite
def _fuzz_cases(draw):
    op = draw(st.sampled_from(sorted(OPS)))
    rank = draw(st.integers(3, 3 if op.startswith("add") else 5))
    shape = [draw(st.sampled_from([1, 2, 3, 5, 7])) for _ in range(rank)]
    shape[1] = draw(st.sampled_from([3, 6]))  # group_norm uses 3 groups
    if math.prod(shape[2:]) < 2:
        shape[-1] = 2
    layouts = ["contiguous", "transposed", "sliced", "offset", "flipped", "expanded"]
    return op, tuple(shape), dict(
        layout=draw(st.sampled_from(layouts + (["channels_last"] if rank > 3 else []))),
        seed=draw(st.integers(0, 2**16)), scale=draw(st.sampled_from([1.0, 1e-3, 1e4])),
        shift=draw(st.sampled_from([0.0, 100.0])), affine=draw(st.sampled_from(["both", "w", "none"])),
        grads=draw(st.sampled_from(["all", "x", "params"])),
    ), draw(st.sampled_from([torch.float32, F64, torch.bfloat16]))


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(_fuzz_cases())
def test_fuzz_against_the_float64_reference(case) -> None:
    op, shape, kw, dtype = case
    if op == "batch_norm" or op == "batch_norm_silu":
        kw["shape"] = (max(shape[0], 2), *shape[1:])
    else:
        kw["shape"] = shape
    _assert_within(op, dtype, **kw)
