"""Model surgery: convert / to_torch on real model code (tiny HF transformers models built from
configs, offline), the report, strict, and the probe (fuse_conv_bn and recalibrate_batch_norm:
tests/test_folding.py)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import normkit
from cases import make_input, randomize_, seed_of
from normkit import surgery


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
        torch.testing.assert_close(actual[key], expected[key], rtol=2e-5, atol=2e-5,
                                   msg=lambda m, key=key: f"{where} {key}: {m}")


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
    report = normkit.ConvertReport()
    normkit.convert(model, backend="torch", report=report)
    assert [x.name for x in report.left] == ["2"] and "differs" in report.left[0].reason  # MyNorm's * 2
    assert [type(m) for m in model] == [nn.Linear, normkit.BatchNorm1d, MyNorm, normkit.GroupNorm, normkit.LayerNorm]
    assert model[1].backend == "torch" and not model[4].weight.requires_grad and model[1].weight.dtype == torch.float64
    torch.testing.assert_close(model(x), expected)
    assert hook_calls == [1, 1]
    assert normkit.to_torch(model) is model and type(model[1]) is nn.BatchNorm1d and not hasattr(model[1], "backend")
    root = normkit.convert(nn.LayerNorm(3))
    assert type(root) is normkit.LayerNorm
    with pytest.raises(ValueError, match="unknown normkit backend"):
        normkit.convert(nn.Sequential(nn.LayerNorm(3)), backend="tritno")


def test_register_adapter_for_a_third_party_class(monkeypatch: pytest.MonkeyPatch) -> None:
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

    monkeypatch.setattr(surgery, "_ADAPTERS", [])  # registration is global: keep it to this test
    normkit.register_adapter(ScaleNorm, adapt)
    model = nn.Sequential(nn.Linear(5, 5), ScaleNorm(5))
    x = torch.randn(2, 5)
    expected = model(x)
    normkit.convert(model)
    assert type(model[1]) is normkit.RMSNorm
    torch.testing.assert_close(model(x), expected)


# ---- class swaps: every torch.nn norm class x every constructor option ------------------------

_BN = [{}, {"affine": False}, {"bias": False}, {"track_running_stats": False}, {"momentum": None},
       {"eps": 1e-3, "momentum": 0.3}, {"affine": False, "track_running_stats": False}]
_IN = [{}, {"affine": True}, {"affine": True, "bias": False}, {"track_running_stats": True},
       {"track_running_stats": True, "momentum": None}, {"eps": 1e-3, "momentum": 0.3, "affine": True}]
_LN = [{}, {"elementwise_affine": False}, {"bias": False}, {"eps": 1e-3}]
# (torch.nn class name, positional args, the option sets, input shape)
TORCH_NORMS = [
    ("BatchNorm1d", (5,), _BN, (4, 5, 3)),
    ("BatchNorm1d", (5,), [{}], (4, 5)),
    ("BatchNorm2d", (5,), _BN, (3, 5, 4, 3)),
    ("BatchNorm3d", (5,), _BN, (2, 5, 3, 2, 2)),
    ("SyncBatchNorm", (5,), _BN, (3, 5, 4, 3)),  # no process group: BatchNorm
    ("InstanceNorm1d", (5,), _IN, (3, 5, 7)),
    ("InstanceNorm1d", (5,), [{}], (5, 7)),  # no batch dim
    ("InstanceNorm2d", (5,), _IN, (3, 5, 4, 3)),
    ("InstanceNorm3d", (5,), _IN, (2, 5, 3, 2, 2)),
    ("LayerNorm", (6,), _LN, (3, 4, 6)),
    ("LayerNorm", ((3, 6),), _LN[:2], (2, 3, 6)),
    ("GroupNorm", (2, 6), [{}, {"affine": False}, {"bias": False}, {"eps": 1e-3}], (3, 6, 5)),
    ("RMSNorm", (6,), [{}, {"eps": 1e-3}, {"elementwise_affine": False}], (3, 4, 6)),
    ("RMSNorm", ((3, 6),), [{}], (2, 3, 6)),
    ("LocalResponseNorm", (3,), [{}, {"alpha": 1e-2, "beta": 0.5, "k": 2.0}], (2, 5, 4, 3)),
    ("LazyBatchNorm2d", (), [{}, {"momentum": None}, {"affine": False}], (3, 5, 4, 3)),
    ("LazyInstanceNorm1d", (), [{}, {"affine": False, "track_running_stats": False}], (3, 5, 7)),
]
TORCH_NORM_CASES = [(name, args, options, shape) for name, args, table, shape in TORCH_NORMS for options in table]


def _case_id(case: tuple) -> str:
    name, args, options, shape = case
    return f"{name}{list(args)}-{','.join(f'{k}={v}' for k, v in options.items()) or 'defaults'}-{list(shape)}"


def _assert_same_function(a: nn.Module, b: nn.Module, shape: tuple[int, ...], seed: int, where: str) -> None:
    """``b`` computes what ``a`` computes in train and eval mode: output, input and parameter
    gradients for a random upstream gradient, and the buffers the call leaves."""
    for training in (True, False):
        a.train(training)
        b.train(training)
        runs = []
        for m in (a, b):
            x = make_input(shape, torch.float32, seed)
            y = m(x)
            dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1))
            params = [p for p in m.parameters() if p.requires_grad]
            grads = torch.autograd.grad(y, [x, *params], dy)
            runs.append((y, grads, [t.clone() for t in m.buffers()]))
        (ya, ga, ba), (yb, gb, bb) = runs
        mode = "train" if training else "eval"
        torch.testing.assert_close(yb, ya, msg=lambda m: f"{where} {mode} output: {m}")
        assert len(ga) == len(gb) and len(ba) == len(bb), where
        for i, (u, v) in enumerate(zip(ga, gb, strict=True)):
            torch.testing.assert_close(v, u, msg=lambda m, i=i: f"{where} {mode} gradient {i}: {m}")
        for i, (u, v) in enumerate(zip(ba, bb, strict=True)):
            torch.testing.assert_close(v, u, msg=lambda m, i=i: f"{where} {mode} buffer {i}: {m}")


@pytest.mark.parametrize("case", TORCH_NORM_CASES, ids=_case_id)
def test_convert_and_to_torch_every_torch_norm_class_and_option(case: tuple) -> None:
    name, args, options, shape = case
    torch_cls, twin = getattr(nn, name), getattr(normkit, name)
    seed = seed_of("swap", _case_id(case))
    original = torch_cls(*args, **options)
    if name.startswith("Lazy"):  # uninitialized: nothing to randomize, and no deepcopy
        model = nn.Sequential(torch_cls(*args, **options))
    else:
        model = nn.Sequential(copy.deepcopy(randomize_(original, seed)))
    report = normkit.ConvertReport()
    assert normkit.convert(model, strict=True, report=report) is model
    converted = model[0]
    assert type(converted) is twin and [c.after for c in report.converted] == [name] and not report.left
    # Every attribute normkit's __init__ sets is there, with __init__'s default: the swapped
    # module is indistinguishable from one built as normkit's (once 'cast' was missing).
    fresh = twin(*args, **options)
    assert set(vars(converted)) == set(vars(fresh))
    for key in twin.init_attributes():
        assert getattr(converted, key) == getattr(fresh, key), key
    _assert_same_function(original, converted, shape, seed, f"{name} converted")
    assert type(converted) is getattr(normkit, name.removeprefix("Lazy"))  # a Lazy twin materializes as normkit's
    normkit.to_torch(model)
    assert type(model[0]) is type(original) and not set(twin.init_attributes()) & set(vars(model[0]))
    _assert_same_function(original, model[0], shape, seed, f"{name} back to torch")


def _torch_base_args(cls: type) -> tuple[tuple, dict]:
    base = cls.torch_base()
    if issubclass(base, nn.GroupNorm):
        return (2, 4), {}
    if issubclass(base, nn.LocalResponseNorm):
        return (2,), {}
    if issubclass(base, nn.modules.lazy.LazyModuleMixin):
        return (), {}
    return (4,), {}


_NORMKIT_CLASSES = sorted(
    (c for c in vars(normkit).values()
     if isinstance(c, type) and issubclass(c, normkit.modules._base.BackendMixin) and c.torch_base() is not nn.Module),
    key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", _NORMKIT_CLASSES, ids=lambda c: c.__name__)
def test_adopt_sets_what_init_sets_for_every_normkit_class(cls: type) -> None:
    args, _ = _torch_base_args(cls)
    required = {"virtual_batch_size": 2} if "Ghost" in cls.__name__ else {}
    built = cls(*args, **required)
    swapped = cls.adopt(cls.torch_base()(*args), **required)
    assert type(swapped) is cls
    assert set(vars(swapped)) == set(vars(built))
    for key, value in vars(built).items():
        if not key.startswith("_") and not isinstance(value, torch.Tensor):
            assert vars(swapped)[key] == value, key
    with pytest.raises(TypeError, match="unknown attributes"):
        cls.adopt(cls.torch_base()(*args), colour="red", **required)
    with pytest.raises(ValueError, match="unknown normkit backend"):
        cls.adopt(cls.torch_base()(*args), backend="tritno", **required)


def test_adopt_needs_the_attributes_init_requires() -> None:
    bn = nn.BatchNorm2d(4)
    with pytest.raises(TypeError, match=r"needs \['virtual_batch_size'\]"):
        normkit.GhostBatchNorm2d.adopt(bn)
    assert type(bn) is nn.BatchNorm2d and "backend" not in vars(bn)
    with pytest.raises(TypeError, match="takes a LayerNorm"):
        normkit.LayerNorm.adopt(nn.RMSNorm(4))


# ---- the report, strict, and the probe --------------------------------------------------------


class _TwiceLayerNorm(nn.LayerNorm):
    """A LayerNorm subclass whose forward is not LayerNorm's."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * 2


