"""torch.func transforms on every backend: normkit's result is torch's.

Every op of :mod:`normkit.functional` is run under ``grad``, ``vmap``, ``jacrev``, ``jacfwd``,
``jvp`` and ``vmap(grad)`` (per-sample gradients) and compared with the same transform of its
torch twin, in float64 with random inputs, weights, biases, tangents and upstream gradients.
Modules go through ``torch.func.functional_call``. Running statistics under ``vmap`` behave as
torch's: an unbatched running statistic cannot take a per-sample update, and the call fails
before anything is written; ``torch.func.replace_all_batch_norm_modules_`` works on normkit's
BatchNorm modules as on torch's.

The triton backend runs in float32 (it has no float64 kernels) against torch in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vmap

import normkit
import normkit.functional as NF
from cases import BACKENDS, run_or_skip, seed_of

TRANSFORM_BACKENDS = [b for b in BACKENDS if b in ("torch", "reference", "triton")]
EPS = 1e-3


@dataclass(frozen=True)
class Op:
    """``normkit(x, w, b, backend)`` and its torch twin ``torch(x, w, b)``; ``x`` of ``shape``,
    ``w``/``b`` of ``param`` (ops without them ignore them). Tuple outputs are concatenated."""

    normkit: Callable[..., Any]
    torch: Callable[..., Any]
    shape: tuple[int, ...]
    param: tuple[int, ...]


def _constant(name: str, *shape: int, positive: bool = False) -> Tensor:
    """A fixed tensor of the case (running statistics, a residual), the same for both sides."""
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed_of(name)), dtype=torch.float64)
    return t.abs() + 0.5 if positive else t


# Drawn once, outside any transform (vmap refuses random operations inside it).
_STATS = (_constant("mean", 3), _constant("var", 3, positive=True))
_RESIDUAL = _constant("residual", 3, 5)


def _stats(like: Tensor) -> tuple[Tensor, Tensor]:
    return tuple(t.to(like.dtype) for t in _STATS)  # type: ignore[return-value]


def _residual(like: Tensor) -> Tensor:
    return _RESIDUAL.to(like.dtype)


def _flat(out: Any) -> Tensor:
    return torch.cat([t.flatten() for t in out]) if isinstance(out, tuple) else out


OPS: dict[str, Op] = {
    "layer_norm": Op(lambda x, w, b, be: NF.layer_norm(x, (5,), w, b, EPS, backend=be),
                     lambda x, w, b: F.layer_norm(x, (5,), w, b, EPS), (2, 3, 5), (5,)),
    "rms_norm": Op(lambda x, w, b, be: NF.rms_norm(x, (5,), w, EPS, backend=be),
                   lambda x, w, b: F.rms_norm(x, (5,), w, EPS), (2, 3, 5), (5,)),
    "group_norm": Op(lambda x, w, b, be: NF.group_norm(x, 2, w, b, EPS, backend=be),
                     lambda x, w, b: F.group_norm(x, 2, w, b, EPS), (2, 4, 3), (4,)),
    "instance_norm": Op(lambda x, w, b, be: NF.instance_norm(x, None, None, w, b, True, 0.1, EPS, backend=be),
                        lambda x, w, b: F.instance_norm(x, None, None, w, b, True, 0.1, EPS), (2, 3, 4), (3,)),
    "batch_norm-train": Op(lambda x, w, b, be: NF.batch_norm(x, None, None, w, b, True, 0.1, EPS, backend=be),
                           lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.1, EPS), (4, 3, 2), (3,)),
    "batch_norm-eval": Op(lambda x, w, b, be: NF.batch_norm(x, *_stats(x), w, b, False, 0.1, EPS, backend=be),
                          lambda x, w, b: F.batch_norm(x, *_stats(x), w, b, False, 0.1, EPS), (4, 3, 2), (3,)),
    "local_response_norm": Op(lambda x, w, b, be: NF.local_response_norm(x, 3, 0.5, 0.75, 1.5, backend=be),
                              lambda x, w, b: F.local_response_norm(x, 3, 0.5, 0.75, 1.5), (2, 5, 3), (5,)),
    "normalize": Op(lambda x, w, b, be: NF.normalize(x, (1,), w, b, EPS, backend=be),
                    lambda x, w, b: F.layer_norm(x.movedim(1, -1), (4,), w, b, EPS).movedim(-1, 1), (2, 4, 3), (4,)),
    "add_layer_norm": Op(
        lambda x, w, b, be: _flat(NF.add_layer_norm(x, _residual(x), (5,), w, b, EPS, backend=be)),
        lambda x, w, b: _flat((F.layer_norm(x + _residual(x), (5,), w, b, EPS), x + _residual(x))),
        (3, 5), (5,)),
    "add_rms_norm": Op(
        lambda x, w, b, be: _flat(NF.add_rms_norm(x, _residual(x), (5,), w, EPS, backend=be)),
        lambda x, w, b: _flat((F.rms_norm(x + _residual(x), (5,), w, EPS), x + _residual(x))),
        (3, 5), (5,)),
    "batch_norm_act": Op(
        lambda x, w, b, be: NF.batch_norm_act(x, None, None, w, b, True, 0.1, EPS, act="silu", backend=be),
        lambda x, w, b: F.silu(F.batch_norm(x, None, None, w, b, True, 0.1, EPS)), (4, 3, 2), (3,)),
    "group_norm_act": Op(
        lambda x, w, b, be: NF.group_norm_act(x, 2, w, b, EPS, act="silu", backend=be),
        lambda x, w, b: F.silu(F.group_norm(x, 2, w, b, EPS)), (2, 4, 3), (4,)),
}

B = 3  # the vmapped batch


def _transforms(gen: torch.Generator, op: Op) -> dict[str, Callable[[Callable[..., Any], tuple[Tensor, ...]], Any]]:
    """Each transform applied to ``f(x, w, b)`` at the primal ``(x, w, b)``; its random extras
    (upstream gradient, tangents, the vmapped batch) drawn once, shared by both sides."""

    def rand(*shape: int) -> Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    out_numel = _flat(op.torch(rand(*op.shape), rand(*op.param), rand(*op.param))).shape
    upstream = rand(*out_numel)
    tangents = (rand(*op.shape), rand(*op.param), rand(*op.param))
    batch = rand(B, *op.shape)

    def loss(f: Callable[..., Any]) -> Callable[..., Tensor]:
        return lambda x, w, b: (_flat(f(x, w, b)) * upstream.to(x.dtype)).sum()

    def cast(ts: tuple[Tensor, ...], like: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.to(like.dtype) for t in ts)

    return {
        "grad": lambda f, p: grad(loss(f), argnums=(0, 1, 2))(*p),
        "vmap": lambda f, p: vmap(f, in_dims=(0, None, None))(batch.to(p[0].dtype), p[1], p[2]),
        "jacrev": lambda f, p: jacrev(f, argnums=(0, 1, 2))(*p),
        "jacfwd": lambda f, p: jacfwd(f, argnums=(0, 1, 2))(*p),
        "jvp": lambda f, p: jvp(f, p, cast(tangents, p[0])),
        "vmap(grad)": lambda f, p: vmap(
            grad(lambda w, b, x: loss(f)(x, w, b), argnums=(0, 1)), in_dims=(None, None, 0)
        )(p[1], p[2], batch.to(p[0].dtype)),
    }


def _assert_close(actual: Any, expected: Any, dtype: torch.dtype) -> None:
    # float64 on both sides: only rounding differs. The triton backend runs in float32.
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(actual, expected, check_dtype=False, **tol)


# The triton kernels have no forward-mode rule: they refuse it with this error rather than give
# zero tangents (the torch and reference backends compute it).
TRITON_FORWARD_MODE = {"jvp", "jacfwd"}
FORWARD_MODE_ERROR = "forward-mode AD .* is not supported by normkit's triton kernels"


def _refused(backend: str, transform: str) -> bool:
    return backend == "triton" and transform in TRITON_FORWARD_MODE


@pytest.mark.parametrize("backend", TRANSFORM_BACKENDS)
@pytest.mark.parametrize("transform", ["grad", "vmap", "jacrev", "jacfwd", "jvp", "vmap(grad)"])
@pytest.mark.parametrize("name", list(OPS))
def test_transform_matches_torch(name: str, transform: str, backend: str, request: pytest.FixtureRequest) -> None:
    if backend == "triton" and transform == "jacrev":
        pytest.skip("jacrev on triton: vmap runs the custom backward once per output element, minutes in the "
                    "interpreter; vmap over the backward is covered by vmap(grad)")
    op = OPS[name]
    gen = torch.Generator().manual_seed(seed_of(name, transform))
    primal = tuple(torch.randn(s, generator=gen, dtype=torch.float64) for s in (op.shape, op.param, op.param))
    apply = _transforms(gen, op)[transform]
    expected = apply(op.torch, primal)
    dtype = torch.float32 if backend == "triton" else torch.float64
    run = lambda: apply(lambda x, w, b: op.normkit(x, w, b, backend), tuple(p.to(dtype) for p in primal))
    if _refused(backend, transform):
        with pytest.raises(RuntimeError, match=FORWARD_MODE_ERROR):
            run_or_skip(backend, run)
        return
    _assert_close(run_or_skip(backend, run), expected, dtype)


# ---- running statistics under vmap -------------------------------------------------------------


@pytest.mark.parametrize("backend", TRANSFORM_BACKENDS)
@pytest.mark.parametrize("op", ["batch_norm", "instance_norm"])
def test_vmap_with_unbatched_running_stats_fails_as_torch_and_writes_nothing(op: str, backend: str) -> None:
    """torch's batch rule refuses a per-sample update of unbatched running statistics; so does
    normkit on every backend (same type; torch's message on torch and reference), stats untouched."""
    gen = torch.Generator().manual_seed(seed_of("vmap running", op))
    xs = torch.randn(B, 4, 3, 5, generator=gen)

    def call(fn: Callable[..., Tensor], stats: tuple[Tensor, Tensor], **kw: Any) -> Callable[[Tensor], Tensor]:
        return lambda x: fn(x, *stats, None, None, True, 0.1, EPS, **kw)

    torch_stats, stats = (torch.zeros(3), torch.ones(3)), (torch.zeros(3), torch.ones(3))
    with pytest.raises(RuntimeError) as expected:
        vmap(call(getattr(F, op), torch_stats))(xs)
    with pytest.raises(RuntimeError) as actual:
        vmap(call(getattr(NF, op), stats, backend=backend))(xs)
    if backend != "triton":
        assert str(actual.value) == str(expected.value)
    assert torch.equal(stats[0], torch.zeros(3)) and torch.equal(stats[1], torch.ones(3))


# ---- modules through functional_call -----------------------------------------------------------


MODULES: dict[str, tuple[Callable[[Any], nn.Module], tuple[int, ...]]] = {
    "LayerNorm": (lambda lib: lib.LayerNorm(5), (3, 5)),
    "RMSNorm": (lambda lib: lib.RMSNorm(5), (3, 5)),
    "GroupNorm": (lambda lib: lib.GroupNorm(2, 4), (4, 3)),
    "BatchNorm1d-no-running-stats": (lambda lib: lib.BatchNorm1d(3, track_running_stats=False), (3, 4)),
    "InstanceNorm1d-affine": (lambda lib: lib.InstanceNorm1d(3, affine=True), (3, 4)),
}


def _random_params(module: nn.Module, name: str) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed_of(name, "params"))
    return {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in module.named_parameters()}


