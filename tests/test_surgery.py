"""Model surgery: convert / to_torch on real model code (tiny HF transformers models built from
configs, offline), fuse_conv_bn and recalibrate_batch_norm against hand computations."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import normkit
from cases import seed_of


def _outputs_and_grads(model: nn.Module, make_inputs: Callable[[], dict], seed: int) -> dict[str, Tensor]:
    torch.manual_seed(seed)  # dropout masks, if any, are the same in both runs
    model.zero_grad(set_to_none=True)
    out = model(**make_inputs())
    y = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
    gen = torch.Generator().manual_seed(seed)
    y.backward(torch.randn(y.shape, generator=gen, dtype=y.dtype))
    result = {"y": y.detach()}
    result.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return result


def _assert_same(actual: dict[str, Tensor], expected: dict[str, Tensor], where: str) -> None:
    assert set(actual) == set(expected), where
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=2e-5, atol=2e-5, msg=lambda m, key=key: f"{where} {key}: {m}")


def _random_norm_params_(model: nn.Module, seed: int) -> None:
    """Random affine parameters and statistics everywhere (the default 1/0 init hides bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif t.is_floating_point() and (name.endswith(("weight", "bias", "running_mean")) and t.dim() == 1):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.5 + (1.0 if name.endswith("weight") else 0.0))


def _tiny_models() -> dict[str, tuple[Callable[[], nn.Module], Callable[[], dict], set[type]]]:
    transformers = pytest.importorskip("transformers")
    ids = lambda: {"input_ids": torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))}
    image = lambda: {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    small = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 24,
             "vocab_size": 50}
    return {
        "bert": (lambda: transformers.BertModel(transformers.BertConfig(**small, max_position_embeddings=16)),
                 ids, {normkit.LayerNorm}),
        "llama": (lambda: transformers.LlamaModel(transformers.LlamaConfig(**small, num_key_value_heads=1,
                                                                           max_position_embeddings=16)),
                  ids, {normkit.RMSNorm}),
        "convnext": (lambda: transformers.ConvNextModel(transformers.ConvNextConfig(
            num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)),
                     image, {normkit.LayerNorm2d, normkit.LayerNorm}),
        "resnet": (lambda: transformers.ResNetModel(transformers.ResNetConfig(
            num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")),
                   image, {normkit.BatchNorm2d}),
    }


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", ["bert", "llama", "convnext", "resnet"])
def test_convert_and_back_keep_outputs_and_gradients_of_real_models(name: str, training: bool) -> None:
    build, make_inputs, expected_types = _tiny_models()[name]
    torch.manual_seed(seed_of("model", name))
    model = build().train(training)
    _random_norm_params_(model, seed_of("params", name))
    twin = copy.deepcopy(model)
    seed = seed_of("surgery", name, training)
    expected = _outputs_and_grads(model, make_inputs, seed)
    params_before = dict(twin.named_parameters())

    converted = normkit.convert(twin, backend="reference")
    assert converted is twin
    found = {type(m) for m in twin.modules() if type(m).__module__.startswith("normkit")}
    assert found == expected_types, f"{name}: converted to {found}"
    for n, p in twin.named_parameters():
        assert p is params_before[n], f"{n} is not the same Parameter object after convert"
    assert all(m.training == training for m in twin.modules())
    _assert_same(_outputs_and_grads(twin, make_inputs, seed), expected, f"{name} converted")
    if training:  # running statistics moved the same way (BatchNorm in train mode)
        for (n, a), (_, b) in zip(twin.named_buffers(), model.named_buffers(), strict=True):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=lambda m, n=n: f"{name} buffer {n}: {m}")

    normkit.to_torch(twin)
    left = {type(m) for m in twin.modules() if type(m).__module__.startswith("normkit")}
    assert left <= {normkit.LayerNorm2d, normkit.RMSNorm}  # no torch class computes those forwards
    _assert_same(_outputs_and_grads(twin, make_inputs, seed), _outputs_and_grads(model, make_inputs, seed),
                 f"{name} back to torch")


def test_convert_swaps_exact_torch_classes_only_and_keeps_state() -> None:
    class MyNorm(nn.LayerNorm):  # a subclass may have its own forward: left alone
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x) * 2

    hook_calls = []
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), MyNorm(6), nn.GroupNorm(2, 6), nn.LayerNorm(6))
    model[1].register_forward_hook(lambda *a: hook_calls.append(1))
    model[4].weight.requires_grad_(False)
    model = model.double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    expected = model(x)
    normkit.convert(model, backend="torch")
    assert [type(m) for m in model] == [nn.Linear, normkit.BatchNorm1d, MyNorm, normkit.GroupNorm, normkit.LayerNorm]
    assert model[1].backend == "torch" and not model[4].weight.requires_grad and model[1].weight.dtype == torch.float64
    torch.testing.assert_close(model(x), expected)
    assert hook_calls == [1, 1]
    assert normkit.to_torch(model) is model and type(model[1]) is nn.BatchNorm1d and not hasattr(model[1], "backend")
    root = normkit.convert(nn.LayerNorm(3))
    assert type(root) is normkit.LayerNorm
    with pytest.raises(ValueError, match="unknown normkit backend"):
        normkit.convert(nn.Sequential(nn.LayerNorm(3)), backend="tritno")


def test_register_adapter_for_a_third_party_class() -> None:
    class ScaleNorm(nn.Module):  # someone's RMSNorm: x / rms(x) * g
        def __init__(self, n: int) -> None:
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.randn(n)), 1e-6

        def forward(self, x: Tensor) -> Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def adapt(m: ScaleNorm) -> nn.Module:
        new = normkit.RMSNorm(m.weight.shape, m.eps)
        new.weight = m.weight
        return new

    normkit.register_adapter(ScaleNorm, adapt)
    model = nn.Sequential(nn.Linear(5, 5), ScaleNorm(5))
    x = torch.randn(2, 5)
    expected = model(x)
    normkit.convert(model)
    assert type(model[1]) is normkit.RMSNorm
    torch.testing.assert_close(model(x), expected)


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
    assert normkit.fuse_conv_bn(model) is model
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
