"""The layers beyond torch.nn: ``functional.normalize`` and its presets, LayerNorm2d / RMSNorm2d,
FrozenBatchNorm, RMSNorm's precision options. Each is compared with an independent plain-torch
construction, forward and input/parameter gradients, with random parameters and upstream
gradients, on every backend, in float32 and bfloat16 (judged by :data:`cases.TOLERANCES`)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import normkit
import normkit.functional as NF
from cases import BACKENDS, assert_close_to_reference, make_input, seed_of, skip_if_declined

DTYPES = (torch.float32, torch.bfloat16)
_IDS = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def _run(fn: Callable[..., Tensor], x: Tensor, params: list[Tensor], seed: int) -> dict[str, Tensor]:
    """Output and gradients of ``fn(x, *params)`` for a random upstream gradient."""
    x = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in params]
    y = fn(x, *params)
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    y.backward(dy)
    out = {"y": y.detach(), "dx": x.grad}
    out.update({f"dp{i}": p.grad for i, p in enumerate(params)})
    return out


def _judge(actual: Callable[..., Tensor], torch_fn: Callable[..., Tensor], x: Tensor, params: list[Tensor],
           seed: int, name: str) -> None:
    """``actual`` against ``torch_fn`` in x's dtype; in bf16 both judged against float64."""
    got = _run(actual, x, params, seed)
    expected = _run(torch_fn, x, params, seed)
    reference = None
    if x.dtype == torch.bfloat16:
        reference = _run(torch_fn, x.double(), [p.double() for p in params], seed)
    for key, value in got.items():
        assert_close_to_reference(value, expected[key], None if reference is None else reference[key],
                                  dtype=x.dtype, name=f"{name}: {key}")


# ---- functional.normalize ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@skip_if_declined
def test_named_norms_are_presets_of_normalize(backend: str) -> None:
    gen = torch.Generator().manual_seed(seed_of("presets"))
    x = torch.randn(4, 6, 5, 7, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    w, b = torch.randn(5, 7, generator=gen, dtype=torch.float64), torch.randn(5, 7, generator=gen, dtype=torch.float64)
    c = torch.randn(6, generator=gen, dtype=torch.float64)
    per_channel = (slice(None), None, None)
    close = lambda a, e: torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    close(NF.layer_norm(x, (5, 7), w, b, backend=backend), NF.normalize(x, (-2, -1), w, b, backend=backend))
    close(NF.rms_norm(x, (7,), w[0], 1e-6, backend=backend),
          NF.normalize(x, -1, w[0], None, 1e-6, center=False, backend=backend))
    close(NF.instance_norm(x, backend=backend), NF.normalize(x, (2, 3), backend=backend))
    close(NF.batch_norm(x, None, None, c, c.flip(0), training=True, backend=backend),
          NF.normalize(x, (0, 2, 3), backend=backend) * c[per_channel] + c.flip(0)[per_channel])
    close(NF.group_norm(x, 3, backend=backend), NF.normalize(x.view(4, 3, -1), 2, backend=backend).view_as(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=_IDS.get)
@pytest.mark.parametrize("center", [True, False], ids=["centred", "rms"])
@pytest.mark.parametrize("backend", BACKENDS)
@skip_if_declined
def test_normalize_over_unordered_dims_matches_permuted_torch(backend: str, center: bool, dtype: torch.dtype) -> None:
    """dims (3, 1) of (N, C, H, W): weight shaped (W, C), as normalized_shape after moving them last."""
    seed = seed_of("normalize", backend, center, dtype)
    x = make_input((3, 4, 5, 6), dtype, seed, requires_grad=False)
    gen = torch.Generator().manual_seed(seed)
    w, b = (torch.randn(6, 4, generator=gen).to(dtype) for _ in range(2))

    def plain(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        moved = x.permute(0, 2, 3, 1)  # (N, H, W, C)
        if center:
            y = F.layer_norm(moved, (6, 4), w, b, 1e-5)
        else:
            y = F.rms_norm(moved, (6, 4), w, 1e-5) + b
        return y.permute(0, 3, 1, 2)

    ours = lambda x, w, b: NF.normalize(x, (3, 1), w, b, 1e-5, center=center, backend=backend)
    _judge(ours, plain, x, [w, b], seed, f"normalize[{backend}]")


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda x: NF.normalize(x, ()), ValueError, "at least one dim"),
        (lambda x: NF.normalize(x, (1, -2)), ValueError, "distinct"),
        (lambda x: NF.normalize(x, 4), IndexError, "out of range"),
        (lambda x: NF.normalize(x, 1.0), TypeError, "must be ints"),
        (lambda x: NF.normalize(x, 1, torch.ones(4)), RuntimeError, r"Expected weight of shape \[3\]"),
        (lambda x: NF.normalize(x, (1, 2), None, torch.ones(4, 3)), RuntimeError, r"bias of shape \[3, 4\]"),
        (lambda x: NF.normalize(x, 1, eps=-1.0), ValueError, "non-negative"),
        (lambda x: NF.normalize(x.long(), 1), NotImplementedError, "floating-point"),
    ],
)
def test_normalize_bad_calls_raise_clearly(call: Callable[[Tensor], Tensor], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call(torch.randn(2, 3, 4))


# ---- LayerNorm2d, RMSNorm2d --------------------------------------------------------------------


def _permuted(norm: Callable[..., Tensor]) -> Callable[..., Tensor]:
    return lambda x, *params: norm(x.permute(0, 2, 3, 1), *params).permute(0, 3, 1, 2)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_IDS.get)