@pytest.mark.parametrize("backend", TRANSFORM_BACKENDS)
@pytest.mark.parametrize("name", list(MODULES))
def test_per_sample_gradients_through_functional_call(name: str, backend: str, request: pytest.FixtureRequest) -> None:
    """The per-sample-gradient recipe (vmap over grad of functional_call) on a normkit module
    gives torch.nn's gradients. Each sample is one unbatched-shaped item run as a batch of 1."""
    build, shape = MODULES[name]
    dtype = torch.float32 if backend == "triton" else torch.float64
    gen = torch.Generator().manual_seed(seed_of(name, "x"))
    xs = torch.randn(B, 2, *shape, generator=gen, dtype=torch.float64)
    upstream = torch.randn(2, *shape, generator=gen, dtype=torch.float64)
    results = []
    for lib in (nn, normkit):
        module = build(lib) if lib is nn else build(lib)
        if lib is normkit:
            module.backend = backend
        module = module.to(dtype if lib is normkit else torch.float64)
        params = {k: v.to(dtype if lib is normkit else torch.float64) for k, v in _random_params(module, name).items()}

        def loss(p: dict[str, Tensor], x: Tensor, module: nn.Module = module) -> Tensor:
            return (functional_call(module, p, (x,)) * upstream.to(x.dtype)).sum()

        results.append(vmap(grad(loss), in_dims=(None, 0))(params, xs.to(dtype if lib is normkit else torch.float64)))
    _assert_close(results[1], results[0], dtype)


