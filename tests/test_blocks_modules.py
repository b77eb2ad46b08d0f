"""The modules of the norms of today's blocks (normkit.modules.blocks): each computes its functional
op with its own parameters, the ``cast``/``weight_offset`` options are the RMSNorm module's, the
parameters train, a refused call changes nothing, and torch.fx traces a model holding them."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import normkit
from normkit import functional as nkf
from normkit.testing import assert_close_to_reference

BACKENDS = ("torch", "reference")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(shape, generator=_gen(seed), dtype=torch.float64).to(dtype)


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    gen = _gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5 + 0.2)
    return module


def _grads(out: Tensor | tuple[Tensor, ...], tensors: list[Tensor], seed: int) -> list[Tensor]:
    outs = out if isinstance(out, tuple) else (out,)
    gen = _gen(seed)
    dys = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outs]
    return list(torch.autograd.grad(outs, tensors, dys, allow_unused=True))


def _case(name: str) -> tuple[nn.Module, tuple[Tensor, ...], object]:
    """(module, its inputs, the same computation through normkit.functional with its parameters)."""
    x = _randn(2, 5, 12, seed=1).requires_grad_()
    if name == "ModulatedLayerNorm":
        m = normkit.ModulatedLayerNorm(12, elementwise_affine=True)
        shift, scale = _randn(2, 1, 12, seed=2).requires_grad_(), _randn(2, 1, 12, seed=3).requires_grad_()
        return m, (x, shift, scale), lambda b: nkf.modulated_layer_norm(x, shift, scale, m.weight, m.bias, 1e-6,
                                                                        backend=b)
    if name == "ModulatedRMSNorm":
        m = normkit.ModulatedRMSNorm(12, elementwise_affine=True)
        shift, scale = _randn(2, 5, 12, seed=2).requires_grad_(), _randn(2, 5, 12, seed=3).requires_grad_()
        return m, (x, shift, scale), lambda b: nkf.modulated_rms_norm(x, shift, scale, m.weight, backend=b)
    if name == "GatedRMSNorm":
        m = normkit.GatedRMSNorm(12, group_size=4)
        gate = _randn(2, 5, 12, seed=2).requires_grad_()
        return m, (x, gate), lambda b: nkf.gated_rms_norm(x, gate, m.weight, 1e-6, group_size=4, backend=b)
    if name == "QKRMSNorm":
        m = normkit.QKRMSNorm(12)
        q, k = _randn(2, 5, 4, 12, seed=2).requires_grad_(), _randn(2, 5, 2, 12, seed=3).requires_grad_()
        return m, (q, k), lambda b: nkf.qk_rms_norm(q, k, m.q_weight, m.k_weight, backend=b)
    assert name == "SandwichRMSNorm"
    m = normkit.SandwichRMSNorm(12)
    residual = _randn(2, 5, 12, seed=2).requires_grad_()
    return m, (x, residual), lambda b: nkf.sandwich_rms_norm(x, residual, m.post_weight, m.next_weight, backend=b)


NAMES = ("ModulatedLayerNorm", "ModulatedRMSNorm", "GatedRMSNorm", "QKRMSNorm", "SandwichRMSNorm")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_module_is_its_functional_op_with_its_parameters(name: str, backend: str) -> None:
    module, inputs, functional = _case(name)
    _randomize(module, seed=7)
    module.backend = backend
    params = list(module.parameters())
    out, expected = module(*inputs), functional(backend)
    outs = out if isinstance(out, tuple) else (out,)
    for got, want in zip(outs, expected if isinstance(expected, tuple) else (expected,), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    got_grads = _grads(out, [*inputs, *params], seed=9)
    want_grads = _grads(expected, [*inputs, *params], seed=9)
    assert all(g is not None for g in got_grads), "every input and parameter gets a gradient"
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_and_dtype_move(name: str) -> None:
    module, inputs, _ = _case(name)
    _randomize(module, seed=3)
    fresh, _, _ = _case(name)
    fresh.load_state_dict(module.state_dict())
    out_a, out_b = module(*inputs), fresh(*inputs)
    for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (out_a, out_b)), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    moved = copy.deepcopy(module).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in moved.parameters())
    outs = moved(*(t.detach().double() for t in inputs))
    assert all(o.dtype == torch.float64 for o in (outs if isinstance(outs, tuple) else (outs,)))


def test_gated_normalize_first_is_hf_mamba_formula() -> None:
    """``cast="normalize_first"``: HF's ``MambaRMSNormGated``, written here from its documented
    forward: ``weight * (x * silu(gate) normalized in float32).to(input dtype)``."""
    for dtype in (torch.float32, torch.bfloat16):
        x, gate = _randn(3, 7, 16, seed=1, dtype=dtype), _randn(3, 7, 16, seed=2, dtype=dtype)
        m = _randomize(normkit.GatedRMSNorm(16, eps=1e-5, cast="normalize_first", dtype=dtype), seed=4)
        h = x.float() * F.silu(gate.float())
        want = m.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
        for backend in BACKENDS:
            m.backend = backend
            got = m(x, gate)
            assert got.dtype == want.dtype
            # fp32: the backends' own rsqrt (one rounding apart); bf16: one ulp of the rounded x_hat
            torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 2 ** -7, atol=1e-6)


@pytest.mark.parametrize("cast", ["weight_first", "normalize_first"])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_qk_norm_is_two_rms_norms_with_the_same_options(cast: str, offset: float) -> None:
    qk = _randomize(normkit.QKRMSNorm(8, eps=1e-6, cast=cast, weight_offset=offset), seed=5)
    q_norm = normkit.RMSNorm(8, 1e-6, cast=cast, weight_offset=offset)
    k_norm = normkit.RMSNorm(8, 1e-6, cast=cast, weight_offset=offset)
    with torch.no_grad():
        q_norm.weight.copy_(qk.q_weight)
        k_norm.weight.copy_(qk.k_weight)
    for dtype in (torch.float32, torch.bfloat16):
        q, k = _randn(2, 3, 4, 8, seed=1, dtype=dtype), _randn(2, 3, 1, 8, seed=2, dtype=dtype)
        with torch.no_grad():
            got_q, got_k = qk.to(dtype)(q, k)
            want_q, want_k = q_norm.to(dtype)(q), k_norm.to(dtype)(k)
        assert (got_q.dtype, got_k.dtype) == (want_q.dtype, want_k.dtype)
        one_ulp = 0.0 if dtype == torch.float32 else 2 ** -7
        torch.testing.assert_close(got_q, want_q, rtol=one_ulp, atol=1e-6)
        torch.testing.assert_close(got_k, want_k, rtol=one_ulp, atol=1e-6)


def test_qk_norm_initial_scale_is_one_whatever_the_offset() -> None:
    q, k = _randn(2, 4, 8, seed=1), _randn(2, 4, 8, seed=2)
    plain, gemma = normkit.QKRMSNorm(8), normkit.QKRMSNorm(8, weight_offset=1.0)
    assert torch.equal(gemma.q_weight, torch.zeros(8))
    for a, b in zip(plain(q, k), gemma(q, k), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_sandwich_is_post_norm_add_pre_norm(offset: float) -> None:
    m = _randomize(normkit.SandwichRMSNorm(16, eps=1e-6, weight_offset=offset), seed=2)
    post = normkit.RMSNorm(16, 1e-6, weight_offset=offset)
    pre = normkit.RMSNorm(16, 1e-6, weight_offset=offset)
    with torch.no_grad():
        post.weight.copy_(m.post_weight)
        pre.weight.copy_(m.next_weight)
    hidden, residual = _randn(3, 5, 16, seed=1), _randn(3, 5, 16, seed=3)
    y, residual_out = m(hidden, residual)
    want_residual = residual + post(hidden)
    torch.testing.assert_close(residual_out, want_residual)
    torch.testing.assert_close(y, pre(want_residual))


def test_modules_train_a_step() -> None:
    """One SGD step on each module's own parameters lowers a loss (the gradients point downhill)."""
    for name in NAMES:
        module, inputs, _ = _case(name)
        _randomize(module, seed=11)
        opt = torch.optim.SGD(module.parameters(), lr=0.05)

        def loss() -> Tensor:
            out = module(*(t.detach() for t in inputs))
            outs = out if isinstance(out, tuple) else (out,)
            return sum((o - 0.3).square().mean() for o in outs)  # type: ignore[return-value]

        before = loss()
        opt.zero_grad()
        before.backward()
        opt.step()
        assert loss().item() < before.item(), name