class _ScaleNorm(nn.Module):
    """x / ||x|| * g (Nguyen & Salazar, 2019): norm-like by name and structure, no normkit twin."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.randn(n)), 1e-5

    def forward(self, x: Tensor) -> Tensor:
        return x / x.norm(dim=-1, keepdim=True).clamp_min(self.eps) * self.weight


def _mixed_model() -> nn.Sequential:
    torch.manual_seed(seed_of("mixed"))
    return randomize_(nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), _TwiceLayerNorm(6), _ScaleNorm(6),
                                    nn.Sequential(nn.RMSNorm(6))), seed_of("mixed"))


def test_convert_reports_what_it_converted_and_what_it_left() -> None:
    model = _mixed_model()
    x = torch.randn(3, 6)
    expected = model(x)
    report = normkit.ConvertReport()
    normkit.convert(model, report=report)
    assert [(c.name, c.before, c.after) for c in report.converted] == [("1", "LayerNorm", "LayerNorm"),
                                                                        ("4.0", "RMSNorm", "RMSNorm")]
    assert all(c.check.startswith("probe agrees") for c in report.converted)
    assert [(x.name, x.kind) for x in report.left] == [("2", "_TwiceLayerNorm"), ("3", "_ScaleNorm")]
    assert "output differs" in report.left[0].reason and "no normkit module agrees" in report.left[1].reason
    assert "left 2 norm-like" in str(report) and "4.0: RMSNorm -> RMSNorm" in str(report)
    assert type(model[2]) is _TwiceLayerNorm and type(model[3]) is _ScaleNorm
    torch.testing.assert_close(model(x), expected)


def test_convert_without_a_report_warns_about_leftovers() -> None:
    with pytest.warns(UserWarning, match=r"left 2 norm-like module\(s\) unconverted: 2 \(_TwiceLayerNorm\), 3"):
        normkit.convert(_mixed_model())


def test_convert_strict_raises_and_changes_nothing() -> None:
    model = _mixed_model()
    before = [type(m) for m in model.modules()]
    with pytest.raises(RuntimeError, match=r"strict=True.*2 norm-like.*unchanged(.|\n)*_ScaleNorm"):
        normkit.convert(model, strict=True)
    assert [type(m) for m in model.modules()] == before
    assert "backend" not in vars(model[1])


def test_a_wrong_adapter_is_refused_by_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    def forgets_the_bias(m: nn.LayerNorm) -> nn.Module:
        new = normkit.LayerNorm(m.normalized_shape, m.eps, bias=False)
        new.weight = m.weight
        return new

    monkeypatch.setattr(surgery, "_ADAPTERS", [])
    normkit.register_adapter(_TwiceLayerNorm, forgets_the_bias)
    model = randomize_(nn.Sequential(_TwiceLayerNorm(6)), 0)
    report = normkit.ConvertReport()
    normkit.convert(model, report=report)
    assert type(model[0]) is _TwiceLayerNorm
    assert "forgets_the_bias: on probe input [3, 6] of ordinary values: output differs" in report.left[0].reason


def test_a_failing_twin_is_left_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulate a wrong twin: convert must keep torch's module and say why.
    monkeypatch.setitem(surgery.TWINS, nn.GroupNorm, normkit.GroupNormAct)
    model = randomize_(nn.Sequential(nn.GroupNorm(2, 6)), 0)
    report = normkit.ConvertReport()
    normkit.convert(model, report=report)
    assert type(model[0]) is nn.GroupNorm
    assert "twin fails the probe: on probe input [3, 6] of ordinary values: output differs" in report.left[0].reason
    assert "act" not in vars(model[0])


def test_the_probe_changes_no_state() -> None:
    model = randomize_(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=None), nn.Dropout(0.5),
                                     _TwiceLayerNorm(5)), 1).train()
    calls = []
    model[1].register_forward_hook(lambda *a: calls.append("hook"))
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    normkit.convert(model, report=normkit.ConvertReport())
    assert type(model[1]) is normkit.BatchNorm2d and calls == []
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_convert_on_the_meta_device_says_it_did_not_probe() -> None:
    class HalfRMSNorm(nn.Module):  # Gemma's: weight initialized to 0, scale 1 + weight
        def __init__(self, n: int) -> None:
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.zeros(n)), 1e-6

        def forward(self, x: Tensor) -> Tensor:
            y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
            return (y * (1.0 + self.weight.float())).type_as(x)

    with torch.device("meta"):
        model = nn.Sequential(nn.BatchNorm2d(4), HalfRMSNorm(8))
    report = normkit.ConvertReport()
    normkit.convert(model, strict=True, report=report)
    assert type(model[0]) is normkit.BatchNorm2d and model[0].weight.is_meta
    assert type(model[1]) is normkit.RMSNorm and model[1].weight_offset == 1.0 and model[1].cast == "weight_first"
    assert [c.check for c in report.converted] == [
        "not probed: on the meta device", "probed on a random copy on the CPU (the model is on the meta device)"]


# ---- RMSNorm weight_offset: Gemma's 1 + weight in float32 ---------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_rms_norm_weight_offset_adds_in_float32_as_gemma(dtype: torch.dtype, backend: str) -> None:
    gen = torch.Generator().manual_seed(seed_of("gemma-offset", str(dtype)))
    weight = (torch.randn(64, generator=gen) * 0.02).to(dtype)  # small: 1 + w in bf16 would round it away
    x = (torch.randn(3, 5, 64, generator=gen) * 3 + 1).to(dtype)
    norm = normkit.RMSNorm(64, 1e-6, weight_offset=1.0, dtype=dtype, backend=backend)
    with torch.no_grad():
        norm.weight.copy_(weight)
    # Gemma: x_hat in float32, times (1 + weight.float()), rounded once to the input dtype.
    xf = x.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + weight.float())).to(dtype)
    assert torch.equal(norm(x), expected)


def test_odd_norm_like_modules_are_left_with_a_reason_not_an_error() -> None:
    class IntShapeNorm(nn.Module):  # normalized_shape as a bare int
        def __init__(self) -> None:
            super().__init__()
            self.normalized_shape, self.eps = 4, 1e-5

        def forward(self, x: Tensor) -> Tensor:
            return x

    class LockedNorm(nn.LayerNorm):  # holds state deepcopy refuses
        def __init__(self) -> None:
            super().__init__(4)
            self.lock = __import__("threading").Lock()

    report = normkit.ConvertReport()
    model = nn.Sequential(IntShapeNorm(), LockedNorm())
    normkit.convert(model, report=report)
    assert [type(m) for m in model] == [IntShapeNorm, LockedNorm]
    assert "reading its attributes failed" in report.left[0].reason
    assert "cannot be copied to probe" in report.left[1].reason


# ---- the probe is adversarial: outliers, offsets, tiny values, every input rank -----------------


class _ClampedRMSNorm(nn.Module):
    """LLaMA's RMSNorm with a clamp after it: ordinary inputs never reach the clamp."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.variance_epsilon = 1e-6

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        y = self.weight * (x.float() * torch.rsqrt(variance + self.variance_epsilon)).to(x.dtype)
        return y.clamp(-2.6, 2.6)


