"""Property-based parity: hypothesis draws shapes and parameters, normkit must match torch.

Shapes of 2 to 5 dims with sizes 1 to 7, every flag (affine, bias, running statistics,
training), eps, momentum (None included), num_groups dividing C, window sizes: for each draw,
normkit.functional and normkit's modules on every CPU backend agree with torch.nn.functional and
torch.nn in float64, forward, backward (random upstream gradients) and running statistics.
Inputs that torch rejects (one value per channel in training) are assumed away: test_errors.py
covers them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import normkit
import normkit.functional as NF
from cases import BACKENDS, MUST_RUN, TOLERANCES, randomize_

CPU_BACKENDS = [b for b in BACKENDS if b in MUST_RUN]
TOL = TOLERANCES[torch.float64]
PROPERTY = settings(max_examples=40, deadline=None)
DIFFERENTIABLE = ("input", "weight", "bias", "residual")

sizes = st.integers(1, 7)
seeds = st.integers(0, 2**31 - 1)
epsilons = st.floats(1e-6, 1e-1)
momenta = st.floats(0.0, 1.0)


def shapes(min_dims: int = 2, max_dims: int = 5) -> st.SearchStrategy[tuple[int, ...]]:
    return st.integers(min_dims, max_dims).flatmap(lambda d: st.tuples(*[sizes] * d))


def _tensors(seed: int, **specs: tuple[int, ...] | None) -> dict[str, Tensor | None]:
    """float64 tensors of the given shapes (None stays None); ``running_var`` is positive."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor | None] = {}
    for name, shape in specs.items():
        if shape is None:
            out[name] = None
        elif name == "running_var":
            out[name] = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
        else:
            out[name] = torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    return out


def _run(call: Callable[..., Any], tensors: dict[str, Tensor | None], seed: int) -> dict[str, Tensor]:
    """``call(**tensors)`` on fresh copies; the outputs, the gradients of the differentiable
    tensors for random upstream gradients, and the other tensors (running stats) afterwards."""
    local = {
        k: None if v is None else v.clone().requires_grad_(k in DIFFERENTIABLE) for k, v in tensors.items()
    }
    outputs = call(**local)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    gen = torch.Generator().manual_seed(seed ^ 0x5EED)
    upstream = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outputs]
    wrt = [k for k in DIFFERENTIABLE if local.get(k) is not None]
    grads = torch.autograd.grad(outputs, [local[k] for k in wrt], upstream, allow_unused=True)
    result = {f"output{i}": o.detach() for i, o in enumerate(outputs)}
    result.update({f"grad_{k}": g for k, g in zip(wrt, grads, strict=True) if g is not None})
    result.update({k: v for k, v in local.items() if v is not None and k not in DIFFERENTIABLE})
    return result


def _assert_all_close(actual: dict[str, Tensor], expected: dict[str, Tensor], where: str) -> None:
    assert actual.keys() == expected.keys(), f"{where}: {sorted(actual)} != {sorted(expected)}"
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=TOL.rtol, atol=TOL.atol,
                                   msg=lambda m, key=key: f"{where}: {key}: {m}")


def assert_matches_torch(torch_call: Callable[..., Any], op: str, tensors: dict[str, Tensor | None], seed: int,
                         **options: Any) -> None:
    expected = _run(lambda **t: torch_call(**t, **options), tensors, seed)
    for backend in CPU_BACKENDS:
        actual = _run(lambda b=backend, **t: getattr(NF, op)(**t, **options, backend=b), tensors, seed)
        _assert_all_close(actual, expected, f"{op} on {backend}")


def _one_value_per_channel(shape: tuple[int, ...]) -> bool:
    return shape[0] * math.prod(shape[2:]) == 1


# ---- functional --------------------------------------------------------------------------------


@PROPERTY
@given(shape=shapes(), training=st.booleans(), stats=st.booleans(), weight=st.booleans(), bias=st.booleans(),
       momentum=momenta, eps=epsilons, seed=seeds)
