"""The numba row norms' eager fast paths (:mod:`normkit.ops.numba.row_norm`), each against the
path it stands in for:

* eager calls on plain tensors skip the custom ops (``row_norm._apply_row_norm``: the kernels on the tensors
  as they are, by address) and, without autograd recording, any autograd Function: the
  outputs and every gradient are bit-identical to the custom-op path's (forced here), for
  every row norm, dtype, leading shape, ``normalized_shape`` of one or two dims, and
  non-contiguous input, residual and upstream gradient;
* up to ``MAX_BLOCKS`` rows the backward sums the weight/bias gradients over all rows in one
  block at any thread count: the same bits at 1, 2 and 3 threads;
* what the fast paths must not change: a no-grad result has no graph; forward mode still
  raises; a functorch wrapper left behind by a transform, torch.func and torch.compile
  (fullgraph) still take the custom ops; double backward through that Function (two-dim
  ``normalized_shape``, a residual) matches torch in float64; only ``residual_out`` reaching
  the loss (no gradient for ``y``) is handled;
* the generic launchers (``autograd_pair``: the channel and block norms) skip their Function
  without autograd recording, with the same bits.

Random weights, biases and upstream gradients throughout.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import normkit
import normkit.functional as NF
from cases import seed_of

pytest.importorskip("numba")
_engine = pytest.importorskip("normkit.ops.numba._engine")
row_norm = pytest.importorskip("normkit.ops.numba.row_norm")
pytestmark = pytest.mark.skipif("numba" not in normkit.backends(), reason="numba backend not registered")

OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
DTYPES = (torch.float32, torch.bfloat16, torch.float64)
# (input shape, normalized_shape): few rows (one-block backward) and more than MAX_BLOCKS,
# a 3-d input, two normalized dims, an odd length.
SHAPES = [((8, 256), (256,)), ((70, 33), (33,)), ((3, 5, 64), (64,)), ((6, 4, 12), (4, 12)), ((1, 37), (37,))]


# op -> (x, residual, weight, bias, normalized_shape) -> its outputs, on the numba backend.
_CALLS: dict[str, Callable[..., tuple[Tensor, ...]]] = {
    "layer_norm": lambda x, r, w, b, s: (NF.layer_norm(x, s, w, b, 1e-5, backend="numba"),),
    "rms_norm": lambda x, r, w, b, s: (NF.rms_norm(x, s, w, 1e-6, backend="numba"),),
    "add_layer_norm": lambda x, r, w, b, s: tuple(NF.add_layer_norm(x, r, s, w, b, 1e-5, backend="numba")),
    "add_rms_norm": lambda x, r, w, b, s: tuple(NF.add_rms_norm(x, r, s, w, 1e-6, backend="numba")),
}


def _call(
    op: str, x: Tensor, r: Tensor | None, w: Tensor, b: Tensor | None, shape: tuple[int, ...]
) -> tuple[Tensor, ...]:
    return _CALLS[op](x, r, w, b, shape)


def _inputs(
    op: str, xshape: tuple[int, ...], shape: tuple[int, ...], dtype: torch.dtype, transposed: bool = False
) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed_of(op, xshape, dtype, transposed))

    def rand(*s: int) -> Tensor:
        return (torch.randn(*s, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)

    # transposed: a 2-d input and residual as non-contiguous views
    x = rand(*reversed(xshape)).t() if transposed else rand(*xshape)
    t = {"x": x, "w": rand(*shape)}
    if op.startswith("add_"):
        t["r"] = rand(*reversed(xshape)).t() if transposed else rand(*xshape)
    if op in ("layer_norm", "add_layer_norm"):
        t["b"] = rand(*shape)
    return t


def _results(
    op: str, inputs: dict[str, Tensor], shape: tuple[int, ...], need: tuple[str, ...], dys: list[Tensor | None]
) -> dict[str, Tensor]:
    """Outputs, and the gradients of the inputs named in ``need`` (dys: one per output, None
    for an output that does not reach the loss)."""
    leaves = {k: v.detach().clone().requires_grad_(k in need) for k, v in inputs.items()}
    outs = _call(op, leaves["x"], leaves.get("r"), leaves["w"], leaves.get("b"), shape)
    used = [(o, d.to(o.dtype)) for o, d in zip(outs, dys, strict=True) if d is not None]
    grads = torch.autograd.grad([o for o, _ in used], [leaves[k] for k in need], [d for _, d in used])
    found = {f"out{i}": o.detach() for i, o in enumerate(outs)}
    found.update({f"d{k}": g for k, g in zip(need, grads, strict=True)})
    return found


def _dys(like: Tensor, n: int, seed: int) -> list[Tensor]:
    """``n`` upstream gradients of ``like``'s shape, in its layout (transposed 2-d: non-contiguous)."""
    g = torch.Generator().manual_seed(seed)
    if like.dim() == 2 and not like.is_contiguous():
        return [torch.randn(like.shape[::-1], generator=g, dtype=torch.float64).t() for _ in range(n)]
    return [torch.randn(like.shape, generator=g, dtype=torch.float64) for _ in range(n)]


