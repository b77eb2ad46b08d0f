"""Precision controls (``stats_dtype``, ``out_dtype``) on every normkit module and functional op.

``stats_dtype=torch.float64`` must make a float32 run as exact as a float64 one (the 1e4 offset
makes float32 statistics visibly lossy), and ``out_dtype=torch.float32`` on a bf16 input must
give the unrounded float32 result: each is judged against torch in float64.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import normkit
import normkit.functional as NF
from cases import BACKENDS, skip_if_declined

# (name, torch module factory, normkit factory taking keyword options, input shape)
MODULES: list[tuple[str, Callable[[], nn.Module], Callable[..., nn.Module], tuple[int, ...]]] = [
    ("BatchNorm2d", lambda: nn.BatchNorm2d(3), lambda **o: normkit.BatchNorm2d(3, **o), (4, 3, 5, 5)),
    ("BatchNorm1d(momentum=None)", lambda: nn.BatchNorm1d(5, momentum=None),
     lambda **o: normkit.BatchNorm1d(5, momentum=None, **o), (7, 5)),
    ("InstanceNorm2d", lambda: nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
     lambda **o: normkit.InstanceNorm2d(3, affine=True, track_running_stats=True, **o), (2, 3, 5, 6)),
    ("LayerNorm", lambda: nn.LayerNorm(33), lambda **o: normkit.LayerNorm(33, **o), (4, 33)),
    ("GroupNorm", lambda: nn.GroupNorm(2, 6), lambda **o: normkit.GroupNorm(2, 6, **o), (3, 6, 7)),
    ("RMSNorm", lambda: nn.RMSNorm(33), lambda **o: normkit.RMSNorm(33, **o), (4, 33)),
]


def _run(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(dy.to(y.dtype))
    return (y, x.grad, *(p.grad for p in module.parameters()), *module.buffers())


def _errors(got: tuple[torch.Tensor, ...], oracle: tuple[torch.Tensor, ...]) -> list[float]:
    return [(g.double() - o.double()).abs().max().item() for g, o in zip(got, oracle) if o.is_floating_point()]


def _randomized(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    module = factory()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + 1.0)
    return module


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, torch_factory, nk_factory, shape", MODULES, ids=[m[0] for m in MODULES])
@skip_if_declined
def test_float64_statistics_make_a_float32_run_exact(name, torch_factory, nk_factory, shape, backend) -> None:
    torch.manual_seed(0)
    oracle = _randomized(torch_factory, 1).double()
    precise = nk_factory(backend=backend, stats_dtype=torch.float64)
    precise.load_state_dict(_randomized(torch_factory, 1).state_dict())
    for _ in range(2):  # a second step runs with running statistics already moved
        x = (1e4 + torch.randn(shape, dtype=torch.float64)).float().double()  # exact in float32
        dy = torch.randn(shape, dtype=torch.float64).float().double()
        for m in (oracle, precise):
            m.zero_grad()
        expected = _run(oracle, x, dy)
        got = _run(precise, x.float(), dy)
        err_precise = _errors(got, expected)
        assert err_precise
    assert got[0].dtype == torch.float32
    assert all(b.dtype == o.dtype for b, o in zip(precise.buffers(), torch_factory().buffers()))
    # Everything is computed in float64 and rounded once to float32: within a few float32 ulps
    # of the result (|y| ~ 3, |grads| up to ~1e3 for the summed ones), far below plain float32.
    bounds = [4 * torch.finfo(torch.float32).eps * max(1.0, o.abs().max().item()) for o in expected]
    assert all(e <= bound for e, bound in zip(err_precise, bounds))



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, torch_factory, nk_factory, shape", MODULES, ids=[m[0] for m in MODULES])
@skip_if_declined
def test_float32_output_of_a_bf16_input_is_unrounded(name, torch_factory, nk_factory, shape, backend) -> None:
    torch.manual_seed(1)
    oracle = _randomized(torch_factory, 2).double()
    module = nk_factory(backend=backend, out_dtype=torch.float32)
    module.load_state_dict(_randomized(torch_factory, 2).state_dict())
    x = torch.randn(shape, dtype=torch.float64).bfloat16()
    dy = torch.randn(shape, dtype=torch.float64)
    got = _run(module, x, dy)
    expected = _run(oracle, x.double(), dy)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    # The output is the float32 rounding of the float64 result of the bf16 input; the gradient
    # of x is rounded to bf16 (x's dtype), so it is held to bf16 only.
    assert (got[0].double() - expected[0]).abs().max().item() < 1e-5
    assert (got[1].double() - expected[1]).abs().max().item() < 2e-2 * expected[1].abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@skip_if_declined
def test_functional_precision_controls(backend: str) -> None:
    torch.manual_seed(2)
    x = (1e4 + torch.randn(3, 4, 6, dtype=torch.float64)).float().double()  # exact in float32
    w, b = torch.randn(4).double(), torch.randn(4).double()
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    rm64, rv64 = rm.double(), rv.double()
    expected = torch.nn.functional.batch_norm(x, rm64, rv64, w, b, True, 0.3)
    y = NF.batch_norm(x.float(), rm, rv, w.float(), b.float(), True, 0.3, backend=backend,
                      stats_dtype=torch.float64, out_dtype=torch.float64)
    assert y.dtype == torch.float64 and rm.dtype == torch.float32
    assert (y - expected).abs().max().item() < 1e-10  # computed in float64 from float32-exact inputs
    torch.testing.assert_close(rm, rm64.float(), rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(rv, rv64.float(), rtol=1e-5, atol=1e-6)
    xb = torch.randn(2, 5, 32).bfloat16()
    y, residual_out = NF.add_layer_norm(xb, xb, (32,), residual_dtype=torch.float32, backend=backend,
                                        stats_dtype=torch.float64, out_dtype=torch.float32)
    assert (y.dtype, residual_out.dtype) == (torch.float32, torch.float32)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(residual_out.double(), (32,)).float())


def test_bad_precision_options_are_refused() -> None:
    for bad in (torch.float16, torch.bfloat16, torch.int32):
        with pytest.raises(ValueError, match="stats_dtype must be torch.float32 or torch.float64"):
            normkit.LayerNorm(8, stats_dtype=bad)
        with pytest.raises(ValueError, match="stats_dtype"):
            NF.layer_norm(torch.randn(2, 8), (8,), stats_dtype=bad)
    with pytest.raises(ValueError, match="out_dtype must be a floating-point"):
        normkit.BatchNorm1d(3, out_dtype=torch.int64)
    with pytest.raises(ValueError, match="out_dtype must be a floating-point"):
        NF.rms_norm(torch.randn(2, 8), (8,), out_dtype=torch.int64)


def test_options_show_in_repr_not_in_state_dict_and_survive_copies() -> None:
    m = normkit.BatchNorm2d(3, stats_dtype=torch.float64, out_dtype=torch.bfloat16)
    plain = nn.BatchNorm2d(3)
    assert repr(m) == repr(plain)[:-1] + ", stats_dtype=torch.float64, out_dtype=torch.bfloat16)"
    assert m.state_dict().keys() == plain.state_dict().keys()
    clone = copy.deepcopy(m)
    assert (clone.stats_dtype, clone.out_dtype) == (torch.float64, torch.bfloat16)
    assert clone(torch.randn(2, 3, 4, 4)).dtype == torch.bfloat16


def test_masked_statistics_refuse_precision_options_and_change_nothing() -> None:
    m = normkit.BatchNorm1d(3, stats_dtype=torch.float64)
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(NotImplementedError, match="masked statistics run at the default precision"):
        m(torch.randn(2, 3, 5), mask=torch.ones(2, 5, dtype=torch.bool))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
