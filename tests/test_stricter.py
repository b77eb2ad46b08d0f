"""Where normkit is stricter or more exact than torch: one test per documented difference.

Each test asserts what normkit does and what torch 2.13 does for the same input, so a change on
either side shows up here (the README table "Where normkit differs from torch" lists them). The
numerical ones are properties of normkit's own arithmetic (the reference backend; the torch
backend is ATen itself); the state ones hold on every backend that runs CPU calls.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normkit
import normkit.functional as NF
from cases import seed_of, skip_if_declined
from test_errors import CPU_BACKENDS


def _rand(*shape: int, seed: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed_of(seed)), dtype=torch.float64).to(dtype)


# ---- numerics (the reference backend) ----------------------------------------------------------

CHANNEL_NORMS = {
    "batch_norm": (lambda x, b, **kw: NF.batch_norm(x, None, None, None, b, True, **kw),
                   lambda x, b: F.batch_norm(x, None, None, None, b, True)),
    "group_norm": (lambda x, b, **kw: NF.group_norm(x, 3, None, b, **kw), lambda x, b: F.group_norm(x, 3, None, b)),
    "instance_norm": (lambda x, b, **kw: NF.instance_norm(x, bias=b, **kw), lambda x, b: F.instance_norm(x, bias=b)),
}


@pytest.mark.parametrize("op", list(CHANNEL_NORMS))
def test_constant_input_gives_exactly_the_bias(op: str) -> None:
    """A constant channel has variance 0 and x - mean = 0: the output is the bias, exactly.
    normkit subtracts one element of each reduced slice before the mean (the sum then cancels
    exactly); torch's float32 kernels leave a rounding residue (about 2e-6 here)."""
    nk, tf = CHANNEL_NORMS[op]
    x, bias = torch.full((2, 3, 7), 0.3), _rand(3, seed="constant bias")
    expected = bias[:, None].expand(2, 3, 7)
    assert torch.equal(nk(x, bias, backend="reference"), expected)
    assert not torch.equal(tf(x, bias), expected)  # torch: bias + ~2e-6


@pytest.mark.parametrize("op", ["layer_norm", "group_norm", "batch_norm", "instance_norm"])
def test_huge_common_offset_stays_finite_and_accurate(op: str) -> None:
    """float32 input at 1e20 with a spread of 1e14: torch's LayerNorm and GroupNorm return NaN
    (its float32 sums of squares overflow) and its BatchNorm/InstanceNorm are off by 1e-2;
    normkit's reference stays within 1e-6 of the float64 result. A constant input at 1e30 is
    exactly 0 in normkit, NaN (LayerNorm, GroupNorm) or about 2e24 (BatchNorm) in torch."""
    fns = {
        "layer_norm": (lambda x, **kw: NF.layer_norm(x, (8,), **kw), lambda x: F.layer_norm(x, (8,))),
        "group_norm": (lambda x, **kw: NF.group_norm(x, 3, **kw), lambda x: F.group_norm(x, 3)),
        "batch_norm": (lambda x, **kw: NF.batch_norm(x, None, None, training=True, **kw),
                       lambda x: F.batch_norm(x, None, None, training=True)),
        "instance_norm": (lambda x, **kw: NF.instance_norm(x, **kw), lambda x: F.instance_norm(x)),
    }
    nk, tf = fns[op]
    x = (1e20 + _rand(4, 3, 8, seed=f"offset {op}", dtype=torch.float64) * 1e14).float()
    truth = tf(x.double())
    assert (nk(x, backend="reference").double() - truth).abs().max() < 1e-6
    torch_error = (tf(x).double() - truth).abs().max()
    assert torch_error.isnan() or torch_error > 1e-2
    constant = torch.full((4, 3, 8), 1e30)
    assert torch.equal(nk(constant, backend="reference"), torch.zeros_like(constant))
    torch_constant = tf(constant)
    assert torch_constant.isnan().any() or torch_constant.abs().max() > 1e20


def test_group_norm_with_bias_but_no_weight_has_gradients() -> None:
    """GroupNorm(weight=None, bias=b): torch computes the forward but its backward raises
    ``RuntimeError: tensor does not have a device``; normkit's gives the bias gradient (the sum of
    dy over each channel) and the input gradient of the unweighted norm."""
    x, bias = _rand(2, 4, 5, seed="gn x").requires_grad_(), _rand(4, seed="gn bias").requires_grad_()
    dy = _rand(2, 4, 5, seed="gn dy")
    y = NF.group_norm(x, 2, None, bias, backend="reference")
    dx, dbias = torch.autograd.grad(y, (x, bias), dy)
    torch.testing.assert_close(dbias, dy.sum((0, 2)))
    torch.testing.assert_close(dx, torch.autograd.grad(F.group_norm(x, 2), x, dy)[0])
    with pytest.raises(RuntimeError, match="tensor does not have a device"):
        torch.autograd.grad(F.group_norm(x, 2, None, bias), (x, bias), dy)