def test_batch_norm(shape: tuple[int, ...], training: bool, stats: bool, weight: bool, bias: bool,
                    momentum: float, eps: float, seed: int) -> None:
    assume(stats or training)  # eval normalizes with the running statistics
    assume(not (training and _one_value_per_channel(shape)))
    c = (shape[1],)
    tensors = _tensors(seed, input=shape, running_mean=c if stats else None, running_var=c if stats else None,
                       weight=c if weight else None, bias=c if bias else None)
    assert_matches_torch(F.batch_norm, "batch_norm", tensors, seed, training=training, momentum=momentum, eps=eps)


@PROPERTY
@given(shape=shapes(3, 5), use_input_stats=st.booleans(), stats=st.booleans(), affine=st.booleans(),
       momentum=momenta, eps=epsilons, seed=seeds)
def test_instance_norm(shape: tuple[int, ...], use_input_stats: bool, stats: bool, affine: bool,
                       momentum: float, eps: float, seed: int) -> None:
    assume(stats or use_input_stats)
    assume(not (use_input_stats and math.prod(shape[2:]) == 1))
    c = (shape[1],)
    tensors = _tensors(seed, input=shape, running_mean=c if stats else None, running_var=c if stats else None,
                       weight=c if affine else None, bias=c if affine else None)
    assert_matches_torch(F.instance_norm, "instance_norm", tensors, seed, use_input_stats=use_input_stats,
                         momentum=momentum, eps=eps)


@PROPERTY
@given(data=st.data(), shape=shapes(), weight=st.booleans(), bias=st.booleans(), eps=epsilons, seed=seeds)
def test_layer_norm(data: st.DataObject, shape: tuple[int, ...], weight: bool, bias: bool, eps: float,
                    seed: int) -> None:
    k = data.draw(st.integers(1, len(shape)), label="normalized dims")
    ns = shape[len(shape) - k:]
    tensors = _tensors(seed, input=shape, weight=ns if weight else None, bias=ns if bias else None)
    assert_matches_torch(F.layer_norm, "layer_norm", tensors, seed, normalized_shape=ns, eps=eps)


@PROPERTY
@given(data=st.data(), shape=shapes(), weight=st.booleans(), eps=st.none() | epsilons, seed=seeds)
def test_rms_norm(data: st.DataObject, shape: tuple[int, ...], weight: bool, eps: float | None, seed: int) -> None:
    k = data.draw(st.integers(1, len(shape)), label="normalized dims")
    ns = shape[len(shape) - k:]
    tensors = _tensors(seed, input=shape, weight=ns if weight else None)
    assert_matches_torch(F.rms_norm, "rms_norm", tensors, seed, normalized_shape=ns, eps=eps)


