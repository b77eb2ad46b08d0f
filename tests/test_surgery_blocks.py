"""convert on the norms of today's blocks, in real models built offline from tiny configs: HF
Mamba2 (its gated ``MambaRMSNormGated``), Qwen3 and Gemma3 (QK norms, Gemma's sandwich norms,
weight offset 1), and diffusers' DiT, PixArt, SD3 and Flux transformers (adaLN: AdaLayerNormZero,
AdaLayerNormZeroSingle, AdaLayerNormContinuous). Outputs and gradients must be unchanged:
bitwise in float32 and wherever normkit rounds as the model does, within the 2x bound of the
float64 truth in bfloat16 otherwise. Also the defect this found: a norm whose forward takes an
argument beyond its input (a gate) was replaced by an RMSNorm that cannot take it."""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import normkit
from cases import seed_of
from kernel_bound import assert_within_bound
from normkit._structure import missing_arguments
from normkit.adapters_blocks import (
    AdaLayerNormContinuousAdapter,
    AdaLayerNormZeroAdapter,
    AdaLayerNormZeroSingleAdapter,
)
from normkit.modules._base import BackendMixin

DTYPES = [torch.float32, torch.bfloat16]


def _randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Random norm weights around their initial value (HF's ones, Gemma's zeros: both hide a wrong
    formula) and random adaLN projections (diffusers zero-initialises some: no modulation)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                continue
            fresh = torch.randn(p.shape, generator=gen)
            if ".linear" in name or ".emb." in name:
                p.copy_(fresh * 0.2)
            else:
                p.copy_(fresh * 0.3 + (0.0 if p.abs().max() == 0 else 1.0))
    return model


Run = Callable[[nn.Module, torch.dtype], Tensor]


def _outputs_and_grads(model: nn.Module, run: Run, seed: int) -> dict[str, Tensor]:
    dtype = next(model.parameters()).dtype
    y = run(model, dtype)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y.dtype)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
    grads = torch.autograd.grad(y, params, dy, allow_unused=True)
    return {"y": y.detach(), **{n: g for n, g in zip(names, grads, strict=True) if g is not None}}


def _check_model(build: Callable[[], nn.Module], run: Run, dtype: torch.dtype, seed: int, *,
                 same_roundings: bool, same_order: bool = True) -> tuple[nn.Module, normkit.ConvertReport]:
    """Convert (strict) a copy of the model in ``dtype``. Float32: output bitwise the original's,
    and the gradients too where they are summed in the same order (``same_order``; else to float32
    roundings). ``same_roundings`` (normkit rounds where the model does): the output in low
    precision too. Otherwise output and gradients are within the 2x bound of float64 truth."""
    torch.manual_seed(seed)
    model = _randomize_(build().eval(), seed)
    oracle = copy.deepcopy(model).double()
    original = model.to(dtype)
    report = normkit.ConvertReport()
    converted = normkit.convert(copy.deepcopy(original), strict=True, report=report)
    assert report.converted and not report.left
    low = _outputs_and_grads(original, run, seed)
    got = _outputs_and_grads(converted, run, seed)
    assert got.keys() == low.keys()
    if dtype == torch.float32 or same_roundings:
        torch.testing.assert_close(got["y"], low["y"], rtol=0, atol=0)
    if dtype == torch.float32:  # bitwise: the default CPU backend runs the ops the model runs, in its order
        tol = {"rtol": 0.0, "atol": 0.0} if same_order else {"rtol": 1e-5, "atol": 1e-6}
        for name in low:
            torch.testing.assert_close(got[name], low[name], **tol, msg=lambda m, n=name: f"{n}: {m}")
    else:
        want = _outputs_and_grads(oracle, run, seed)
        assert_within_bound(got, {k: v.to(torch.float64) for k, v in want.items()}, low)
    return converted, report


def _kinds(report: normkit.ConvertReport) -> dict[str, str]:
    return {c.name: c.after for c in report.converted}


# ---- the defect: a norm whose forward takes more than its input -----------------------------------