# ---- state: every backend ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_instance_norm_of_an_empty_batch_keeps_running_stats(backend: str) -> None:
    """InstanceNorm on N = 0: torch averages no instances into the running statistics (NaN) and,
    with affine parameters, raises IndexError; normkit returns the empty output and changes
    nothing."""
    x = torch.randn(0, 3, 5)
    torch_stats = (torch.zeros(3), torch.ones(3))
    F.instance_norm(x, *torch_stats)
    assert torch_stats[0].isnan().all() and torch_stats[1].isnan().all()
    stats = (torch.zeros(3), torch.ones(3))
    assert NF.instance_norm(x, *stats, backend=backend).shape == (0, 3, 5)
    assert torch.equal(stats[0], torch.zeros(3)) and torch.equal(stats[1], torch.ones(3))

    with pytest.raises(IndexError):
        nn.InstanceNorm1d(3, affine=True, track_running_stats=True)(x)
    module = normkit.InstanceNorm1d(3, affine=True, track_running_stats=True, backend=backend)
    assert module(x).shape == (0, 3, 5)
    assert torch.equal(module.running_mean, torch.zeros(3)) and torch.equal(module.running_var, torch.ones(3))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_failed_batch_norm_call_does_not_count_a_batch(backend: str) -> None:
    """torch's BatchNorm increments num_batches_tracked before ATen checks the input, so a call
    that raises still counts; normkit counts only calls that succeed."""
    x = torch.randn(2, 4, 3, 3)  # 4 channels for a 3-channel module
    torch_module, module = nn.BatchNorm2d(3), normkit.BatchNorm2d(3, backend=backend)
    for m in (torch_module, module):
        with pytest.raises(RuntimeError, match="running_mean should contain 4 elements not 3"):
            m(x)
    assert torch_module.num_batches_tracked.item() == 1
    assert module.num_batches_tracked.item() == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lazy_module_is_not_materialized_by_a_failed_call(backend: str) -> None:
    """torch's Lazy modules materialize in a pre-hook, before the forward checks the input: an
    unbatched (C, H, W) input to LazyInstanceNorm2d sizes it by H (dim 1) and then raises, and
    stays so. normkit raises the same error and stays lazy, so a good call still sizes it."""
    bad, good = torch.randn(3, 4, 5), torch.randn(2, 3, 4, 5)
    torch_module, module = nn.LazyInstanceNorm2d(), normkit.LazyInstanceNorm2d(backend=backend)
    for m in (torch_module, module):
        with pytest.raises(ValueError, match="expected input's size at dim=0 to match num_features"):
            m(bad)
    assert type(torch_module) is nn.InstanceNorm2d and torch_module.num_features == 4
    assert type(module) is normkit.LazyInstanceNorm2d and module.has_uninitialized_params()
    module(good)
    assert type(module) is normkit.InstanceNorm2d and module.num_features == 3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("no_grad", [False, True], ids=["grad", "no_grad"])
def test_module_built_in_inference_mode_fails_before_any_write(backend: str, no_grad: bool) -> None:
    """A BatchNorm built under torch.inference_mode() and trained outside it cannot update its
    buffers: torch's module raises at its counter increment, first thing; normkit raises the
    same error before any work (its counter is incremented last), so nothing is written."""
    x = _rand(2, 3, 2, 2, seed="inference module")
    with torch.inference_mode():
        torch_module, module = nn.BatchNorm2d(3), normkit.BatchNorm2d(3, backend=backend)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    for m in (torch_module, module):
        with torch.no_grad() if no_grad else torch.enable_grad():
            with pytest.raises(RuntimeError, match="^Inplace update to inference tensor outside InferenceMode"):
                m(x)
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@skip_if_declined
def test_low_precision_running_stats_rounded_once(backend: str, dtype: torch.dtype) -> None:
    """fp16/bf16 running statistics are updated in float32 and rounded once, as ATen does: within
    twice torch's own error against float64 (three roundings in the statistics' dtype gave
    17x torch's error in fp16)."""
    x = _rand(4, 3, 5, 5, seed="running low precision", dtype=torch.float64) * 3 + 5
    truth = nn.BatchNorm2d(3).double()
    truth(x)
    errors = []
    for m in (nn.BatchNorm2d(3).to(dtype), normkit.BatchNorm2d(3, backend=backend).to(dtype)):
        m(x.to(dtype))
        errors.append(max((m.running_mean.double() - truth.running_mean).abs().max().item(),
                          (m.running_var.double() - truth.running_var).abs().max().item()))
    torch_error, error = errors
    assert error <= 2 * torch_error + torch.finfo(dtype).eps, (error, torch_error)