def _assert_bits(want: dict[str, Tensor], got: dict[str, Tensor], what: str) -> None:
    assert want.keys() == got.keys(), what
    for k in want:
        a, b = want[k], got[k]
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {k} {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        assert torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)), (
            f"{what}: {k} differs"
        )


@pytest.fixture
def op_path(monkeypatch) -> Callable[[], None]:
    """Calling it sends the row norms through the custom ops' path for the rest of the test."""
    return lambda: monkeypatch.setattr(row_norm, "eager_plain", lambda *tensors: False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("xshape,shape", SHAPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_eager_path_bits_equal_the_custom_op_path(op, xshape, shape, dtype, op_path) -> None:
    inputs = _inputs(op, xshape, shape, dtype, transposed=len(xshape) == 2 and xshape[0] > 1)
    need = tuple(inputs)
    dys = _dys(inputs["x"], 2 if op.startswith("add_") else 1, seed_of(op, xshape, "dy"))
    with torch.no_grad():
        nograd = _call(op, inputs["x"], inputs.get("r"), inputs["w"], inputs.get("b"), shape)
    fast = _results(op, inputs, shape, need, dys)
    op_path()
    slow = _results(op, inputs, shape, need, dys)
    _assert_bits(slow, fast, f"{op} {xshape} {dtype}")
    _assert_bits(
        {k: v for k, v in slow.items() if k.startswith("out")},
        {f"out{i}": o for i, o in enumerate(nograd)},
        f"{op} {xshape} {dtype} no-grad",
    )
    assert all(o.grad_fn is None and not o.requires_grad for o in nograd)


@pytest.mark.parametrize("op", OPS)
def test_partial_gradients_and_unused_outputs_match_the_custom_op_path(op, op_path) -> None:
    """Each input's gradient asked for alone, and (add-norms) only residual_out in the loss:
    the eager Function then gets no gradient for y at all."""
    shape = (48,)
    inputs = _inputs(op, (5, 48), shape, torch.float32)
    dy = _dys(inputs["x"], 2, seed_of(op, "partial"))
    variants = [((k,), dy[: 2 if op.startswith("add_") else 1]) for k in inputs]
    if op.startswith("add_"):
        variants.append((("x", "r", "w"), [None, dy[1]]))
    fast = [_results(op, inputs, shape, need, dys) for need, dys in variants]
    op_path()
    slow = [_results(op, inputs, shape, need, dys) for need, dys in variants]
    for (need, _), a, b in zip(variants, slow, fast, strict=True):
        _assert_bits(a, b, f"{op} needing {need}")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("M", (1, 7, 32))
def test_one_block_backward_equals_per_row_blocks_at_any_thread_count(op, M, dtype, monkeypatch) -> None:
    """Up to MAX_BLOCKS rows: one block of all rows whatever the threads (every call split).
    The same bits."""
    assert M <= row_norm.MAX_BLOCKS
    shape = (300,)
    inputs = _inputs(op, (M, 300), shape, dtype)
    need = tuple(inputs)
    dys = _dys(inputs["x"], 2 if op.startswith("add_") else 1, seed_of(op, M, "blocks"))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_block = _results(op, inputs, shape, need, dys)
        monkeypatch.setattr(_engine, "PARALLEL_MIN_ELEMENTS", 0)
        for n in (2, 3):
            torch.set_num_threads(n)
            _assert_bits(one_block, _results(op, inputs, shape, need, dys), f"{op} M={M} {dtype} at {n} threads")
    finally:
        torch.set_num_threads(before)


def test_forward_mode_still_raises_and_a_dead_functorch_wrapper_still_runs() -> None:
    import torch.autograd.forward_ad as fwAD

    x, w = torch.randn(4, 16), torch.randn(16)
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD"):
        NF.rms_norm(fwAD.make_dual(x, torch.randn(4, 16)), (16,), w, backend="numba")
    with torch.no_grad(), fwAD.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD"):
        NF.layer_norm(fwAD.make_dual(x, torch.randn(4, 16)), (16,), w, backend="numba")
    leaked: list[Tensor] = []

    def f(t: Tensor) -> Tensor:
        leaked.append(t * 1.0)
        return (t * 2).sum()

    torch.func.grad(f)(x)
    dead = leaked[0]
    assert torch._C._functorch.is_functorch_wrapped_tensor(dead)
    torch.testing.assert_close(NF.rms_norm(dead, (16,), w, backend="numba"), NF.rms_norm(x, (16,), w, backend="numba"))


def test_torch_func_and_compile_take_the_custom_ops(monkeypatch) -> None:
    """Under torch.func and torch.compile the eager Function is never used (its forward raising
    here proves it), and both still give the eager bits / torch's values."""
    g = torch.Generator().manual_seed(seed_of("func-compile"))
    x, r = torch.randn(6, 40, generator=g, dtype=torch.float64), torch.randn(6, 40, generator=g, dtype=torch.float64)
    w, b = torch.randn(40, generator=g, dtype=torch.float64), torch.randn(40, generator=g, dtype=torch.float64)
    weights = torch.randn(6, 40, generator=g, dtype=torch.float64)

    def loss(be: str) -> Callable[[Tensor], Tensor]:
        return lambda t: (NF.add_layer_norm(t, r, (40,), w, b, backend=be)[0] * weights).sum()

    eager_grad = torch.func.grad(loss("numba"))(x)

    def refuse(*args):
        raise AssertionError("the eager Function ran")

    monkeypatch.setattr(row_norm, "_apply_row_norm", refuse)
    torch.testing.assert_close(torch.func.grad(loss("numba"))(x), torch.func.grad(loss("torch"))(x))
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(loss("numba")))(x[None]), eager_grad[None])

    def f(x, r, w, b):
        y, h = NF.add_rms_norm(x, r, (40,), w, backend="numba")
        return NF.layer_norm(y + h, (40,), w, b, backend="numba")

    leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
    dy = torch.randn(6, 40, generator=g, dtype=torch.float64)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
    got = torch.autograd.grad(compiled, leaves, dy)
    monkeypatch.undo()
    eager = f(*leaves)
    want = torch.autograd.grad(eager, leaves, dy)
    _assert_bits(
        {"y": eager.detach(), **{str(i): t for i, t in enumerate(want)}},
        {"y": compiled.detach(), **{str(i): t for i, t in enumerate(got)}},
        "compiled vs eager",
    )


