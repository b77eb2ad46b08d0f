"""convert and fuse_conv_bn on real timm models and layers (skipped when timm is not installed).

timm imports torchvision at import time, for its FrozenBatchNorm2d and its data transforms.
Where no working torchvision exists (the only wheel for this torch may be a CUDA build that
fails to load on a CPU torch), a stand-in is placed in ``sys.modules`` while timm imports and
removed afterwards: nothing tested here uses torchvision, and a stand-in class raises if it is
ever instantiated.
"""

from __future__ import annotations

import copy
import enum
import importlib
import sys
import types

import pytest
import torch
from torch import nn

import normkit
from cases import seed_of


class _StandIn(types.ModuleType):
    """A module whose every missing attribute is a submodule or a class that refuses to be built."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        full = f"{self.__name__}.{name}"
        if name[:1].isupper():
            def refuse(*args, **kwargs):
                raise RuntimeError(f"{full} is a test stand-in: torchvision is not installed")
            value = type(name, (), {"__init__": refuse})
        else:
            value = _StandIn(full)
            sys.modules[full] = value
        setattr(self, name, value)
        return value


class _InterpolationMode(enum.Enum):  # timm builds a table of these at import time
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _import_timm():
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed", allow_module_level=True)
    try:
        import torchvision  # noqa: F401

        return importlib.import_module("timm")
    except Exception:  # noqa: BLE001 - absent, or a build that does not load with this torch
        pass
    saved = {k: v for k, v in sys.modules.items() if k == "torchvision" or k.startswith("torchvision.")}
    for name in saved:
        del sys.modules[name]
    root = _StandIn("torchvision")
    root.__version__ = "0.0.0"
    sys.modules["torchvision"] = root
    # The submodules timm imports by name (``from torchvision.ops.misc import ...``) must exist
    # in sys.modules: the import system does not ask a module's __getattr__ for them.
    for path in ("ops.misc", "transforms.functional", "datasets", "models.feature_extraction", "utils"):
        module = root
        for part in path.split("."):
            module = getattr(module, part)
    root.transforms.InterpolationMode = _InterpolationMode
    root.transforms.functional.InterpolationMode = _InterpolationMode
    try:
        return importlib.import_module("timm")
    finally:
        for name in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules.update(saved)


timm = _import_timm()


def _randomize_norms_(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in (*model.named_parameters(), *model.named_buffers()):
            if t.is_floating_point() and t.dim() == 1:
                fresh = torch.rand(t.shape, generator=gen) + 0.5 if name.endswith("running_var") else \
                    torch.randn(t.shape, generator=gen) * 0.5 + 0.3
                t.copy_(fresh)
    return model


def _model(name: str) -> nn.Module:
    torch.manual_seed(seed_of("timm", name))
    return _randomize_norms_(timm.create_model(name, pretrained=False, num_classes=5), seed_of("timm-norms", name))


@pytest.mark.filterwarnings("error:fuse_conv_bn left")  # every pair folded: its blocks trace
def test_fuse_conv_bn_keeps_efficientnet_activations() -> None:
    # The case: BatchNormAct2d folded as a plain BatchNorm dropped its SiLU (output moved by 36.7).
    model = _model("efficientnet_b0").eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = model(x)
    normkit.fuse_conv_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, nn.SiLU) for m in model.modules())
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name, kinds", [
    ("efficientnet_b0", {normkit.BatchNorm2d, normkit.BatchNormAct2d}),
    ("convnext_atto", {normkit.LayerNorm2d}),
])
def test_convert_timm_models(name: str, kinds: set[type], training: bool) -> None:
    model = _model(name).train(training)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    report = normkit.ConvertReport()
    converted = normkit.convert(model, strict=True, report=report)
    assert {type(m) for m in converted.modules() if type(m).__module__.startswith("normkit")} == kinds
    runs = []
    for m in (reference, converted):
        y = m(x)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
        params = [p for p in m.parameters() if p.requires_grad]
        runs.append((y, torch.autograd.grad(y, params, dy), [b.clone() for b in m.buffers()]))
    (ya, ga, ba), (yb, gb, bb) = runs
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    for u, v in zip((*ga, *ba), (*gb, *bb), strict=True):
        torch.testing.assert_close(v, u, rtol=1e-4, atol=1e-5)


LAYERS = [
    ("GroupNormAct", lambda L: L.GroupNormAct(16, 8), normkit.GroupNormAct, (2, 16, 5)),
    ("GroupNormAct-gelu", lambda L: L.GroupNormAct(16, 8, act_layer=nn.GELU), normkit.GroupNormAct, (2, 16, 5)),
    ("GroupNorm", lambda L: L.GroupNorm(16, 4), normkit.GroupNorm, (2, 16, 5)),
    ("GroupNorm1", lambda L: L.GroupNorm1(16), normkit.GroupNorm, (2, 16, 5)),
    ("LayerNorm", lambda L: L.LayerNorm(16), normkit.LayerNorm, (2, 3, 16)),
    ("LayerNorm2d", lambda L: L.LayerNorm2d(16), normkit.LayerNorm2d, (2, 16, 3, 2)),
    ("RmsNorm", lambda L: L.RmsNorm(16), normkit.RMSNorm, (2, 3, 16)),
    ("RmsNorm2d", lambda L: L.RmsNorm2d(16), normkit.RMSNorm2d, (2, 16, 3, 2)),
    ("BatchNormAct2d", lambda L: L.BatchNormAct2d(16), normkit.BatchNormAct2d, (3, 16, 3, 2)),
]


@pytest.mark.parametrize("name, make, expected, shape", LAYERS, ids=[c[0] for c in LAYERS])
def test_convert_timm_layers(name: str, make, expected: type, shape: tuple[int, ...]) -> None:
    original = _randomize_norms_(make(timm.layers), seed_of("timm-layer", name))
    model = nn.Sequential(copy.deepcopy(original))
    normkit.convert(model, strict=True)
    assert type(model[0]) is expected
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 2 + 0.5
    torch.testing.assert_close(model[0](x), original(x), rtol=1e-5, atol=1e-5)


def test_timm_layers_normkit_cannot_fuse_are_reported() -> None:
    model = nn.Sequential(timm.layers.BatchNormAct2d(8, act_layer=nn.Hardswish))
    report = normkit.ConvertReport()
    normkit.convert(model, report=report)
    assert type(model[0]) is timm.layers.BatchNormAct2d
    assert "Hardswish() has no fused normkit equivalent" in report.left[0].reason
