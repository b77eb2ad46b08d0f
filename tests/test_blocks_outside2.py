"""Outside tests (black box) of the numba DyT/Derf kernels and of normkit.convert on today's blocks.

Written by an outside tester from the public docs only. Each test states what a user expects; a defect
is kept as ``xfail(strict=True)`` with the precise reason.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

import normkit
from normkit import functional as F

pytest.importorskip("numba")

KINDS = ("dyt", "derf")
F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def _call(kind, x, alpha, shift, weight, bias, backend="numba"):
    if kind == "dyt":
        return F.dyt(x, alpha, weight, bias, backend=backend)
    return F.derf(x, alpha, shift, weight, bias, backend=backend)


def _ref64(kind, x, alpha, shift, weight, bias):
    """The float64 composition the user writes."""
    z = alpha.double() * x.double()
    if kind == "derf":
        z = z + shift.double()
    t = torch.tanh(z) if kind == "dyt" else torch.erf(z)
    if weight is not None:
        t = t * weight.double()
    if bias is not None:
        t = t + bias.double()
    return t


def _with_grads(kind, x, alpha, shift, weight, bias, g, backend):
    """y and the gradients of every tensor given (x, alpha, [shift], [weight], [bias]) for cotangent g."""
    leaves = [x, alpha, shift if kind == "derf" else None, weight, bias]
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in leaves]
    if backend == "ref":
        y = _ref64(kind, *leaves)
    else:
        y = _call(kind, *leaves, backend=backend)
    used = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, used, g.to(y.dtype))
    return y, list(grads)


def _args(kind, shape, dtype=F32, wshape="last", bshape="last", scale=2.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=F64) * scale).to(dtype)
    alpha = torch.tensor([0.7], dtype=dtype)
    shift = torch.tensor([0.15], dtype=dtype) if kind == "derf" else None
    wsh = shape[-1:] if wshape == "last" else wshape
    bsh = shape[-1:] if bshape == "last" else bshape
    weight = None if wsh is None else torch.randn(wsh, generator=gen, dtype=F64).to(dtype)
    bias = None if bsh is None else torch.randn(bsh, generator=gen, dtype=F64).to(dtype)
    g = torch.randn(shape, generator=gen, dtype=F64)
    return x, alpha, shift, weight, bias, g


def _close_to_ref(p, q, rtol):
    """|p - q| <= rtol * max|q| (a sum's error scales with the sum's magnitude)."""
    scale = q.abs().max().item() if q.numel() else 0.0
    return (p.double() - q).abs().max().item() <= rtol * (1.0 + scale) if q.numel() else True


# ----------------------------------------------------------------------------------------------------------------
# 1. numba DyT / Derf: forward and every gradient against float64
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_and_every_gradient_match_float64(kind, dtype):
    """y, dx, dalpha, dshift, dweight, dbias of backend='numba' agree with the float64 composition: y and dx
    rounded once (a unit of the dtype), the parameter sums within the float32 accumulation error."""
    x, a, s, w, b, g = _args(kind, (8, 96), dtype)
    y, gr = _with_grads(kind, x, a, s, w, b, g, "numba")
    yr, grr = _with_grads(kind, x, a, s, w, b, g, "ref")
    ulp = {F32: 2.0**-23, BF16: 2.0**-8, F64: 2.0**-52}[dtype]
    assert y.dtype == dtype
    assert ((y.double() - yr).abs() <= 4 * ulp * (1 + yr.abs())).all()
    assert [t.shape for t in gr] == [t.shape for t in grr]
    assert all(t.dtype == dtype for t in gr)
    assert ((gr[0].double() - grr[0]).abs() <= 4 * ulp * (1 + grr[0].abs())).all()
    for p, q in zip(gr[1:], grr[1:]):
        assert _close_to_ref(p, q, max(8 * ulp, 1e-6))


_VALS = [0.0, 1e-45, -1e-45, 1e-38, 1e-30, -1e-30, 1e-10, 1e-4, 0.3, -0.7, 1.0, 2.5, 4.0, 9.0, 9.5, 10.0, -15.0,
         30.0, 1e4, 1e30, -1e30, 3e38, float("inf"), -float("inf"), float("nan")]


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_extremes_match_the_composition(kind, dtype):
    """Over |alpha*x| from 1e-30 to 1e30, 0, subnormals, +-inf and nan (and alpha 0, tiny, huge, negative), numba's
    y and every gradient equal the torch composition's where finite and are nan/inf exactly where it is."""
    x = torch.tensor(_VALS, dtype=dtype).repeat(3, 1)
    d = x.shape[1]
    w = torch.linspace(-1.5, 2.0, d, dtype=dtype)
    b = torch.linspace(0.5, -0.5, d, dtype=dtype)
    g = torch.ones(3, d, dtype=F64)
    tol = {F32: 1e-5, F64: 1e-12, BF16: 2e-2}[dtype]
    for alpha in (1.0, 1e-30, 1e30, 0.0, -0.5, 1e-38):
        a = torch.tensor([alpha], dtype=dtype)
        s = torch.tensor([0.0], dtype=dtype) if kind == "derf" else None
        y, gr = _with_grads(kind, x, a, s, w, b, g, "numba")
        yt, grt = _with_grads(kind, x, a, s, w, b, g, "torch")
        for name, p, q in zip(["y", "dx", "dalpha", "dshift?", "dw", "db"], [y, *gr], [yt, *grt]):
            p, q = p.double(), q.double()
            assert torch.equal(p.isnan(), q.isnan()), (alpha, name)
            fin = ~(p.isnan() | q.isnan())
            assert torch.equal(p[fin].isinf(), q[fin].isinf()), (alpha, name)
            pf, qf = p[fin & ~q.isinf()], q[fin & ~q.isinf()]
            assert ((pf - qf).abs() <= tol * (1 + qf.abs())).all(), (alpha, name)