@pytest.mark.parametrize("op", OPS)
def test_double_backward_through_the_eager_function_matches_torch(op) -> None:
    """A gradient penalty through the eager Function with two normalized dims (its graph backward
    reshapes to rows and back) and a residual: torch's float64 second derivatives."""
    shape = (3, 8)
    inputs = _inputs(op, (4, 3, 8), shape, torch.float64)
    dys = _dys(inputs["x"], 2 if op.startswith("add_") else 1, seed_of(op, "penalty"))

    def penalty(be: str) -> tuple[Tensor, ...]:
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        x, r, w, b = leaves["x"], leaves.get("r"), leaves["w"], leaves.get("b")
        if be == "numba":
            outs = _call(op, x, r, w, b, shape)
        else:
            h = x + r if r is not None else x
            y = (
                torch.nn.functional.layer_norm(h, shape, w, b, 1e-5)
                if "layer" in op
                else torch.nn.functional.rms_norm(h, shape, w, 1e-6)
            )
            outs = (y, h) if r is not None else (y,)
        first = torch.autograd.grad(outs, list(leaves.values()), dys, create_graph=True)
        # (a bias's value reaches no first derivative: its second derivative is zero, None here)
        second = torch.autograd.grad(sum((g * g).sum() for g in first), list(leaves.values()), allow_unused=True)
        return tuple(torch.zeros_like(p) if s is None else s for p, s in zip(leaves.values(), second, strict=True))

    for a, b in zip(penalty("numba"), penalty("torch"), strict=True):
        torch.testing.assert_close(a, b)


def test_inference_mode_and_grad_mode_without_grads_run_the_kernels_alone() -> None:
    x, w, b = torch.randn(5, 24), torch.randn(24), torch.randn(24)
    want = NF.layer_norm(x, (24,), w, b, backend="numba")
    assert want.grad_fn is None
    with torch.inference_mode():
        got = NF.layer_norm(x, (24,), w, b, backend="numba")
    _assert_bits({"y": want}, {"y": got}, "inference mode")
    y, h = NF.add_rms_norm(x, x.flip(0), (24,), w, backend="numba")
    assert y.grad_fn is None and h.grad_fn is None


def test_autograd_pair_launchers_skip_their_function_without_grad() -> None:
    """The channel and block norms (``autograd_pair``): a no-grad forward runs the op's
    implementation alone, with the bits of the recorded forward."""
    g = torch.Generator().manual_seed(seed_of("pair"))
    x = torch.randn(2, 6, 5, 5, generator=g)
    w, b = torch.randn(6, generator=g), torch.randn(6, generator=g)
    shift, scale = torch.randn(2, 1, 25, generator=g), torch.randn(2, 1, 25, generator=g)
    calls = [
        lambda x, w, b: NF.group_norm(x, 3, w, b, backend="numba"),
        lambda x, w, b: NF.modulated_layer_norm(x.reshape(2, 6, 25), shift, scale, backend="numba"),
    ]
    for call in calls:
        with torch.no_grad():
            plain = call(x, w, b)
        recorded = call(x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_())
        assert recorded.grad_fn is not None and plain.grad_fn is None
        _assert_bits({"y": recorded.detach()}, {"y": plain}, "no-grad forward")