@pytest.mark.parametrize("name", ["LayerNorm2d", "RMSNorm2d"])
@pytest.mark.parametrize("backend", BACKENDS)
@skip_if_declined
def test_channels_first_norms_match_permuted_torch(backend: str, name: str, dtype: torch.dtype, layout: str) -> None:
    seed = seed_of(name, backend, dtype, layout)
    x = make_input((2, 5, 3, 7), dtype, seed, layout, requires_grad=False)
    module = getattr(normkit, name)(5, eps=1e-6, backend=backend, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(p.shape, generator=gen).to(dtype) for p in module.parameters()]
    if name == "LayerNorm2d":
        plain = _permuted(lambda x, w, b: F.layer_norm(x, (5,), w, b, 1e-6))
    else:
        plain = _permuted(lambda x, w: F.rms_norm(x, (5,), w, 1e-6))

    def ours(x: Tensor, *params: Tensor) -> Tensor:
        y = torch.func.functional_call(module, dict(zip(["weight", "bias"], params, strict=False)), (x,))
        if layout == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)
        return y

    _judge(ours, plain, x, params, seed, f"{name}[{backend}]")


@pytest.mark.parametrize("name", ["LayerNorm2d", "RMSNorm2d"])
def test_channels_first_norms_state_dict_and_errors(name: str) -> None:
    module = getattr(normkit, name)(8)
    keys = {"LayerNorm2d": ["weight", "bias"], "RMSNorm2d": ["weight"]}[name]
    assert list(module.state_dict()) == keys and all(v.shape == (8,) for v in module.state_dict().values())
    with pytest.raises(ValueError, match="expected 4D input"):
        module(torch.randn(2, 8, 3))
    with pytest.raises(ValueError, match="C=8"):
        module(torch.randn(2, 3, 4, 8))  # channels-last input by mistake
    traced = torch.fx.symbolic_trace(nn.Sequential(module))
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(traced(x), module(x))


# ---- FrozenBatchNorm ---------------------------------------------------------------------------


def _random_bn(cls: type[nn.Module], seed: int) -> nn.Module:
    bn = cls(4)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(4, generator=gen))
        bn.bias.copy_(torch.randn(4, generator=gen))
        bn.running_mean.copy_(torch.randn(4, generator=gen) * 0.5)
        bn.running_var.copy_(torch.rand(4, generator=gen) + 0.5)
        bn.num_batches_tracked.fill_(7)
    return bn


@pytest.mark.parametrize("dtype", DTYPES, ids=_IDS.get)
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
@skip_if_declined
def test_frozen_batch_norm_in_train_mode_is_batch_norm_in_eval_mode(backend: str, dim: int, dtype: torch.dtype) -> None:
    seed = seed_of("frozen", backend, dim, dtype)
    bn = _random_bn(getattr(nn, f"BatchNorm{dim}d"), seed).to(dtype).eval()
    frozen = getattr(normkit, f"FrozenBatchNorm{dim}d")(4, backend=backend)
    frozen.load_state_dict(bn.state_dict())  # a BatchNorm checkpoint, as is
    frozen.train()
    x = make_input((3, 4) + (5,) * dim, dtype, seed, requires_grad=False)
    reference = _random_bn(getattr(nn, f"BatchNorm{dim}d"), seed).double().eval()
    _judge(lambda x: frozen(x), lambda x: (bn if x.dtype == dtype else reference)(x), x, [], seed, "FrozenBN")
    assert frozen.num_batches_tracked.item() == 7 and not list(frozen.parameters())
    assert list(frozen.state_dict()) == list(bn.state_dict())


def test_frozen_batch_norm_loads_torchvision_checkpoints_and_rejects_bad_input() -> None:
    bn = _random_bn(nn.BatchNorm2d, 1).eval()
    state = {k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"}
    frozen = normkit.FrozenBatchNorm2d(4)
    frozen.load_state_dict(state)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(frozen(x), bn(x))
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        frozen(torch.randn(2, 4, 3))
    with pytest.raises(RuntimeError, match="running_mean should contain 5 elements not 4"):
        frozen(torch.randn(2, 5, 3, 3))
    assert all(torch.equal(v, before[k]) for k, v in frozen.state_dict().items())


def test_freeze_and_unfreeze_batch_norm_in_place() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _random_bn(nn.BatchNorm2d, 2), nn.ReLU(),
                          nn.Sequential(nn.Flatten(), nn.Linear(4 * 9, 4), _random_bn(normkit.BatchNorm1d, 3)))
    model = model.to(torch.float64)
    model.eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    expected = model(x)
    stats = model[1].running_mean
    assert normkit.freeze_batch_norm(model) is model
    assert type(model[1]) is normkit.FrozenBatchNorm2d and type(model[3][2]) is normkit.FrozenBatchNorm1d
    assert model[1].running_mean is stats and model[1].weight.dtype == torch.float64
    model.train()
    torch.testing.assert_close(model(x), expected)  # frozen: train mode changes nothing
    assert normkit.unfreeze_batch_norm(model) is model
    assert type(model[1]) is normkit.BatchNorm2d and isinstance(model[1].weight, nn.Parameter)
    model.eval()
    torch.testing.assert_close(model(x), expected)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        normkit.freeze_batch_norm(nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3, track_running_stats=False)))


