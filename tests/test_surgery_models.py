"""convert on norm layers nobody here wrote: HF transformers' per-model RMSNorm copies and
ConvNeXtV2's LayerNorm (tiny models built offline from configs, float32 and bfloat16), and
layers shaped as timm's and torchvision's (written from their documented forwards, so these run
without timm; tests/test_surgery_timm.py runs timm itself when it is installed)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import normkit
from cases import make_input, seed_of
from kernel_bound import assert_within_bound

# ---- HF transformers ------------------------------------------------------------------------

_SMALL = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 24,
          "vocab_size": 50, "num_key_value_heads": 1, "max_position_embeddings": 16}
# name -> (config class, model class, extra config, the RMSNorm options its norm must become)
_DECODERS = {
    "llama": ("LlamaConfig", "LlamaModel", {}, {"cast": "normalize_first", "weight_offset": 0.0}),
    "mistral": ("MistralConfig", "MistralModel", {}, {"cast": "normalize_first", "weight_offset": 0.0}),
    "qwen2": ("Qwen2Config", "Qwen2Model", {}, {"cast": "normalize_first", "weight_offset": 0.0}),
    "qwen3": ("Qwen3Config", "Qwen3Model", {"head_dim": 8}, {"cast": "normalize_first", "weight_offset": 0.0}),
    # Gemma: x_hat * (1 + weight) in float32, rounded once; the weight starts at 0.
    "gemma": ("GemmaConfig", "GemmaModel", {"head_dim": 8}, {"cast": "weight_first", "weight_offset": 1.0}),
    "gemma3": ("Gemma3TextConfig", "Gemma3TextModel", {"head_dim": 8}, {"cast": "weight_first", "weight_offset": 1.0}),
}


def _randomize_norms_(model: nn.Module, seed: int) -> nn.Module:
    """Random norm weights (HF initializes them to 1, Gemma's to 0: both hide a wrong formula)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (0.0 if p.abs().max() == 0 else 1.0))
    return model


def _outputs_and_grads(model: nn.Module, inputs: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
    dtype = next(model.parameters()).dtype
    y = model(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}).last_hidden_state
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y.dtype)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
    grads = torch.autograd.grad(y, params, dy, allow_unused=True)
    return {"y": y.detach(), **{n: g for n, g in zip(names, grads, strict=True) if g is not None}}


def _check_converted(build: Callable[[], nn.Module], inputs: dict[str, Tensor], dtype: torch.dtype,
                     seed: int) -> tuple[nn.Module, dict[str, Tensor], dict[str, Tensor]]:
    """Convert (strict) a copy of the model in ``dtype``: its output equals the original's
    exactly and its gradients are as close to float64 truth as the original's (2x bound)."""
    torch.manual_seed(seed)
    model = _randomize_norms_(build().eval(), seed)
    oracle = copy.deepcopy(model).double()
    original = model.to(dtype)
    converted = normkit.convert(copy.deepcopy(original), strict=True, report=(report := normkit.ConvertReport()))
    assert report.converted and not report.left
    want = _outputs_and_grads(oracle, inputs, seed)
    low = _outputs_and_grads(original, inputs, seed)
    got = _outputs_and_grads(converted, inputs, seed)
    torch.testing.assert_close(got["y"], low["y"], rtol=0, atol=0)  # the same roundings as the original
    if dtype == torch.float32:
        for name in low:
            torch.testing.assert_close(got[name], low[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    else:
        assert_within_bound(got, {k: v.to(torch.float64) for k, v in want.items()}, low)
    return converted, got, low


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(_DECODERS))
def test_hf_rms_norm_copies_convert_exactly(name: str, dtype: torch.dtype) -> None:
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls, extra, options = _DECODERS[name]
    build = lambda: getattr(transformers, model_cls)(getattr(transformers, config_cls)(**_SMALL, **extra))
    ids = {"input_ids": torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))}
    converted, _, _ = _check_converted(build, ids, dtype, seed_of("hf", name))
    norms = [m for m in converted.modules() if isinstance(m, nn.RMSNorm)]
    assert norms and all(type(m) is normkit.RMSNorm for m in norms)
    assert {(m.cast, m.weight_offset) for m in norms} == {(options["cast"], options["weight_offset"])}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_hf_convnextv2_layer_norms_convert_exactly(dtype: torch.dtype) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.ConvNextV2Config(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
    pixels = {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    converted, _, _ = _check_converted(lambda: transformers.ConvNextV2Model(config), pixels, dtype,
                                       seed_of("convnextv2"))
    kinds = {type(m) for m in converted.modules() if isinstance(m, nn.LayerNorm)}
    assert kinds == {normkit.LayerNorm, normkit.LayerNorm2d}  # data_format channels_last and channels_first


# ---- timm- and torchvision-shaped layers ------------------------------------------------------
# Each follows the forward its library documents; none is copied from it.


class TimmLayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: LayerNorm over the channels of (N, C, H, W), by permuting around it."""

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class TimmLayerNorm(nn.LayerNorm):
    """timm's LayerNorm: nn.LayerNorm with eps=1e-6 (and an optional fast path)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class TimmGroupNormAct(nn.GroupNorm):
    """timm's GroupNormAct: group norm, then ``drop``, then ``act``; (num_channels, num_groups)."""

    def __init__(self, num_channels: int, num_groups: int, act: nn.Module) -> None:
        super().__init__(num_groups, num_channels)
        self.drop, self.act = nn.Identity(), act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)))


class TimmBatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: batch norm (training statistics as BatchNorm2d's), then ``drop``,
    then ``act``."""

    def __init__(self, num_features: int, act: nn.Module) -> None:
        super().__init__(num_features)
        self.drop, self.act = nn.Identity(), act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


class TorchvisionFrozenBatchNorm2d(nn.Module):
    """torchvision's FrozenBatchNorm2d: fixed statistics and affine, all four buffers."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        for name, init in (("weight", torch.ones), ("bias", torch.zeros), ("running_mean", torch.zeros),
                           ("running_var", torch.ones)):
            self.register_buffer(name, init(num_features))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


# (layer, the normkit class it must become, its options, input shape)
TIMM_SHAPED = [
    (lambda: TimmLayerNorm2d(6, eps=1e-6), normkit.LayerNorm2d, {}, (2, 6, 4, 3)),
    (lambda: TimmLayerNorm(6), normkit.LayerNorm, {}, (2, 5, 6)),
    (lambda: TimmGroupNormAct(6, 3, nn.SiLU()), normkit.GroupNormAct, {"act": "silu"}, (2, 6, 5)),
    (lambda: TimmGroupNormAct(6, 2, nn.GELU()), normkit.GroupNormAct, {"act": "gelu"}, (2, 6, 5)),
    (lambda: TimmBatchNormAct2d(6, nn.ReLU(inplace=True)), normkit.BatchNormAct2d, {"act": "relu"}, (3, 6, 4, 3)),
    (lambda: TimmBatchNormAct2d(6, nn.Identity()), normkit.BatchNorm2d, {}, (3, 6, 4, 3)),  # no activation
    (lambda: TorchvisionFrozenBatchNorm2d(6), normkit.FrozenBatchNorm2d, {}, (3, 6, 4, 3)),
]


def _random_state_(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in (*module.named_parameters(), *module.named_buffers()):
            if t.is_floating_point():
                fresh = torch.rand(t.shape, generator=gen) + 0.5 if name.endswith("running_var") else \
                    torch.randn(t.shape, generator=gen)
                t.copy_(fresh)
    return module


@pytest.mark.parametrize("case", TIMM_SHAPED, ids=lambda c: c[0]().__class__.__name__ + str(c[2].get("act", "")))
def test_timm_and_torchvision_shaped_layers_convert_by_structure(case: tuple) -> None:
    make, expected, options, shape = case
    seed = seed_of("timm-shaped", expected.__name__, str(options))
    original = _random_state_(make(), seed)
    model = nn.Sequential(copy.deepcopy(original))
    normkit.convert(model, strict=True)
    assert type(model[0]) is expected
    assert all(getattr(model[0], k) == v for k, v in options.items())
    for training in (True, False):
        runs = []
        for m in (original.train(training), model[0].train(training)):
            x = make_input(shape, torch.float32, seed)
            y = m(x)
            dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
            params = [p for p in m.parameters() if p.requires_grad]
            runs.append((y, torch.autograd.grad(y, [x, *params], dy), {n: b.clone() for n, b in m.named_buffers()}))
        (ya, ga, ba), (yb, gb, bb) = runs
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-6)
        for u, v in zip(ga, gb, strict=True):
            torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-6)
        for name in ba:  # normkit's frozen norm adds num_batches_tracked, never incremented
            torch.testing.assert_close(bb[name], ba[name], rtol=1e-5, atol=1e-6)


def test_convert_replaces_an_adapted_module_at_the_root() -> None:
    original = _random_state_(TimmLayerNorm2d(6), 5)
    converted = normkit.convert(copy.deepcopy(original), strict=True)
    assert type(converted) is normkit.LayerNorm2d
    x = make_input((2, 6, 3, 2), torch.float32, 5)
    torch.testing.assert_close(converted(x), original(x))