@pytest.mark.parametrize("backend", TRANSFORM_BACKENDS)
def test_replace_all_batch_norm_modules_then_vmap(backend: str, request: pytest.FixtureRequest) -> None:
    """torch.func's recipe for BatchNorm under vmap (drop the running statistics) applies to
    normkit's BatchNorm, a torch.nn.BatchNorm2d subclass; the result is torch's."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    xs = torch.randn(B, 2, 3, 4, 4, generator=torch.Generator().manual_seed(seed_of("replace bn")), dtype=torch.float64)
    outs = []
    for lib, dt in ((nn, torch.float64), (normkit, dtype)):
        model = nn.Sequential(nn.Conv2d(3, 3, 1), lib.BatchNorm2d(3)).to(dt)
        torch.manual_seed(0)
        for p in model.parameters():
            nn.init.normal_(p)
        if lib is normkit:
            model[1].backend = backend
        torch.func.replace_all_batch_norm_modules_(model)
        assert model[1].running_mean is None
        outs.append(vmap(model)(xs.to(dt)))
    _assert_close(outs[1], outs[0], dtype)


@pytest.mark.parametrize("backend", TRANSFORM_BACKENDS)
def test_module_with_running_stats_under_vmap_fails_and_counts_nothing(backend: str) -> None:
    """A training BatchNorm that tracks running statistics cannot run under vmap, as torch's:
    the error is torch's type, and no buffer moves (num_batches_tracked included)."""
    xs = torch.randn(B, 2, 3, 4, generator=torch.Generator().manual_seed(seed_of("bn vmap module")))
    with pytest.raises(RuntimeError):
        vmap(nn.BatchNorm1d(3))(xs)
    module = normkit.BatchNorm1d(3, backend=backend)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(RuntimeError):
        vmap(module)(xs)
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("backend", TRANSFORM_BACKENDS)
@pytest.mark.parametrize("transform", ["grad", "jvp"])
@pytest.mark.parametrize("op", ["batch_norm", "instance_norm"])
def test_running_stats_update_under_grad_and_jvp_as_torch(op: str, transform: str, backend: str,
                                                          request: pytest.FixtureRequest) -> None:
    """Under grad/jvp (no vmap) torch updates captured running statistics in its kernel; normkit
    too, with torch's values, and the gradients or tangents are torch's (triton refuses jvp, with
    the running statistics untouched)."""
    gen = torch.Generator().manual_seed(seed_of("running under", op, transform))
    dtype = torch.float32 if backend == "triton" else torch.float64
    x, w, b = (torch.randn(s, generator=gen, dtype=torch.float64) for s in ((4, 3, 5), (3,), (3,)))
    upstream, tangent = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64), torch.randn(4, 3, 5, generator=gen,
                                                                                             dtype=torch.float64)
    results = []
    for fn, dt, kw in ((getattr(F, op), torch.float64, {}), (getattr(NF, op), dtype, {"backend": backend})):
        stats = (torch.zeros(3, dtype=dt), torch.ones(3, dtype=dt))

        def f(x: Tensor, fn: Callable[..., Tensor] = fn, stats: tuple[Tensor, Tensor] = stats, kw: dict = kw) -> Tensor:
            return fn(x, *stats, w.to(x.dtype), b.to(x.dtype), True, 0.1, EPS, **kw)

        if transform == "grad":
            out = grad(lambda x, f=f: (f(x) * upstream.to(x.dtype)).sum())(x.to(dt))
        elif kw and _refused(backend, transform):
            with pytest.raises(RuntimeError, match=FORWARD_MODE_ERROR):
                jvp(f, (x.to(dt),), (tangent.to(dt),))
            assert torch.equal(stats[0], torch.zeros(3, dtype=dt)) and torch.equal(stats[1], torch.ones(3, dtype=dt))
            return
        else:
            out = jvp(f, (x.to(dt),), (tangent.to(dt),))
        results.append((out, stats))
    _assert_close(results[1], results[0], dtype)