@pytest.mark.parametrize("kind", KINDS)
def test_signed_zero_kept(kind):
    """tanh(-0) = erf(-0) = -0: without a bias, y keeps the sign of alpha*x (+ shift) as the composition does."""
    x = torch.tensor([[-0.0, 0.0]])
    for a, w in ((torch.tensor([1.0]), None), (torch.tensor([1.0]), torch.ones(2)), (torch.tensor([-1.0]), None)):
        s = torch.tensor([-0.0])
        y = _call(kind, x, a, s, w, None)
        yt = _call(kind, x, a, s, w, None, backend="torch")
        assert torch.equal(torch.signbit(y), torch.signbit(yt))


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


_SHAPES = {
    "1d": lambda: torch.randn(33),
    "one_row": lambda: torch.randn(1, 4097),
    "huge_row": lambda: torch.randn(2, 300_000),
    "4d_channels_last": lambda: _cl(torch.randn(2, 8, 5, 7)),
    "noncontig": lambda: torch.randn(16, 20)[:, ::2],
    "transposed": lambda: torch.randn(16, 20).t(),
    "expanded_rows": lambda: torch.randn(1, 24).expand(6, 24),
    "expanded_last": lambda: torch.randn(6, 1).expand(6, 24),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", sorted(_SHAPES))
def test_shapes_and_strides(kind, case):
    """Any layout (1-D, one row, rows of 300k, channels_last 4-D, strided, stride-0 expanded) gives the composition's
    y and gradients, each gradient with its tensor's shape."""
    torch.manual_seed(1)
    x = _SHAPES[case]()
    d = x.shape[-1]
    a = torch.tensor([0.6])
    s = torch.tensor([0.1]) if kind == "derf" else None
    w, b, g = torch.randn(d), torch.randn(d), torch.randn(x.shape, dtype=F64)
    y, gr = _with_grads(kind, x, a, s, w, b, g, "numba")
    yr, grr = _with_grads(kind, x, a, s, w, b, g, "ref")
    assert y.shape == x.shape
    assert _close_to_ref(y, yr, 1e-6)
    for p, q in zip(gr, grr):
        assert p.shape == q.shape
        assert _close_to_ref(p, q, 2e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "wshape,bshape",
    [((8,), (3, 8)), ((3, 8), (8,)), ((3, 8), (3, 8)), ((8,), None), (None, (8,)), (None, None), ((5, 3, 8), None)],
    ids=str,
)
def test_weight_and_bias_cover_different_trailing_dims(kind, wshape, bshape):
    """weight covering fewer trailing dims than bias (or the reverse, or absent) broadcasts as the composition."""
    x, a, s, w, b, g = _args(kind, (5, 3, 8), wshape=wshape, bshape=bshape)
    y, gr = _with_grads(kind, x, a, s, w, b, g, "numba")
    yr, grr = _with_grads(kind, x, a, s, w, b, g, "ref")
    assert _close_to_ref(y, yr, 1e-6)
    for p, q in zip(gr, grr):
        assert p.shape == q.shape
        assert _close_to_ref(p, q, 2e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ashape", [(), (1,), (1, 1)], ids=str)
def test_alpha_and_shift_shapes(kind, ashape):
    """alpha (and shift) as a 0-dim, (1,) or (1, 1) tensor: same y; their gradients keep their shapes."""
    x, _, _, w, b, g = _args(kind, (4, 3, 16))
    a = torch.full(ashape, 0.6)
    s = torch.full(ashape, -0.2) if kind == "derf" else None
    y, gr = _with_grads(kind, x, a, s, w, b, g, "numba")
    yr, grr = _with_grads(kind, x, a, s, w, b, g, "ref")
    assert y.shape == yr.shape
    assert _close_to_ref(y, yr, 1e-6)
    for p, q in zip(gr, grr):
        assert p.shape == q.shape
        assert _close_to_ref(p, q, 2e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_requires_grad_on_every_subset(kind):
    """Whichever of x, alpha, shift, weight, bias require grad, numba gives those gradients as the composition
    does, and no graph when none does."""
    x, a, s, w, b, g = _args(kind, (6, 40))
    tensors = [x, a, s, w, b]
    for mask in range(32):
        if kind == "dyt" and mask & 4:
            continue
        leaves = [None if t is None else t.clone().requires_grad_(bool(mask >> i & 1)) for i, t in enumerate(tensors)]
        y = _call(kind, *leaves)
        need = [t for t in leaves if t is not None and t.requires_grad]
        if not need:
            assert not y.requires_grad
            continue
        got = torch.autograd.grad(y, need, g.float())
        leaves2 = [None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
        want = torch.autograd.grad(_ref64(kind, *leaves2), [t for t in leaves2 if t is not None and t.requires_grad],
                                   g)
        for p, q in zip(got, want):
            assert _close_to_ref(p, q, 2e-6), mask


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_across_threads_and_batch_invariant(kind):
    """y and every gradient are bitwise equal at 1, 2 and 3 threads; a row's y and dx do not change when rows are
    added to the batch."""
    x, a, s, w, b, g = _args(kind, (64, 1536))
    g = g.float()
    before = torch.get_num_threads()
    runs = []
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            runs.append(_with_grads(kind, x, a, s, w, b, g, "numba"))
    finally:
        torch.set_num_threads(before)
    for y, gr in runs[1:]:
        assert torch.equal(y, runs[0][0])
        assert all(torch.equal(p, q) for p, q in zip(gr, runs[0][1]))
    for rows in (1, 3, 17):
        y, gr = _with_grads(kind, x[:rows], a, s, w, b, g[:rows], "numba")
        assert torch.equal(y, runs[0][0][:rows])
        assert torch.equal(gr[0], runs[0][1][0][:rows])


@pytest.mark.parametrize("kind", KINDS)
def test_compile_fullgraph_aot_eager(kind):
    """torch.compile(fullgraph=True, backend='aot_eager') of the numba call gives eager numba's y and gradients."""
    x, a, s, w, b, g = _args(kind, (8, 256))
    g = g.float()
    torch._dynamo.reset()
    fn = torch.compile(lambda *t: _call(kind, *t), fullgraph=True, backend="aot_eager")
    leaves = [None if t is None else t.clone().requires_grad_() for t in (x, a, s, w, b)]
    y = fn(*leaves)
    gr = torch.autograd.grad(y, [t for t in leaves if t is not None], g)
    ye, gre = _with_grads(kind, x, a, s, w, b, g, "numba")
    assert torch.allclose(y, ye, atol=1e-6)
    for p, q in zip(gr, gre):
        assert torch.allclose(p, q, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_func_grad_and_vmap(kind):
    """torch.func.grad over alpha and vmap over rows (and over alpha) work and agree with the torch composition."""
    x, a, s, w, b, _ = _args(kind, (4, 64))

    def loss(alpha, backend):
        return _call(kind, x, alpha, s, w, b, backend=backend).pow(2).sum()

    assert torch.allclose(torch.func.grad(loss)(a, "numba"), torch.func.grad(loss)(a, "torch"), rtol=1e-5)
    v = torch.func.vmap(lambda row: _call(kind, row, a, s, w, b))(x)
    assert torch.allclose(v, _call(kind, x, a, s, w, b, backend="torch"), atol=1e-6)
    alphas = torch.tensor([[0.5], [0.7]])
    va = torch.func.vmap(lambda al: _call(kind, x, al, s, w, b))(alphas)
    assert torch.allclose(va[1], _call(kind, x, a, s, w, b, backend="torch"), atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_auto_picks_numba_for_large_float32_training_calls(kind):
    """backend='auto' on float32 (256, 1024) with alpha requiring grad gives numba's y and gradients bitwise."""
    x, a, s, w, b, g = _args(kind, (256, 1024))
    ya, ga = _with_grads(kind, x, a, s, w, b, g.float(), "auto")
    yn, gn = _with_grads(kind, x, a, s, w, b, g.float(), "numba")
    assert torch.equal(ya, yn)
    assert all(torch.equal(p, q) for p, q in zip(ga, gn))


@pytest.mark.parametrize("kind", KINDS)
def test_explicit_numba_double_backward_matches_the_composition(kind):
    """Second-order gradients through backend='numba' (a gradient penalty reaching alpha and x) equal the torch
    composition's."""
    x0, a0, s, w, b, _ = _args(kind, (4, 64))
    got = []
    for backend in ("numba", "torch"):
        x, a = x0.clone().requires_grad_(), a0.clone().requires_grad_()
        y = _call(kind, x, a, s, w, b, backend=backend)
        (dx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        got.append(torch.autograd.grad(dx.pow(2).sum(), (a, x)))
    for p, q in zip(*got):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [normkit.DyT, normkit.Derf])
def test_default_module_supports_double_backward(cls):
    """A default-backend DyT/Derf supports create_graph=True (gradient penalties) as the composition does."""
    m = cls(1024)
    x = torch.randn(256, 1024, requires_grad=True)
    (dx,) = torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)
    (ga,) = torch.autograd.grad(dx.pow(2).sum(), m.alpha)
    mt = cls(1024, backend="torch")
    (dxt,) = torch.autograd.grad(mt(x).pow(2).sum(), x, create_graph=True)
    (gat,) = torch.autograd.grad(dxt.pow(2).sum(), mt.alpha)
    assert torch.allclose(ga, gat, rtol=1e-4)


@pytest.mark.parametrize("cls", [normkit.DyT, normkit.Derf])
def test_default_module_supports_forward_ad(cls):
    """Forward-mode AD through a default-backend DyT/Derf gives the composition's tangent."""
    import torch.autograd.forward_ad as fwad

    m = cls(1024)
    mt = cls(1024, backend="torch")
    x, t = torch.randn(256, 1024), torch.randn(256, 1024)
    with fwad.dual_level():
        tan = fwad.unpack_dual(m(fwad.make_dual(x, t))).tangent
        tant = fwad.unpack_dual(mt(fwad.make_dual(x, t))).tangent
    assert torch.allclose(tan, tant, atol=1e-5)


@pytest.mark.parametrize("cls", [normkit.DyT, normkit.Derf])
def test_modules_numba_match_torch_and_pickle(cls):
    """DyT/Derf(backend='numba') match backend='torch' on float32/bf16/float64 inputs, keep the paper's state_dict
    (alpha (1,)), and survive deepcopy and pickle with their backend."""
    m = cls((3, 16), backend="numba")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    mt = cls((3, 16), backend="torch")
    mt.load_state_dict(m.state_dict())
    assert m.state_dict()["alpha"].shape == (1,)
    x = torch.randn(5, 3, 16)
    for xx in (x, x.bfloat16()):
        assert m(xx).dtype == mt(xx).dtype
        assert torch.allclose(m(xx).float(), mt(xx).float(), atol=1e-2 if xx.dtype == BF16 else 1e-6)
    for m2 in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert m2.backend == "numba"
        assert torch.equal(m2(x), m(x))


# ----------------------------------------------------------------------------------------------------------------
# 2. normkit.convert on diffusers' adaLN and HF's gated RMSNorm
# ----------------------------------------------------------------------------------------------------------------


def _dit():
    from diffusers import DiTTransformer2DModel

    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                              num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                              norm_type="ada_norm_zero")
    inp = dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([1, 5]), class_labels=torch.tensor([1, 3]))
    return m, inp, {"AdaLayerNormZeroAdapter"}


def _sd3():
    from diffusers import SD3Transformer2DModel

    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                              pooled_projection_dim=12, out_channels=4, pos_embed_max_size=8)
    inp = dict(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 5, 16),
               pooled_projections=torch.randn(2, 12), timestep=torch.tensor([1.0, 5.0]))
    return m, inp, {"AdaLayerNormZeroAdapter", "AdaLayerNormContinuousAdapter"}


def _flux():
    from diffusers import FluxTransformer2DModel

    m = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=12,
                               axes_dims_rope=(2, 2, 4))
    inp = dict(hidden_states=torch.randn(2, 6, 8), encoder_hidden_states=torch.randn(2, 5, 16),
               pooled_projections=torch.randn(2, 12), timestep=torch.tensor([0.1, 0.5]), img_ids=torch.zeros(6, 3),
               txt_ids=torch.zeros(5, 3))
    return m, inp, {"AdaLayerNormZeroAdapter", "AdaLayerNormZeroSingleAdapter", "AdaLayerNormContinuousAdapter"}