class _RankDependentLayerNorm(nn.Module):
    """A LayerNorm over dim 1 of a 4-D input and over the last dim of any other."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = 1e-6

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            mean = x.mean(1, keepdim=True)
            x = (x - mean) / torch.sqrt((x - mean).pow(2).mean(1, keepdim=True) + self.eps)
            return self.weight[:, None, None] * x + self.bias[:, None, None]
        return nn.functional.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


def test_a_norm_that_clamps_its_outliers_is_left() -> None:
    model = nn.Sequential(_ClampedRMSNorm(8))
    x = torch.randn(2, 8)
    x[0, 0] = 50.0
    expected = model(x)
    report = normkit.ConvertReport()
    normkit.convert(model, report=report)
    assert type(model[0]) is _ClampedRMSNorm and "with outliers: output differs" in report.left[0].reason
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_a_replacement_must_take_every_input_rank_the_original_takes() -> None:
    model = nn.Sequential(_RankDependentLayerNorm(8))
    report = normkit.ConvertReport()
    normkit.convert(model, report=report)
    assert type(model[0]) is _RankDependentLayerNorm
    assert "LayerNorm: on probe input [3, 8, 4, 3] of ordinary values: the replacement fails" in report.left[0].reason
    assert model(torch.randn(2, 8, 3, 3)).shape == (2, 8, 3, 3)


@pytest.mark.parametrize("label", ["with outliers", "offset by 64", "of magnitude 1e-3"])
def test_each_kind_of_probe_input_catches_a_norm_ordinary_inputs_miss(label: str) -> None:
    class Odd(nn.Module):  # an RMSNorm that departs from RMSNorm only on one kind of input
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))
            self.eps = 1e-6

        def forward(self, x: Tensor) -> Tensor:
            rms = x.pow(2).mean(-1, keepdim=True).add(self.eps).rsqrt()
            y = self.weight * x * rms
            if label == "with outliers":
                return y.clamp(-2.6, 2.6)
            if label == "offset by 64":
                return torch.where(x.mean(-1, keepdim=True) > 30, 0.5 * y, y)  # a large mean
            return y * (x.abs().amax(-1, keepdim=True) > 1e-2)  # gives 0 below a threshold

    report = normkit.ConvertReport()
    normkit.convert(nn.Sequential(Odd()), report=report)
    assert f"{label}: output differs" in report.left[0].reason


def test_a_norm_that_takes_the_absolute_weight_is_left() -> None:
    class AbsWeightRMSNorm(nn.Module):  # agrees with RMSNorm wherever the weight is positive
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(2))  # two values: random ones may both be positive
            self.eps = 1e-6

        def forward(self, x: Tensor) -> Tensor:
            return self.weight.abs() * x * x.pow(2).mean(-1, keepdim=True).add(self.eps).rsqrt()

    report = normkit.ConvertReport()
    normkit.convert(nn.Sequential(AbsWeightRMSNorm()), report=report)
    assert report.converted == [] and "output differs" in report.left[0].reason


class _HFStyleRMSNorm(nn.Module):
    """A model's own RMSNorm copy (HF LLaMA's forward): converted by structure."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.3 + 1)
        self.variance_epsilon = 1e-6

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