class ResidualRMSNorm(nn.Module):
    """An RMSNorm whose forward also takes a residual to add first: alone (residual None) it is
    LLaMA's RMSNorm, which the probe, calling forward(x), cannot tell apart."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.randn(size)), 1e-6

    def forward(self, hidden_states: Tensor, residual: Tensor | None = None) -> Tensor:
        x = hidden_states if residual is None else hidden_states + residual
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def test_missing_arguments_reads_what_a_call_may_pass() -> None:
    def norm(hidden_states, gate=None): ...
    def plain(input): ...
    def gated(input, gate=None): ...
    def open_ended(x, *args, **kwargs): ...
    def keyword(x, *, gate=None): ...

    assert missing_arguments(norm, plain) == ["gate"]
    assert missing_arguments(norm, gated) == []  # the input's name may differ, the gate's may not
    assert missing_arguments(norm, keyword) == ["gate"]  # HF passes the gate by position
    assert missing_arguments(norm, open_ended) == []
    assert missing_arguments(open_ended, plain) == ["*args", "**kwargs"]


def test_a_norm_with_an_extra_argument_is_never_replaced_by_one_without_it() -> None:
    model = nn.Sequential(ResidualRMSNorm(8))
    report = normkit.ConvertReport()
    normkit.convert(model, report=report)
    assert type(model[0]) is ResidualRMSNorm and not report.converted
    assert "residual" in report.left[0].reason
    with pytest.raises(RuntimeError, match="no verified normkit replacement"):
        normkit.convert(model, strict=True)
    x, r = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    torch.testing.assert_close(model[0](x, r), ResidualRMSNorm.forward(model[0], x, r))


# HF norms whose forward takes one more argument (their standalone math is torch's GroupNorm's):
# each became a normkit.GroupNorm that crashed at the model's call with that argument.
_HF_EXTRA_ARGUMENT = [("pe_audio", "PeAudioMaskedGroupNorm", "padding_mask"),
                      ("emu3", "Emu3VQVAEGroupNorm", "quant_states")]


@pytest.mark.parametrize(("package", "name", "argument"), _HF_EXTRA_ARGUMENT, ids=str)
def test_hf_norms_with_an_extra_argument_are_left(package: str, name: str, argument: str) -> None:
    pytest.importorskip("transformers")
    try:
        cls = getattr(importlib.import_module(f"transformers.models.{package}.modeling_{package}"), name)
    except (ImportError, AttributeError):
        pytest.skip(f"this transformers has no {name}")
    model = nn.Sequential(cls(num_groups=2, num_channels=4))
    report = normkit.ConvertReport()
    normkit.convert(model, report=report)
    assert type(model[0]) is cls and not report.converted
    assert argument in report.left[0].reason


# ---- HF Mamba2: the gated RMSNorm -----------------------------------------------------------------


def _mamba2(n_groups: int) -> Callable[[], nn.Module]:
    transformers = pytest.importorskip("transformers")
    config = transformers.Mamba2Config(hidden_size=16, num_hidden_layers=1, vocab_size=50, num_heads=4, head_dim=8,
                                       state_size=8, n_groups=n_groups, expand=2, chunk_size=8)
    return lambda: transformers.Mamba2Model(config)


_IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))


def _last_hidden(model: nn.Module, dtype: torch.dtype) -> Tensor:
    return model(input_ids=_IDS).last_hidden_state


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_groups", [1, 2])
def test_hf_mamba2_gated_norm_becomes_gated_rms_norm(n_groups: int, dtype: torch.dtype) -> None:
    converted, report = _check_model(_mamba2(n_groups), _last_hidden, dtype, seed_of("mamba2", n_groups),
                                     same_roundings=True)  # HF's weight * round(x_hat): cast="normalize_first"
    assert _kinds(report)["layers.0.mixer.norm"] == "GatedRMSNorm"
    gated = converted.layers[0].mixer.norm
    assert type(gated) is normkit.GatedRMSNorm
    assert (gated.cast, gated.norm_before_gate, gated.group_size) == ("normalize_first", False, 32 // n_groups)
    assert all(type(m) is normkit.RMSNorm for m in (converted.layers[0].norm, converted.norm_f))


def test_gated_norm_shares_its_weight() -> None:
    original = _mamba2(2)().layers[0].mixer.norm
    converted = normkit.convert(nn.Sequential(original), strict=True)[0]
    assert converted.weight is original.weight


# ---- HF Qwen3 and Gemma3: QK norms and Gemma's sandwich -------------------------------------------

_SMALL = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 24,
          "vocab_size": 50, "num_key_value_heads": 1, "max_position_embeddings": 16, "head_dim": 8}
# name -> (config, model, the RMSNorm options of every norm, including q_norm/k_norm)
_QK = {"qwen3": ("Qwen3Config", "Qwen3Model", ("normalize_first", 0.0)),
       "gemma3": ("Gemma3TextConfig", "Gemma3TextModel", ("weight_first", 1.0))}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(_QK))
def test_hf_qk_and_sandwich_norms_convert_exactly(name: str, dtype: torch.dtype) -> None:
    """q_norm/k_norm (and Gemma3's four norms per layer) each become a normkit.RMSNorm: they are
    called one at a time inside HF's attention/decoder forward, so one fused qk_rms_norm (or
    sandwich_rms_norm) call would need that forward rewritten; convert does not patch it."""
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls, options = _QK[name]
    build = lambda: getattr(transformers, model_cls)(getattr(transformers, config_cls)(**_SMALL))
    converted, _ = _check_model(build, _last_hidden, dtype, seed_of("qk", name), same_roundings=True)
    layer = converted.layers[0]
    norms = [layer.self_attn.q_norm, layer.self_attn.k_norm, layer.input_layernorm, layer.post_attention_layernorm]
    if name == "gemma3":
        norms += [layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm]
    assert all(type(m) is normkit.RMSNorm and (m.cast, m.weight_offset) == options for m in norms)


# ---- diffusers: adaLN ---------------------------------------------------------------------------


def _diffusers():
    return pytest.importorskip("diffusers")


def _latents(n: int = 2) -> Tensor:
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(1))


_TIMESTEP = torch.tensor([10, 500])


def _dit() -> nn.Module:
    return _diffusers().DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                              out_channels=4, num_layers=1, sample_size=8, patch_size=2,
                                              num_embeds_ada_norm=10)


def _run_dit(model: nn.Module, dtype: torch.dtype) -> Tensor:
    return model(_latents().to(dtype), timestep=_TIMESTEP, class_labels=torch.tensor([1, 3])).sample


def _pixart() -> nn.Module:
    return _diffusers().PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                 out_channels=4, num_layers=1, sample_size=8, patch_size=2,
                                                 cross_attention_dim=16, caption_channels=16,
                                                 num_embeds_ada_norm=10)


def _run_pixart(model: nn.Module, dtype: torch.dtype) -> Tensor:
    text = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    return model(_latents().to(dtype), encoder_hidden_states=text, timestep=_TIMESTEP,
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


def _sd3() -> nn.Module:
    return _diffusers().SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                              caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
                                              qk_norm="rms_norm", dual_attention_layers=(0,))


def _run_sd3(model: nn.Module, dtype: torch.dtype) -> Tensor:
    gen = torch.Generator().manual_seed(2)
    text, pooled = torch.randn(2, 5, 16, generator=gen).to(dtype), torch.randn(2, 16, generator=gen).to(dtype)
    return model(_latents().to(dtype), encoder_hidden_states=text, pooled_projections=pooled,
                 timestep=_TIMESTEP).sample


def _flux() -> nn.Module:
    return _diffusers().FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                               attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                               pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))


def _run_flux(model: nn.Module, dtype: torch.dtype) -> Tensor:
    gen = torch.Generator().manual_seed(2)
    tokens, text = torch.randn(2, 6, 4, generator=gen).to(dtype), torch.randn(2, 5, 16, generator=gen).to(dtype)
    pooled = torch.randn(2, 16, generator=gen).to(dtype)
    img_ids, txt_ids = torch.zeros(6, 3), torch.zeros(5, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(6) // 3, torch.arange(6) % 3
    return model(tokens, encoder_hidden_states=text, pooled_projections=pooled, timestep=_TIMESTEP.to(dtype) / 1000,
                 img_ids=img_ids, txt_ids=txt_ids).sample


# name -> (build, run, {module name: the class it must become})
_DIFFUSERS = {
    "dit": (_dit, _run_dit, {"transformer_blocks.0.norm1": "AdaLayerNormZeroAdapter", "norm_out": "LayerNorm"}),
    # SD3.5's dual attention in block 0: SD35AdaLayerNormZeroX.
    # PixArt's adaLN-single is an embedding (no norm): its block modulates plain LayerNorms inline.
    "pixart": (_pixart, _run_pixart, {"transformer_blocks.0.norm1": "LayerNorm",
                                      "transformer_blocks.0.norm2": "LayerNorm"}),
    "sd3": (_sd3, _run_sd3, {"transformer_blocks.0.norm1": "SD35AdaLayerNormZeroXAdapter",
                             "transformer_blocks.1.norm1": "AdaLayerNormZeroAdapter",
                             "transformer_blocks.1.norm1_context": "AdaLayerNormContinuousAdapter",
                             "transformer_blocks.0.attn.norm_q": "RMSNorm",
                             "norm_out": "AdaLayerNormContinuousAdapter"}),
    "flux": (_flux, _run_flux, {"transformer_blocks.0.norm1": "AdaLayerNormZeroAdapter",
                                "transformer_blocks.0.norm1_context": "AdaLayerNormZeroAdapter",
                                "single_transformer_blocks.0.norm": "AdaLayerNormZeroSingleAdapter",
                                "single_transformer_blocks.0.attn.norm_k": "RMSNorm",
                                "norm_out": "AdaLayerNormContinuousAdapter"}),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(_DIFFUSERS))
def test_diffusers_adaln_norms_convert(name: str, dtype: torch.dtype) -> None:
    build, run, expected = _DIFFUSERS[name]
    # bfloat16: diffusers rounds the norm's output, then 1 + scale, then each product; normkit
    # rounds once, so it is closer to the truth, not bitwise equal.
    # SD3.5's layer modulates one norm twice: normkit's two calls each run the norm's backward,
    # where diffusers sums the two gradients first (float32 roundings apart).
    _, report = _check_model(build, run, dtype, seed_of("diffusers", name), same_roundings=False,
                             same_order=name != "sd3")
    kinds = _kinds(report)
    assert {k: kinds.get(k) for k in expected} == expected


def test_adaln_adapter_keeps_the_submodules_and_the_state_dict() -> None:
    model = _dit()
    before = model.transformer_blocks[0].norm1
    keys = list(model.state_dict())
    normkit.convert(model, strict=True)
    after = model.transformer_blocks[0].norm1
    assert type(after) is AdaLayerNormZeroAdapter and not after.rms
    assert all(getattr(after, n) is c for n, c in before.named_children())
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("norm_type", ["layer_norm", "rms_norm"])
def test_adaln_continuous_with_an_affine_layer_or_rms_norm(norm_type: str) -> None:
    """The probe picks the modulated norm that agrees (layer vs RMS), with the norm's own weight."""
    diffusers = _diffusers()
    from diffusers.models.normalization import AdaLayerNormContinuous

    layer = _randomize_(nn.Sequential(AdaLayerNormContinuous(16, 12, elementwise_affine=True, eps=1e-6,
                                                              norm_type=norm_type)), 3)
    original = copy.deepcopy(layer[0])
    normkit.convert(layer, strict=True)
    assert type(layer[0]) is AdaLayerNormContinuousAdapter and layer[0].rms == (norm_type == "rms_norm")
    x = torch.randn(2, 5, 16, requires_grad=True)
    c = torch.randn(2, 12, requires_grad=True)
    runs = []
    for m in (original, layer[0]):
        y = m(x, c)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
        runs.append((y, *torch.autograd.grad(y, [x, c, *m.parameters()], dy)))
    for want, got in zip(*runs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert diffusers  # imported for the class


def test_adaln_zero_single_standalone() -> None:
    _diffusers()
    from diffusers.models.normalization import AdaLayerNormZeroSingle

    layer = _randomize_(nn.Sequential(AdaLayerNormZeroSingle(16)), 5)
    original = copy.deepcopy(layer[0])
    normkit.convert(layer, strict=True)
    assert type(layer[0]) is AdaLayerNormZeroSingleAdapter
    x, emb = torch.randn(3, 4, 16), torch.randn(3, 16)
    for want, got in zip(original(x, emb=emb), layer[0](x, emb=emb), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_wrong_block_adapter_fails_its_probes(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """A user's adapter computing another formula (RMS for the layer norm, the gate after the
    norm, other groups) is refused, in bfloat16 too, and the right built-in one is kept."""
    _diffusers()
    from diffusers.models.normalization import AdaLayerNormZeroSingle

    from normkit import surgery
    from normkit.adapters_blocks import block_candidates

    monkeypatch.setattr(surgery, "_ADAPTERS", [])  # registration is global: keep it to this test
    ada = _randomize_(nn.Sequential(AdaLayerNormZeroSingle(16)), 6).to(dtype)
    gated = nn.Sequential(_randomize_(_mamba2(2)(), 7).layers[0].mixer.norm).to(dtype)
    wrong = [(AdaLayerNormZeroSingle, lambda m: AdaLayerNormZeroSingleAdapter(m, rms=True), ada[0]),
             (type(gated[0]), lambda m: normkit.GatedRMSNorm(32, m.variance_epsilon, 16, True, dtype=dtype), gated[0]),
             (type(gated[0]), lambda m: normkit.GatedRMSNorm(32, m.variance_epsilon, 32, dtype=dtype), gated[0])]
    for cls, build, module in wrong:
        normkit.register_adapter(cls, build, probes=block_candidates(module)[0].probes)
    for model in (ada, gated):
        normkit.convert(model, strict=True)
    assert type(ada[0]) is AdaLayerNormZeroSingleAdapter and not ada[0].rms
    assert type(gated[0]) is normkit.GatedRMSNorm
    assert (gated[0].norm_before_gate, gated[0].group_size, gated[0].weight is not None) == (False, 16, True)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", ["mamba2", "dit"])
def test_converted_block_norms_run_on_every_backend(name: str, backend: str) -> None:
    """The converted model with its normkit modules and adapters switched to ``backend`` (the
    attribute is read at each call): float32 outputs and gradients as the original's."""
    if backend == "triton":
        pytest.importorskip("triton")
    build, run = (_mamba2(2), _last_hidden) if name == "mamba2" else (_dit, _run_dit)
    seed = seed_of("backends", name)
    torch.manual_seed(seed)
    original = _randomize_(build().eval(), seed)
    converted = normkit.convert(copy.deepcopy(original), strict=True)
    switched = [m for m in converted.modules() if isinstance(m, BackendMixin)]
    assert any(type(m) in (normkit.GatedRMSNorm, AdaLayerNormZeroAdapter) for m in switched)
    for m in switched:
        m.backend = backend
    want, got = _outputs_and_grads(original, run, seed), _outputs_and_grads(converted, run, seed)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def test_adaln_adapter_in_training_mode_and_under_compile() -> None:
    """Training mode (DiT's class-label dropout draws the same mask: the probe forks the random
    state) and torch.compile(fullgraph=True) through the adapter: no graph break."""
    model = _randomize_(_dit().train(), 8)
    converted = normkit.convert(copy.deepcopy(model), strict=True)
    assert type(converted.transformer_blocks[0].norm1) is AdaLayerNormZeroAdapter
    runs = []
    for m in (model, converted):
        torch.manual_seed(9)
        runs.append(_run_dit(m, torch.float32))
    torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=0)

    _diffusers()
    from diffusers.models.normalization import AdaLayerNormZeroSingle

    adapter = normkit.convert(nn.Sequential(_randomize_(AdaLayerNormZeroSingle(16), 10)), strict=True)[0]
    x, emb = torch.randn(2, 3, 16), torch.randn(2, 16)
    compiled = torch.compile(adapter, fullgraph=True, backend="eager")
    for want, got in zip(adapter(x, emb), compiled(x, emb), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