def _ids():
    return dict(input_ids=torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0)))


def _mamba2():
    from transformers import Mamba2Config, Mamba2Model

    cfg = Mamba2Config(vocab_size=50, hidden_size=32, state_size=8, num_heads=4, head_dim=16, expand=2, n_groups=2,
                       num_hidden_layers=1, chunk_size=8, conv_kernel=4)
    return Mamba2Model(cfg), _ids(), {"GatedRMSNorm"}


def _bamba():
    from transformers import BambaConfig, BambaModel

    cfg = BambaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8,
                      mamba_chunk_size=8, attn_layer_indices=[1], mamba_expand=2)
    return BambaModel(cfg), _ids(), {"GatedRMSNorm"}


def _falcon():
    from transformers import FalconH1Config, FalconH1Model

    cfg = FalconH1Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, mamba_n_heads=4, mamba_d_head=16,
                         mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=8, mamba_expand=2, mamba_d_ssm=64,
                         mamba_rms_norm=True, head_dim=16)
    return FalconH1Model(cfg), _ids(), {"GatedRMSNorm"}


MODELS = {"dit": _dit, "sd3": _sd3, "flux": _flux, "mamba2": _mamba2, "bamba": _bamba, "falcon_h1": _falcon}


def _build(name):
    pytest.importorskip("diffusers" if name in ("dit", "sd3", "flux") else "transformers")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MODELS[name]()