def test_rms_norm_with_an_infinite_element_is_torch_s() -> None:
    """An inf in a row makes its mean square inf: torch gives NaN at the inf and 0 elsewhere;
    the reference's overflow guard leaves such a row to the plain formula, so it agrees."""
    x = torch.tensor([[float("inf"), 1.0, 2.0, 3.0], [1.0, -2.0, 3.0, 0.5]])
    torch.testing.assert_close(NF.rms_norm(x, (4,), backend="reference"), F.rms_norm(x, (4,)), equal_nan=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batch_norm_under_grad_transform_fails_before_any_write(backend: str) -> None:
    """torch.func.grad refuses in-place writes to tensors captured from outside it, such as a
    training BatchNorm's buffers: torch's module raises at its counter increment, first thing;
    normkit raises the same error before its running statistics are written."""
    x = _rand(3, 4, 5, seed="grad captured buffers")
    torch_module, module = nn.BatchNorm1d(4), normkit.BatchNorm1d(4, backend=backend)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    for m in (torch_module, module):
        with pytest.raises(RuntimeError, match="^During a grad .* mutate a captured Tensor"):
            torch.func.grad(lambda x, m=m: m(x).square().sum())(x)
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "group_norm"])
def test_eps_zero_on_subnormal_input_is_exact(op: str) -> None:
    """With eps=0 the variance of float32 input below 1e-19 underflows: torch divides by it
    (inf), and without a guard it would be 0 (silent zeros); the reference rescales the slice by
    a power of two first, so 1e-38 normalizes as exactly as 1."""
    x = torch.tensor([[1e-38, -1e-38, 2e-38, -3e-38], [1e-40, -1e-40, 2e-40, -3e-40]])  # normal, subnormal
    call = {
        "layer_norm": lambda t, **kw: (NF if kw else F).layer_norm(t, (4,), eps=0.0, **kw),
        "rms_norm": lambda t, **kw: (NF if kw else F).rms_norm(t, (4,), eps=0.0, **kw),
        "group_norm": lambda t, **kw: (NF if kw else F).group_norm(t[:, :, None], 1, eps=0.0, **kw),
    }[op]
    truth = call(x.double())
    # 1e-4: a subnormal float32 carries about 17 significant bits, and its mean is rounded there
    torch.testing.assert_close(call(x, backend="reference").double(), truth, rtol=1e-4, atol=1e-4)
    if op != "group_norm" and "numba" in CPU_BACKENDS:  # the numba row kernels rescale such a row too
        torch.testing.assert_close(call(x, backend="numba").double(), truth, rtol=1e-4, atol=1e-4)
    assert not torch.isfinite(call(x)).all()  # torch: inf


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])
@pytest.mark.parametrize("op", ["layer_norm", "group_norm"])
def test_eps_zero_on_a_constant_row_gives_the_bias(op: str, backend: str) -> None:
    """eps=0 on a constant row is 0/0: torch's LayerNorm and GroupNorm give NaN, its BatchNorm
    and InstanceNorm the bias (rstd = 0 where var + eps == 0); normkit's kernels apply that one
    rule to every norm, so a constant row gives the bias and a zero input gradient."""
    x = torch.full((2, 4, 3), 1.5, requires_grad=True)
    b = _rand(4, seed="eps0 bias") if op == "group_norm" else _rand(3, seed="eps0 bias")
    w = torch.ones_like(b)
    if op == "layer_norm":
        y, y_torch = NF.layer_norm(x, (3,), w, b, 0.0, backend=backend), F.layer_norm(x, (3,), w, b, 0.0)
        expected = b.expand(2, 4, 3)
    else:
        y, y_torch = NF.group_norm(x, 2, w, b, 0.0, backend=backend), F.group_norm(x, 2, w, b, 0.0)
        expected = b[:, None].expand(2, 4, 3)
    assert torch.isnan(y_torch).all()
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    (dx,) = torch.autograd.grad(y, x, torch.randn_like(y))
    assert torch.equal(dx, torch.zeros_like(dx))