# ---- RMSNorm precision options -----------------------------------------------------------------


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float32], ids=["bf16_weight", "fp32_weight"])
@pytest.mark.parametrize("backend", BACKENDS)
@skip_if_declined
def test_rms_norm_normalize_first_is_llamas_formula_bit_for_bit(backend: str, param_dtype: torch.dtype) -> None:
    x = make_input((3, 16), torch.bfloat16, seed_of("llama", backend), requires_grad=False)
    norm = normkit.RMSNorm(16, 1e-6, cast="normalize_first", dtype=param_dtype, backend=backend)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    xf = x.float()
    llama = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
    y = norm(x)
    assert y.dtype == llama.dtype
    assert torch.equal(y, llama)


def test_rms_norm_weight_offset_starts_at_unit_scale_and_uses_offset() -> None:
    norm = normkit.RMSNorm(8, 1e-6, weight_offset=1.0)
    assert torch.equal(norm.weight.detach(), torch.zeros(8))
    x = torch.randn(4, 8)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (8,), None, 1e-6))
    with torch.no_grad():
        norm.weight.normal_()
    torch.testing.assert_close(norm(x), F.rms_norm(x, (8,), 1.0 + norm.weight, 1e-6))
    assert list(norm.state_dict()) == ["weight"]
    with pytest.raises(ValueError, match="cast must be one of"):
        normkit.RMSNorm(8, cast="fp32")


# ---- GroupNorm(group_size=) ---------------------------------------------------------------------


def test_group_norm_by_group_size_is_group_norm_by_count() -> None:
    by_size = normkit.GroupNorm(num_channels=12, group_size=4)
    assert by_size.num_groups == 3 and repr(by_size) == repr(nn.GroupNorm(3, 12))
    x = torch.randn(2, 12, 5)
    torch.testing.assert_close(by_size(x), F.group_norm(x, 3, by_size.weight, by_size.bias))
    with pytest.raises(ValueError, match="exactly one of num_groups and group_size"):
        normkit.GroupNorm(3, 12, group_size=4)
    with pytest.raises(ValueError, match="positive divisor of num_channels=12"):
        normkit.GroupNorm(num_channels=12, group_size=5)
    # a missing argument is torch's TypeError, word for word (group_size stands for num_groups)
    for kwargs in ({"num_channels": 12}, {"group_size": 4}, {"num_groups": 3}):
        with pytest.raises(TypeError) as expected:
            nn.GroupNorm(**{("num_groups" if k == "group_size" else k): v for k, v in kwargs.items()})
        with pytest.raises(TypeError) as actual:
            normkit.GroupNorm(**kwargs)
        assert str(actual.value) == str(expected.value), kwargs


# ---- memory format ---------------------------------------------------------------------------

# Every module that takes an (N, C, *spatial) input, with constructor arguments for C = 6.
_SPATIAL_MODULES: dict[str, tuple] = {
    "BatchNorm2d": (6,), "InstanceNorm2d": (6,), "GroupNorm": (3, 6), "LayerNorm": (5,), "RMSNorm": (5,),
    "LocalResponseNorm": (3,), "LayerNorm2d": (6,), "RMSNorm2d": (6,), "BatchNormAct2d": (6,),
    "GroupNormAct": (3, 6), "FrozenBatchNorm2d": (6,), "GhostBatchNorm2d": (6, 1), "BatchRenorm2d": (6,),
    "SyncBatchNorm": (6,), "BatchNorm3d": (6,), "InstanceNorm3d": (6,), "FrozenBatchNorm3d": (6,),
}


@pytest.mark.parametrize("name", list(_SPATIAL_MODULES))
@pytest.mark.parametrize("backend", BACKENDS)
@skip_if_declined
def test_output_keeps_the_channels_last_layout(backend: str, name: str) -> None:
    """ATen returns contiguous output for channels_last input to some norms (instance_norm,
    layer_norm); normkit keeps the input's memory format on every backend."""
    three_d = name.endswith("3d") and name != "BatchRenorm2d"
    fmt = torch.channels_last_3d if three_d else torch.channels_last
    shape = (2, 6, 3, 4, 5) if three_d else (2, 6, 4, 5)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed_of("layout", name))).to(memory_format=fmt)
    module = getattr(normkit, name)(*_SPATIAL_MODULES[name], backend=backend)
    twin = copy.deepcopy(module)  # the same state for the contiguous call
    y = module(x)
    assert y.is_contiguous(memory_format=fmt), f"{name} on {backend}: output strides {y.stride()}"
    torch.testing.assert_close(y, twin(x.contiguous()))