def test_a_norm_held_twice_by_one_parent_is_replaced_in_both_slots() -> None:
    shared = _HFStyleRMSNorm(8)
    model = nn.Sequential(shared, nn.Linear(8, 8), shared, nn.LayerNorm(8), nn.Linear(8, 8))
    model[4] = model[3]  # a torch.nn twin held twice too
    x = make_input((3, 8), torch.float32, seed=seed_of("held twice"))
    before = model(x)
    converted = normkit.convert(model)
    assert type(converted[0]) is normkit.RMSNorm and converted[2] is converted[0]
    assert type(converted[3]) is normkit.LayerNorm and converted[4] is converted[3]
    torch.testing.assert_close(converted(x), before, rtol=0, atol=0)


def test_a_replaced_norm_keeps_its_hooks_and_their_handles() -> None:
    norm = _HFStyleRMSNorm(8)
    model = nn.Sequential(nn.Linear(8, 8), norm)
    calls: list[str] = []
    handle = norm.register_forward_hook(lambda m, a, out: calls.append("post"))
    norm.register_forward_pre_hook(lambda m, a: calls.append("pre"))
    converted = normkit.convert(model)
    assert type(converted[1]) is normkit.RMSNorm
    converted(torch.randn(2, 8))
    assert calls == ["pre", "post"]
    handle.remove()  # the handle still reaches the hook
    converted(torch.randn(2, 8))
    assert calls == ["pre", "post", "pre"]