@pytest.mark.parametrize("name", NAMES)
def test_refused_call_changes_nothing(name: str) -> None:
    module, inputs, _ = _case(name)
    _randomize(module, seed=1)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    bad = (inputs[0][..., :-1].detach(), *inputs[1:])  # the last dim no longer matches
    with pytest.raises((RuntimeError, ValueError)):
        module(*bad)
    assert all(p.grad is None for p in module.parameters())
    for k, v in module.state_dict().items():
        assert torch.equal(v, state[k])


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match="group_size must be an int dividing"):
        normkit.GatedRMSNorm(12, group_size=5)
    with pytest.raises(ValueError, match="group_size must be an int dividing"):
        normkit.GatedRMSNorm(12, group_size=4.0)
    with pytest.raises(TypeError, match="norm_before_gate must be a bool"):
        normkit.GatedRMSNorm(12, norm_before_gate=1)
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        normkit.functional.gated_rms_norm(torch.randn(2, 4), None, torch.ones(4, dtype=torch.long))
    with pytest.raises(TypeError, match="bias must be a floating-point tensor"):
        normkit.functional.dyt(torch.randn(2, 4), torch.ones(1), None, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="cast must be one of"):
        normkit.QKRMSNorm(8, cast="halfway")
    with pytest.raises(ValueError, match="last dim only"):
        normkit.ModulatedLayerNorm((4, 8))
    with pytest.raises(ValueError, match="unknown normkit backend"):
        normkit.SandwichRMSNorm(8, backend="cuda-magic")


