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

from kernel_bound import assert_within_bound  # noqa: E402
from normkit import functional, reference  # noqa: E402
from normkit.ops.triton import batch_norm as B  # noqa: E402
from normkit.ops.triton import row_norm as T  # noqa: E402

f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16

# ---- torch.func on every triton op ------------------------------------------------------------

# Every op as ``f(x, weight, bias, backend)`` on an (N, C, L) input with C = 4 channels
# (2 groups) and L = 2 (the trailing norms' row); ops without a bias ignore it. One sample:
# jacrev runs one backward per output element, and the interpreter takes ~0.2 s for each.
OPS: dict[str, Callable] = {
    "layer_norm": lambda x, w, b, be: functional.layer_norm(x, (2,), w[:2], b[:2], backend=be),
    "rms_norm": lambda x, w, b, be: functional.rms_norm(x, (2,), w[:2], backend=be),
    "add_layer_norm": lambda x, w, b, be: functional.add_layer_norm(
        x, x.roll(1, 1), (2,), w[:2], b[:2], backend=be),
    "add_rms_norm": lambda x, w, b, be: functional.add_rms_norm(x, x * 0.5, (2,), w[:2], backend=be),
    "group_norm": lambda x, w, b, be: functional.group_norm(x, 2, w, b, backend=be),
    "group_norm_act": lambda x, w, b, be: functional.group_norm_act(x, 2, w, b, act="gelu", backend=be),
    "instance_norm": lambda x, w, b, be: functional.instance_norm(x, None, None, w, b, backend=be),
    "batch_norm_train": lambda x, w, b, be: functional.batch_norm(x, None, None, w, b, True, backend=be),
    "batch_norm_eval": lambda x, w, b, be: functional.batch_norm(
        x, torch.linspace(-1, 1, 4, device=x.device), torch.linspace(0.5, 2, 4, device=x.device),
        w, b, False, backend=be),
    "batch_norm_act": lambda x, w, b, be: functional.batch_norm_act(
        x, None, None, w, b, True, act="silu", backend=be),
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
    x, w, b = (torch.randn(shape, generator=gen).to(DEVICE) for shape in ((1, 4, 2), (4,), (4,)))
    want = _transforms(OPS[op], x, w, b, "torch")[transform]()
    run = _transforms(OPS[op], x, w, b, "triton")[transform]
    if transform in ("jvp", "jacfwd"):
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            run()
        return
    got = run()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


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