def _out(m, inp):
    o = m(**inp)
    return o.sample if hasattr(o, "sample") else o.last_hidden_state


def _cast(inp, dtype):
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inp.items()}


def _run(m, inp, train):
    m.train(train)
    m.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    o = _out(m, inp)
    g = torch.randn(o.shape, generator=torch.Generator().manual_seed(3)).to(o.dtype)
    (o * g).sum().backward()
    return o.detach(), {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


def _grad_err(got, want):
    """Worst gradient error, relative to the largest gradient of the model (some are exactly 0 in theory, e.g. a
    key projection's bias, and carry only rounding noise)."""
    assert set(got) == set(want)
    scale = max(v.abs().max().item() for v in want.values())
    return max((got[k].double() - want[k].double()).abs().max().item() for k in want) / scale


def _convert(m, backend="numba"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return normkit.convert(m, backend=backend)


def _normkit_types(m):
    return {type(x).__name__ for x in m.modules() if type(x).__module__.startswith("normkit")}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_convert_replaces_block_norms(name):
    """convert swaps the model's adaLN / gated RMSNorm layers for normkit's adapters and keeps state_dict keys."""
    m, inp, expected = _build(name)
    keys = list(m.state_dict())
    m2 = _convert(copy.deepcopy(m))
    assert expected <= _normkit_types(m2)
    assert list(m2.state_dict()) == keys


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", ["dit", "sd3", "flux", "bamba", "falcon_h1"])
def test_convert_float32_outputs_and_gradients_unchanged(name, train):
    """In float32, eval and train, the converted model's output and every parameter gradient equal the original's
    within float32 rounding."""
    m, inp, _ = _build(name)
    m2 = _convert(copy.deepcopy(m))
    o0, g0 = _run(m, inp, train)
    o1, g1 = _run(m2, inp, train)
    assert (o1 - o0).abs().max().item() <= 1e-5 * (1 + o0.abs().max().item())
    assert _grad_err(g1, g0) <= 1e-5


@pytest.mark.parametrize("name", ["mamba2", "bamba"])
def test_convert_gated_models_train_without_cache(name):
    """A converted Mamba2/Bamba trains (use_cache=False, as with gradient checkpointing): train-mode output and
    gradients equal the original's."""
    m, inp, _ = _build(name)
    inp = dict(inp, use_cache=False)
    m2 = _convert(copy.deepcopy(m))
    o0, g0 = _run(m, inp, True)
    o1, g1 = _run(m2, inp, True)
    assert (o1 - o0).abs().max().item() <= 1e-5 * (1 + o0.abs().max().item())
    assert _grad_err(g1, g0) <= 1e-5


@pytest.mark.parametrize("name", ["dit", "sd3", "flux"])
def test_convert_diffusers_gradient_checkpointing_and_strict(name):
    """convert(strict=True) leaves no norm of DiT/SD3/Flux behind, and with gradient checkpointing in training the
    converted model's output and gradients equal the original's."""
    m, inp, _ = _build(name)
    m2 = normkit.convert(copy.deepcopy(m), backend="numba", strict=True)
    for mm in (m, m2):
        mm.enable_gradient_checkpointing()
    o0, g0 = _run(m, inp, True)
    o1, g1 = _run(m2, inp, True)
    assert (o1 - o0).abs().max().item() <= 1e-5 * (1 + o0.abs().max().item())
    assert _grad_err(g1, g0) <= 1e-5


def test_convert_mamba2_eval_unchanged():
    """Mamba2 in eval: output and gradients unchanged by convert."""
    m, inp, _ = _build("mamba2")
    m2 = _convert(copy.deepcopy(m))
    o0, g0 = _run(m, inp, False)
    o1, g1 = _run(m2, inp, False)
    assert (o1 - o0).abs().max().item() <= 1e-5 * (1 + o0.abs().max().item())
    assert _grad_err(g1, g0) <= 1e-5


@pytest.mark.parametrize("backend", ["numba", None], ids=["numba", "default"])
@pytest.mark.parametrize("name", ["dit", "sd3", "flux", "mamba2", "bamba"])
def test_convert_bfloat16_within_twice_the_originals_error(name, backend):
    """In bfloat16 the converted model's output and gradients are within 2x the bf16 original's own error against a
    float64 run of the original."""
    m, inp, _ = _build(name)
    o64, g64 = _run(copy.deepcopy(m).double(), _cast(inp, F64), False)
    ob, gb = _run(copy.deepcopy(m).bfloat16(), _cast(inp, BF16), False)
    m2 = _convert(copy.deepcopy(m).bfloat16(), backend)
    assert _normkit_types(m2)
    o2, g2 = _run(m2, _cast(inp, BF16), False)
    assert o2.dtype == ob.dtype
    e_orig = (ob.double() - o64).abs().max().item()
    assert (o2.double() - o64).abs().max().item() <= 2 * e_orig
    assert _grad_err(g2, g64) <= 2 * _grad_err(gb, g64)


@pytest.mark.parametrize("name", ["dit", "sd3", "flux", "mamba2", "bamba"])
def test_convert_twice_copy_pickle_and_to_torch(name):
    """Converting twice changes nothing more; deepcopy and pickle of a converted model give the same output;
    to_torch afterwards keeps the output (adapters stay, as documented) and the state_dict keys."""
    m, inp, _ = _build(name)
    m.eval()
    keys = list(m.state_dict())
    m2 = _convert(copy.deepcopy(m)).eval()
    types = _normkit_types(m2)
    m3 = _convert(m2).eval()
    assert _normkit_types(m3) == types
    with torch.no_grad():
        ref = _out(m, inp)
        for mm in (m3, copy.deepcopy(m3), pickle.loads(pickle.dumps(m3))):
            assert (_out(mm.eval(), inp) - ref).abs().max().item() <= 1e-5 * (1 + ref.abs().max().item())
        normkit.to_torch(m3)
        assert list(m3.state_dict()) == keys
        assert (_out(m3, inp) - ref).abs().max().item() <= 1e-5 * (1 + ref.abs().max().item())


@pytest.mark.parametrize("name,path", [("dit", "transformer_blocks.0.norm1"),
                                       ("flux", "single_transformer_blocks.0.norm"),
                                       ("sd3", "norm_out"), ("mamba2", "layers.0.mixer.norm")])
def test_convert_keeps_forward_hooks_on_block_norms(name, path):
    """A forward hook a user put on a block norm (activation capture, caching) still fires after convert."""
    m, inp, _ = _build(name)
    calls = []
    m.get_submodule(path).register_forward_hook(lambda *a: calls.append(1))
    m2 = _convert(m).eval()
    with torch.no_grad():
        _out(m2, inp)
    assert calls == [1]