@PROPERTY
@given(data=st.data(), shape=shapes(), affine=st.booleans(), eps=epsilons, seed=seeds)
def test_group_norm(data: st.DataObject, shape: tuple[int, ...], affine: bool, eps: float, seed: int) -> None:
    channels = shape[1]
    groups = data.draw(st.sampled_from([g for g in range(1, channels + 1) if channels % g == 0]), label="num_groups")
    assume(shape[0] * (channels // groups) * math.prod(shape[2:]) > 1)  # more than one value per group
    c = (channels,)
    tensors = _tensors(seed, input=shape, weight=c if affine else None, bias=c if affine else None)
    assert_matches_torch(F.group_norm, "group_norm", tensors, seed, num_groups=groups, eps=eps)


@PROPERTY
@given(shape=shapes(3, 5), size=sizes, alpha=st.floats(1e-4, 2.0), beta=st.floats(0.1, 1.5),
       k=st.floats(0.5, 3.0), seed=seeds)
def test_local_response_norm(shape: tuple[int, ...], size: int, alpha: float, beta: float, k: float,
                             seed: int) -> None:
    tensors = _tensors(seed, input=shape)
    assert_matches_torch(F.local_response_norm, "local_response_norm", tensors, seed, size=size, alpha=alpha,
                         beta=beta, k=k)


@PROPERTY
@given(data=st.data(), shape=shapes(), rms=st.booleans(), residual=st.booleans(), affine=st.booleans(),
       eps=epsilons, seed=seeds)
def test_add_norms(data: st.DataObject, shape: tuple[int, ...], rms: bool, residual: bool, affine: bool,
                   eps: float, seed: int) -> None:
    """The residual-add norms against torch's two steps: ``norm(x + residual)`` and the sum."""
    k = data.draw(st.integers(1, len(shape)), label="normalized dims")
    ns = shape[len(shape) - k:]
    specs: dict[str, Any] = {"x": shape, "residual": shape if residual else None, "weight": ns if affine else None}
    if not rms:
        specs["bias"] = ns if affine else None
    tensors = _tensors(seed, **specs)
    tensors["input"] = tensors.pop("x")  # differentiable under the name "input"

    def torch_call(input: Tensor, residual: Tensor | None, **params: Tensor | None) -> tuple[Tensor, Tensor]:
        summed = input if residual is None else input + residual
        norm = F.rms_norm(summed, ns, **params, eps=eps) if rms else F.layer_norm(summed, ns, **params, eps=eps)
        return norm, summed

    op = "add_rms_norm" if rms else "add_layer_norm"
    expected = _run(torch_call, tensors, seed)
    for backend in CPU_BACKENDS:
        actual = _run(lambda input, residual, b=backend, **p:
                      getattr(NF, op)(input, residual, ns, **p, eps=eps, backend=b),
                      tensors, seed)
        _assert_all_close(actual, expected, f"{op} on {backend}")


# ---- modules with running statistics: several steps --------------------------------------------


def _module_steps(torch_module: nn.Module, nk_module: nn.Module, shape: tuple[int, ...], seed: int,
                  modes: tuple[str, ...]) -> None:
    nk_module.load_state_dict(torch_module.state_dict())
    for i, mode in enumerate(modes):
        tensors = _tensors(seed + i, input=shape)
        results = []
        for module in (torch_module, nk_module):
            module.train(mode == "train")
            module.zero_grad()
            result = _run(module, tensors, seed + i)
            result.update({f"grad_{n}": p.grad for n, p in module.named_parameters()})
            result.update({n: b.clone() for n, b in module.named_buffers()})
            results.append(result)
        _assert_all_close(results[1], results[0], f"step {i} ({mode}) on {nk_module.backend}")


_BATCH_NORMS = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}
_INSTANCE_NORMS = {3: "InstanceNorm1d", 4: "InstanceNorm2d", 5: "InstanceNorm3d"}


@PROPERTY
@given(shape=shapes(), momentum=st.none() | momenta, eps=epsilons, affine=st.booleans(), bias=st.booleans(),
       track=st.booleans(), seed=seeds)
def test_batch_norm_modules(shape: tuple[int, ...], momentum: float | None, eps: float, affine: bool, bias: bool,
                            track: bool, seed: int) -> None:
    assume(not _one_value_per_channel(shape))
    name = _BATCH_NORMS[len(shape)]
    kwargs = {"eps": eps, "momentum": momentum, "affine": affine, "track_running_stats": track, "bias": bias}
    for backend in CPU_BACKENDS:
        torch_module = randomize_(getattr(nn, name)(shape[1], **kwargs, dtype=torch.float64), seed)
        nk_module = getattr(normkit, name)(shape[1], **kwargs, dtype=torch.float64, backend=backend)
        _module_steps(torch_module, nk_module, shape, seed, ("train", "train", "eval"))


@PROPERTY
@given(shape=shapes(3, 5), momentum=st.none() | momenta, eps=epsilons, affine=st.booleans(),
       track=st.booleans(), seed=seeds)
def test_instance_norm_modules(shape: tuple[int, ...], momentum: float | None, eps: float, affine: bool,
                               track: bool, seed: int) -> None:
    assume(math.prod(shape[2:]) > 1)
    name = _INSTANCE_NORMS[len(shape)]
    kwargs = {"eps": eps, "momentum": momentum, "affine": affine, "track_running_stats": track}
    for backend in CPU_BACKENDS:
        torch_module = randomize_(getattr(nn, name)(shape[1], **kwargs, dtype=torch.float64), seed)
        nk_module = getattr(normkit, name)(shape[1], **kwargs, dtype=torch.float64, backend=backend)
        _module_steps(torch_module, nk_module, shape, seed, ("train", "train", "eval"))
