"""BatchNorm folding and recalibration (normkit.folding): fuse_conv_bn keeps outputs, keeps what
follows the normalization, folds only what the forward chains, and recalibrate_batch_norm is the
average over all batches."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import normkit
from cases import randomize_, seed_of
from test_surgery import _random_norm_params_, _tiny_models


def _conv_bn_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Sequential(nn.Conv2d(6, 6, 3, groups=3), nn.BatchNorm2d(6)),
        nn.Flatten(), nn.Linear(6 * 16, 5), nn.BatchNorm1d(5),
    )
    _random_norm_params_(model, seed)
    return model.double()


def test_fuse_conv_bn_folds_and_keeps_outputs() -> None:
    model = _conv_bn_model(seed_of("fuse")).eval()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    expected = model(x)
    weight = model[0].weight
    assert normkit.fuse_conv_bn(model, example_inputs=(x,)) is model
    assert [type(m) for m in model][:4] == [nn.Conv2d, nn.Identity, nn.ReLU, nn.Sequential]
    assert type(model[3][1]) is nn.Identity and type(model[6]) is nn.Identity
    assert model[0].weight is weight and model[0].bias is not None
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)


def test_fuse_conv_bn_in_training_mode_raises_and_changes_nothing() -> None:
    model = _conv_bn_model(seed_of("fuse-train")).eval()
    model[3][1].train()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match=r"training mode.*model.eval\(\)"):
        normkit.fuse_conv_bn(model)
    assert type(model[1]) is nn.BatchNorm2d
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_recalibrate_batch_norm_is_the_average_over_all_batches() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout(0.5), normkit.BatchNorm2d(4, momentum=0.3)).double()
    model.eval()
    gen = torch.Generator().manual_seed(seed_of("recalibrate"))
    batches = [torch.randn(5, 3, 4, 4, generator=gen, dtype=torch.float64) * 2 + 1 for _ in range(3)]
    with torch.no_grad():
        feats = [model[0](b) for b in batches]
    n = feats[0].numel() // 4
    means = torch.stack([f.mean((0, 2, 3)) for f in feats])
    variances = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats])
    assert normkit.recalibrate_batch_norm(model, iter(batches)) is model
    bn = model[2]
    torch.testing.assert_close(bn.running_mean, means.mean(0))  # momentum=None: equal weights
    torch.testing.assert_close(bn.running_var, variances.mean(0))
    assert bn.num_batches_tracked.item() == 3 and n > 1
    assert bn.momentum == 0.3 and not any(m.training for m in model.modules())
    with pytest.raises(ValueError, match="at least one batch"):
        normkit.recalibrate_batch_norm(model, [])
    torch.testing.assert_close(bn.running_mean, means.mean(0))


# ---- fuse_conv_bn keeps what follows the normalization ------------------------------------------


class _TimmStyleBatchNormAct2d(nn.BatchNorm2d):
    """Written from timm's documented BatchNormAct2d: a BatchNorm2d whose forward applies the
    batch norm, then its ``drop`` module, then its ``act`` module."""

    def __init__(self, num_features: int, act: nn.Module, drop: nn.Module | None = None) -> None:
        super().__init__(num_features)
        self.drop = drop or nn.Identity()
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


class _ScaledBatchNorm2d(nn.BatchNorm2d):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * 0.5


@pytest.mark.parametrize("make, after", [
    (lambda: normkit.BatchNormAct2d(6, act="silu"), nn.SiLU),
    (lambda: normkit.BatchNormAct2d(6, act="gelu"), nn.GELU),
    (lambda: normkit.BatchNormAct2d(6, act=None), nn.Identity),
    (lambda: _TimmStyleBatchNormAct2d(6, nn.ReLU6()), nn.ReLU6),
    (lambda: _TimmStyleBatchNormAct2d(6, nn.Hardswish(), nn.Dropout(0.2)), nn.Sequential),
    (lambda: normkit.GhostBatchNorm2d(6, 2), nn.Identity),
    (lambda: normkit.BatchRenorm2d(6), nn.Identity),
], ids=["normkit-silu", "normkit-gelu", "normkit-none", "timm-relu6", "timm-drop-hardswish", "ghost", "renorm"])
def test_fuse_conv_bn_keeps_the_activation_of_norm_act_layers(make: Callable[[], nn.Module], after: type) -> None:
    torch.manual_seed(seed_of("fuse-act"))
    model = randomize_(nn.Sequential(nn.Conv2d(3, 6, 3), make()), seed_of("fuse-act", after.__name__)).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64) * 3
    expected = model(x)
    normkit.fuse_conv_bn(model)
    assert type(model[1]) is after
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)


def test_fuse_conv_bn_refuses_a_batch_norm_subclass_with_another_forward() -> None:
    model = randomize_(nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Conv2d(6, 6, 1),
                                     _ScaledBatchNorm2d(6)), 2).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match=r"cannot fold 3 \(_ScaledBatchNorm2d\): its forward is not BatchNorm"):
        normkit.fuse_conv_bn(model)
    assert [type(m) for m in model] == [nn.Conv2d, nn.BatchNorm2d, nn.Conv2d, _ScaledBatchNorm2d]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---- fuse_conv_bn folds only what the forward feeds to the BatchNorm alone ----------------------


class _ConvOutputUsedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x)) + self.conv(x)


class _OperationInBetween(_ConvOutputUsedTwice):
    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x) + 1)


class _Untraceable(_ConvOutputUsedTwice):
    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x)) if x.sum() > -1e9 else x


class _ConvBnAct(_ConvOutputUsedTwice):  # HF ResNet's and timm's blocks: not a Sequential, one chain
    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("cls, why", [
    (_ConvOutputUsedTwice, "conv's output is used elsewhere too"),
    (_OperationInBetween, "its input is not conv's output alone"),
    (_Untraceable, "its parent's forward cannot be traced by torch.fx"),
])
def test_fuse_conv_bn_leaves_a_pair_the_forward_does_not_chain(cls: type, why: str) -> None:
    model = randomize_(cls(), seed_of("fuse-chain", cls.__name__)).double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    expected = model(x)
    with pytest.warns(UserWarning, match=rf"fuse_conv_bn left 1 BatchNorm\(s\) unfolded: bn: {why}"):
        normkit.fuse_conv_bn(model)
    assert type(model.bn) is nn.BatchNorm2d
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_fuse_conv_bn_folds_a_traced_chain_outside_a_sequential() -> None:
    model = randomize_(nn.Sequential(_ConvBnAct(), nn.Conv2d(4, 4, 1)), seed_of("fuse-traced")).double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    expected = model(x)
    normkit.fuse_conv_bn(model)
    assert type(model[0].bn) is nn.Identity
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("error:fuse_conv_bn left")  # every pair folded: its blocks trace
def test_fuse_conv_bn_folds_every_pair_of_hf_resnet() -> None:
    build, inputs, _ = _tiny_models()["resnet"]
    model = build().eval()
    _random_norm_params_(model, seed_of("fuse-resnet"))
    expected = model(**inputs()).last_hidden_state
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 6
    normkit.fuse_conv_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    y = model(**inputs()).last_hidden_state
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_fuse_conv_bn_folds_linear_batch_norm_only_where_example_inputs_confirm_it() -> None:
    model = randomize_(nn.Sequential(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6)), seed_of("fuse-linear")).eval()
    x = torch.randn(3, 6, 4)  # BatchNorm1d normalizes dim 1; the fold would scale the Linear's last dim
    expected = model(x)
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="1: a Linear \\+ BatchNorm1d pair is folded only when example_inputs"):
        normkit.fuse_conv_bn(model)
    assert type(model[1]) is nn.BatchNorm1d
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)

    with pytest.raises(RuntimeError, match=r"changed the model's output on example_inputs .*restored. Pairs folded: 1"):
        normkit.fuse_conv_bn(model, example_inputs=(x,))
    assert type(model[1]) is nn.BatchNorm1d and model[0].bias is None
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)

    flat = torch.randn(5, 4)
    expected = model(flat)
    normkit.fuse_conv_bn(model, example_inputs=flat)
    assert type(model[1]) is nn.Identity
    torch.testing.assert_close(model(flat), expected)