def test_reprs_name_their_options() -> None:
    assert repr(normkit.GatedRMSNorm(8, group_size=4, norm_before_gate=True)) == \
        "GatedRMSNorm(8, eps=1e-06, group_size=4, norm_before_gate=True)"
    assert repr(normkit.QKRMSNorm(8, weight_offset=1.0, backend="torch")) == \
        "QKRMSNorm(8, eps=None, elementwise_affine=True, weight_offset=1.0, backend='torch')"
    assert repr(normkit.ModulatedLayerNorm(8)) == "ModulatedLayerNorm((8,), eps=1e-06, elementwise_affine=False)"


class _Block(nn.Module):
    """A DiT-like block: modulated norm, QK-norm'd attention scores, gated and sandwich norms."""

    def __init__(self) -> None:
        super().__init__()
        self.ada = normkit.ModulatedLayerNorm(8)
        self.qk = normkit.QKRMSNorm(4)
        self.gated = normkit.GatedRMSNorm(8)
        self.sandwich = normkit.SandwichRMSNorm(8)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        shift, scale = emb.chunk(2, dim=-1)
        h = self.ada(x, shift, scale)
        q, k = self.qk(h.unflatten(-1, (2, 4)), h.unflatten(-1, (2, 4)))
        h = (q * k).flatten(-2)
        h = self.gated(h, x)
        y, _ = self.sandwich(h, x)
        return y


def test_fx_traces_a_block_holding_them() -> None:
    block = _randomize(_Block(), seed=3)
    traced = torch.fx.symbolic_trace(block)
    x, emb = _randn(2, 3, 8, seed=1), _randn(2, 1, 16, seed=2)
    torch.testing.assert_close(traced(x, emb), block(x, emb), rtol=0, atol=0)


def test_compiled_block_matches_eager() -> None:
    block = _randomize(_Block(), seed=4)
    block.apply(lambda m: setattr(m, "backend", "torch") if hasattr(m, "backend") else None)
    x, emb = _randn(2, 3, 8, seed=1), _randn(2, 1, 16, seed=2)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    assert_close_to_reference(compiled(x, emb), block(x, emb))


@pytest.mark.parametrize("cast", ["weight_first", "normalize_first"])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_fused_add_rms_norm_takes_rms_norms_cast_and_offset(cast: str, offset: float) -> None:
    """FusedAddRMSNorm(cast, weight_offset): y is RMSNorm(cast, weight_offset) of x + residual,
    residual_out the sum, and a state_dict moves between the two."""
    fused = _randomize(normkit.FusedAddRMSNorm(16, 1e-6, cast=cast, weight_offset=offset), seed=3)
    plain = normkit.RMSNorm(16, 1e-6, cast=cast, weight_offset=offset)
    plain.load_state_dict(fused.state_dict())
    for dtype in (torch.float32, torch.bfloat16):
        x, r = _randn(3, 4, 16, seed=1, dtype=dtype), _randn(3, 4, 16, seed=2, dtype=dtype)
        with torch.no_grad():
            y, residual_out = fused.to(dtype)(x, r)
            want = plain.to(dtype)(x + r)
        assert y.dtype == want.dtype and torch.equal(residual_out, x + r)
        one_ulp = 0.0 if dtype == torch.float32 else 2 ** -7
        torch.testing.assert_close(y, want, rtol=one_ulp, atol=1e-6)
