"""The layers beyond torch.nn, part two: masked BatchNorm1d / InstanceNorm1d for padded sequences,
GhostBatchNorm, BatchRenorm, BatchNormAct2d / GroupNormAct. Each is compared with an independent
plain-torch construction (BatchNorm of the unpadded tokens, InstanceNorm per unpadded sequence,
BatchNorm per chunk, a float64 hand computation, norm then activation), forward and gradients,
with random parameters and upstream gradients, on every backend (judged by
:data:`cases.TOLERANCES`)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import normkit
import normkit.functional as NF
from cases import BACKENDS, assert_close_to_reference, randomize_, seed_of, skip_if_declined

DTYPES = (torch.float32, torch.bfloat16)
_IDS = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
LENGTHS = (9, 3, 6, 2)  # padded to L = 9; no two alike, one of 2 tokens


def _mask(lengths: tuple[int, ...] = LENGTHS) -> Tensor:
    """``(N, L)``, True for the first ``lengths[n]`` of ``L = max(LENGTHS)`` positions."""
    return torch.arange(max(LENGTHS))[None, :] < torch.tensor(lengths)[:, None]


def _randn(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.5).to(dtype)


def _grads(module: nn.Module | Callable[[Tensor], Tensor], x: Tensor, dy_of: Callable[[Tensor], Tensor],
           **kw: Tensor) -> dict[str, Tensor]:
    """Output, input and parameter gradients of ``module(x, **kw)`` for upstream ``dy_of(y)``."""
    is_module = isinstance(module, nn.Module)
    if is_module:
        module.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    y = module(x, **kw)
    y.backward(dy_of(y))
    out = {"y": y.detach(), "dx": x.grad}
    if is_module:
        out.update({f"d{n}": p.grad.clone() for n, p in module.named_parameters()})
    return out


def _state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _judge_all(got: dict[str, Tensor], expected: dict[str, Tensor], reference: dict[str, Tensor] | None,
               dtype: torch.dtype, name: str) -> None:
    for key, value in got.items():
        assert_close_to_reference(value, expected[key], None if reference is None else reference[key],
                                  dtype=dtype, name=f"{name}: {key}")


# ---- masked statistics -------------------------------------------------------------------------


def _tokens(t: Tensor, mask: Tensor) -> Tensor:
    """The real tokens of ``(N, C, L)`` as ``(T, C)``."""
    return t.transpose(1, 2)[mask]


def _masked_bn_steps(module: nn.Module, dtype: torch.dtype, seed: int, masked: bool) -> dict[str, Tensor]:
    """Three training steps; outputs, gradients (on real tokens) and final buffers.

    ``masked``: ``module`` is normkit's BatchNorm1d called with the mask; else a torch
    BatchNorm1d called on the ``(T, C)`` real tokens."""
    mask = _mask()
    out: dict[str, Tensor] = {}
    for step in range(3):
        x = _randn((len(LENGTHS), 5, max(LENGTHS)), seed + step).to(dtype)
        dy = _randn(tuple(x.shape), seed + 100 + step)
        if masked:
            r = _grads(module, x, lambda y: dy.to(y.dtype), mask=mask)
            assert torch.all(_tokens(r["y"], ~mask) == 0) and torch.all(_tokens(r["dx"], ~mask) == 0)
            r["y"], r["dx"] = _tokens(r["y"], mask), _tokens(r["dx"], mask)
        else:
            r = _grads(module, _tokens(x, mask), lambda y: _tokens(dy, mask).to(y.dtype))
        out.update({f"{k}{step}": v for k, v in r.items()})
    out.update({k: v for k, v in module.state_dict().items()})
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=_IDS.get)
@pytest.mark.parametrize("backend", BACKENDS)
@skip_if_declined
def test_masked_batch_norm_is_batch_norm_of_the_real_tokens(backend: str, dtype: torch.dtype) -> None:
    seed = seed_of("masked bn", backend, dtype)
    theirs = randomize_(nn.BatchNorm1d(5), seed)
    ours = normkit.BatchNorm1d(5, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    reference = None
    if dtype == torch.bfloat16:
        reference = _masked_bn_steps(randomize_(nn.BatchNorm1d(5), seed).double(), torch.float64, seed, False)
    expected = _masked_bn_steps(theirs, dtype, seed, False)
    got = _masked_bn_steps(ours, dtype, seed, True)
    _judge_all(got, expected, reference, dtype, f"masked BatchNorm1d[{backend}]")
    # eval: the running statistics normalize the real tokens; padding stays 0
    x, mask = _randn((4, 5, 9), seed + 7, dtype), _mask()
    y = ours.eval()(x, mask)
    if dtype == torch.float32:
        assert_close_to_reference(_tokens(y, mask), theirs.eval()(_tokens(x, mask)), name="eval")
    assert torch.all(_tokens(y, ~mask) == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=_IDS.get)
@pytest.mark.parametrize("backend", BACKENDS)
@skip_if_declined
def test_masked_instance_norm_is_instance_norm_of_each_unpadded_sequence(backend: str, dtype: torch.dtype) -> None:
    seed = seed_of("masked in", backend, dtype)
    ours = randomize_(normkit.InstanceNorm1d(5, affine=True, track_running_stats=True, backend=backend), seed)
    x, mask = _randn((4, 5, 9), seed, dtype), _mask()
    dy = _randn(tuple(x.shape), seed + 1)
    got = _grads(ours, x, lambda y: dy.to(y.dtype), mask=mask)
    assert torch.all(_tokens(got["y"], ~mask) == 0) and torch.all(_tokens(got["dx"], ~mask) == 0)

    def per_sequence(dt: torch.dtype) -> dict[str, Tensor]:
        plain = randomize_(nn.InstanceNorm1d(5, affine=True), seed).to(dt if dt == torch.float64 else torch.float32)
        xs = x.to(dt).detach().clone().requires_grad_(True)
        y = torch.cat([F.pad(plain(xs[i:i + 1, :, :n]), (0, x.shape[2] - n)) for i, n in enumerate(LENGTHS)])
        y.backward(dy.to(y.dtype))
        return {"y": y.detach(), "dx": xs.grad, "dweight": plain.weight.grad, "dbias": plain.bias.grad}

    expected = per_sequence(dtype)
    reference = per_sequence(torch.float64) if dtype == torch.bfloat16 else None
    _judge_all(got, expected, reference, dtype, f"masked InstanceNorm1d[{backend}]")
    # running statistics: batch average of each sequence's mean and unbiased variance
    xd = x.double()
    means = torch.stack([xd[i, :, :n].mean(1) for i, n in enumerate(LENGTHS)]).mean(0)
    vars_ = torch.stack([xd[i, :, :n].var(1) for i, n in enumerate(LENGTHS)]).mean(0)
    start = randomize_(nn.InstanceNorm1d(5, affine=True, track_running_stats=True), seed)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_mean.double(), 0.9 * start.running_mean.double() + 0.1 * means, **tol)
    torch.testing.assert_close(ours.running_var.double(), 0.9 * start.running_var.double() + 0.1 * vars_, **tol)


@pytest.mark.parametrize(
    ("build", "x", "mask", "match"),
    [
        (lambda: normkit.BatchNorm1d(5), torch.randn(4, 5, 9), _mask()[:, :8], r"shape \(N, L\) = \[4, 9\]"),
        (lambda: normkit.BatchNorm1d(5), torch.randn(4, 5, 9), _mask().float(), r"bool tensor of shape \(N, L\)"),
        (lambda: normkit.BatchNorm1d(5), torch.randn(4, 5), _mask(), r"needs \(N, C, L\) input"),
        (lambda: normkit.BatchNorm1d(5), torch.randn(4, 5, 9), _mask((1, 0, 0, 0)), "more than 1 real token"),
        (lambda: normkit.InstanceNorm1d(5, track_running_stats=True), torch.randn(4, 5, 9), _mask((3, 0, 2, 0)),
         r"samples \[1, 3\] .* all padding"),
        (lambda: normkit.InstanceNorm1d(5), torch.randn(4, 5, 9), _mask()[None], r"shape \(N, L\) = \[4, 9\]"),
    ],
    ids=["bn_shape", "bn_dtype", "bn_2d", "bn_one_token", "in_empty_sample", "in_shape"],
)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_bad_masks_raise_and_change_no_buffer(build: Callable[[], nn.Module], x: Tensor, mask: Tensor, match: str,
                                              backend: str) -> None:
    module = build()
    module.backend = backend
    before = _state(module)
    with pytest.raises(ValueError, match=match):
        module(x, mask)
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a failed call"


# ---- GhostBatchNorm ----------------------------------------------------------------------------


@pytest.mark.parametrize(("dim", "shape", "virtual"), [(1, (11, 3, 4), 4), (2, (7, 3, 2, 3), 3), (1, (6, 3), 8)])
@pytest.mark.parametrize("backend", BACKENDS)
@skip_if_declined
def test_ghost_batch_norm_is_batch_norm_per_chunk(backend: str, dim: int, shape: tuple[int, ...], virtual: int) -> None:
    seed = seed_of("ghost", backend, dim, shape)
    theirs = randomize_(getattr(nn, f"BatchNorm{dim}d")(3), seed)
    ours = getattr(normkit, f"GhostBatchNorm{dim}d")(3, virtual, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    for step in range(2):
        x, dy = _randn(shape, seed + step), _randn(shape, seed + 10 + step)
        got = _grads(ours, x, lambda y: dy)

        def chunked(m: nn.Module, x: Tensor) -> Tensor:
            return torch.cat([m(c) for c in x.split(virtual)])

        expected = _grads(lambda t: chunked(theirs, t), x, lambda y: dy)  # type: ignore[arg-type]
        expected.update({f"d{n}": p.grad.clone() for n, p in theirs.named_parameters()})
        theirs.zero_grad()
        _judge_all(got, expected, None, torch.float32, f"GhostBatchNorm{dim}d[{backend}] step {step}")
    for k, v in theirs.state_dict().items():
        assert_close_to_reference(ours.state_dict()[k], v, name=k)
    x = _randn(shape, seed + 5)
    assert_close_to_reference(ours.eval()(x), theirs.eval()(x), name="eval")


def test_ghost_batch_norm_last_chunk_of_one_value_raises_and_keeps_buffers() -> None:
    ours = normkit.GhostBatchNorm1d(3, 4)
    before = _state(ours)
    with pytest.raises(ValueError, match="last virtual batch has 1 value per channel"):
        ours(torch.randn(9, 3))
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
    assert ours.num_batches_tracked == 0
    with pytest.raises(ValueError, match="positive int"):
        normkit.GhostBatchNorm2d(3, 0)
    assert list(ours.state_dict()) == list(nn.BatchNorm1d(3).state_dict())


# ---- BatchRenorm -------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
@skip_if_declined
def test_batch_renorm_without_correction_is_batch_norm(backend: str, dim: int) -> None:
    seed = seed_of("renorm bn", backend, dim)
    theirs = randomize_(getattr(nn, f"BatchNorm{dim}d")(3), seed)
    ours = getattr(normkit, f"BatchRenorm{dim}d")(3, r_max=1.0, d_max=0.0, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    shape = (5, 3, *(4, 3, 2)[:dim])
    for step in range(3):
        x, dy = _randn(shape, seed + step), _randn(shape, seed + 10 + step)
        _judge_all(_grads(ours, x, lambda y: dy), _grads(theirs, x, lambda y: dy), None, torch.float32,
                   f"BatchRenorm{dim}d[{backend}] step {step}")
    for k, v in theirs.state_dict().items():
        assert_close_to_reference(ours.state_dict()[k], v, name=k)


@pytest.mark.parametrize("backend", BACKENDS)
@skip_if_declined
def test_batch_renorm_matches_hand_computation_in_float64(backend: str) -> None:
    seed = seed_of("renorm hand", backend)
    eps, r_max, d_max = 1e-3, 1.5, 0.5
    ours = randomize_(normkit.BatchRenorm2d(4, eps, r_max=r_max, d_max=d_max, backend=backend), seed).double()
    with torch.no_grad():  # running statistics that make some r and d clamp, others not
        ours.running_mean.copy_(torch.tensor([0.5, 3.0, -3.0, 0.4]))
        ours.running_var.copy_(torch.tensor([2.0, 0.1, 30.0, 2.5]))
    mu_run, var_run = ours.running_mean.clone(), ours.running_var.clone()
    x, dy = _randn((6, 4, 3, 3), seed, torch.float64), _randn((6, 4, 3, 3), seed + 1, torch.float64)
    got = _grads(ours, x, lambda y: dy)

    w, b = ours.weight.detach().clone().requires_grad_(True), ours.bias.detach().clone().requires_grad_(True)
    xs = x.clone().requires_grad_(True)
    mu_b = xs.mean((0, 2, 3))
    sigma_b = (xs.var((0, 2, 3), unbiased=False) + eps).sqrt()
    sigma_run = (var_run + eps).sqrt()
    r = (sigma_b / sigma_run).clamp(1 / r_max, r_max).detach()
    d = ((mu_b - mu_run) / sigma_run).clamp(-d_max, d_max).detach()
    assert (r == r_max).any() and (r < r_max).any() and (d.abs() == d_max).any() and (d.abs() < d_max).any()
    c = (slice(None), None, None)
    y = ((xs - mu_b[c]) / sigma_b[c] * r[c] + d[c]) * w[c] + b[c]
    y.backward(dy)
    expected = {"y": y.detach(), "dx": xs.grad, "dweight": w.grad, "dbias": b.grad}
    _judge_all(got, expected, None, torch.float64, f"BatchRenorm2d[{backend}]")
    n = x.numel() // 4
    torch.testing.assert_close(ours.running_mean, 0.9 * mu_run + 0.1 * mu_b.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, 0.9 * var_run + 0.1 * (sigma_b.detach() ** 2 - eps) * n / (n - 1),
                               rtol=1e-12, atol=1e-12)
    ours.eval()
    bn = nn.BatchNorm2d(4, eps).double().eval()
    bn.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), bn(x), rtol=1e-12, atol=1e-12)


def test_batch_renorm_warmup_ramps_limits_linearly() -> None:
    m = normkit.BatchRenorm1d(3, r_max=3.0, d_max=5.0, warmup_steps=4)
    for step, (r_lim, d_lim) in {0: (1.0, 0.0), 1: (1.5, 1.25), 2: (2.0, 2.5), 4: (3.0, 5.0), 9: (3.0, 5.0)}.items():
        m.num_batches_tracked.fill_(step)
        assert [t.item() for t in m.renorm_limits()] == [r_lim, d_lim], step
    m.num_batches_tracked.zero_()
    m.running_mean.fill_(10.0)  # far from the batch: at step 0 the layer is still plain BatchNorm
    x = torch.randn(8, 3)
    torch.testing.assert_close(m(x), F.batch_norm(x, None, None, m.weight, m.bias, True))
    assert m.num_batches_tracked == 1
    with pytest.raises(ValueError, match="r_max >= 1"):
        normkit.BatchRenorm2d(3, r_max=0.5)
    assert list(m.state_dict()) == list(nn.BatchNorm1d(3).state_dict())


# ---- norm + activation -------------------------------------------------------------------------

_ACTS: dict[str | None, Callable[[Tensor], Tensor]] = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu,
                                                       None: lambda t: t}


@pytest.mark.parametrize("act", list(_ACTS), ids=str)
@pytest.mark.parametrize("name", ["BatchNormAct2d", "GroupNormAct"])
@pytest.mark.parametrize("backend", BACKENDS)
@skip_if_declined
def test_norm_act_is_norm_then_activation(backend: str, name: str, act: str | None) -> None:
    seed = seed_of("norm act", backend, name, act)
    theirs = randomize_(nn.BatchNorm2d(6) if name == "BatchNormAct2d" else nn.GroupNorm(3, 6), seed)
    args = (6,) if name == "BatchNormAct2d" else (3, 6)
    ours = getattr(normkit, name)(*args, act=act, backend=backend)
    ours.load_state_dict(theirs.state_dict())  # the plain norm's checkpoint loads as is
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for step in range(2):
        x, dy = _randn((4, 6, 3, 5), seed + step), _randn((4, 6, 3, 5), seed + 10 + step)
        plain = lambda t: _ACTS[act](theirs(t))  # noqa: E731
        expected = _grads(plain, x, lambda y: dy)  # type: ignore[arg-type]
        expected.update({f"d{n}": p.grad.clone() for n, p in theirs.named_parameters()})
        theirs.zero_grad()
        _judge_all(_grads(ours, x, lambda y: dy), expected, None, torch.float32, f"{name}({act})[{backend}]")
    for k, v in theirs.state_dict().items():
        assert_close_to_reference(ours.state_dict()[k], v, name=k)


def test_norm_act_rejects_unknown_activation_and_shows_act() -> None:
    with pytest.raises(ValueError,
                       match=r"unknown activation 'tanh'; expected one of \['silu', 'relu', 'gelu', None\]"):
        normkit.BatchNormAct2d(4, act="tanh")
    with pytest.raises(ValueError, match="unknown activation"):
        normkit.GroupNormAct(2, 4, act="swish")
    assert "act='silu'" in repr(normkit.GroupNormAct(2, 4))
    assert isinstance(normkit.BatchNormAct2d(4), nn.BatchNorm2d)
    assert isinstance(normkit.GroupNormAct(2, 4), nn.GroupNorm)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_norm_act_rejects_unknown_activation_before_any_work(backend: str) -> None:
    x = torch.randn(4, 3, 5)
    stats = [torch.randn(3), torch.rand(3) + 0.5]
    before = [s.clone() for s in stats]
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        NF.batch_norm_act(x, *stats, None, None, True, act="tanh", backend=backend)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        NF.group_norm_act(x, 3, act="swish", backend=backend)
    assert all(torch.equal(s, b) for s, b in zip(stats, before, strict=True))
