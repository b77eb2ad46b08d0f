"""An outside user's attack, session 12: what PyTorch users do with normkit that no test here
imagined. CPU autocast (bfloat16 and float16) around the modules and the add-norms on every
backend name; real models built from HF transformers and diffusers configs, converted to numba
and "auto", trained one optimizer step, saved and reloaded, and made to generate; the numba
kernels called from several Python threads at once; and the module's life outside a plain
forward (torch.export, jit.script / trace, fx, deepcopy, pickle, torch.save, ``.to(dtype)``,
``load_state_dict`` from torch.nn's twin).

Oracles: torch.nn's twin under the same conditions (dtype, autocast, thread count), float64
with the self-calibrating bound (at most twice torch's own error in the same dtype), the serial
call's bits for the threaded ones. Material nobody here wrote: HF ``LlamaConfig`` /
``Qwen2Config`` / ``GemmaConfig`` / ``BertConfig`` models, diffusers' ``UNet2DModel``, torch's
``export`` / ``jit`` / ``fx``, hypothesis strategies.

Each defect found was a strict xfail whose reason is the minimal repro and the suspected cause;
both are fixed (dd6d7e1), their texts kept beside the tests (_GROUPS_OF_TWO, _RESTRIDED_GRADIENT).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import pickle
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import normkit
import normkit.functional as NF
from _outside import NUMBA_ATTACK_MARKS, assert_same_error, module_db, raised
from cases import randomize_, run_or_skip, seed_of
from normkit.testing import assert_within_bound, bound

pytestmark = NUMBA_ATTACK_MARKS

F64 = torch.float64
BACKEND_NAMES = [None, "auto", "torch", "numba", "reference"]
FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _randn(*shape: int, seed: object, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed_of(seed)), dtype=F64).to(dtype)


# ---- the table of modules: torch.nn's class, normkit's, an input shape ---------------------------

# name: (torch.nn twin built from the args, args, input shape). normkit's class has the same name.
MODULES: dict[str, tuple[Callable[[], nn.Module], Callable[..., nn.Module], tuple[int, ...]]] = {
    "LayerNorm": (lambda: nn.LayerNorm(24), lambda **kw: normkit.LayerNorm(24, **kw), (3, 5, 24)),
    "LayerNorm 2-d shape": (lambda: nn.LayerNorm((4, 6)), lambda **kw: normkit.LayerNorm((4, 6), **kw), (3, 4, 6)),
    "RMSNorm": (lambda: nn.RMSNorm(24), lambda **kw: normkit.RMSNorm(24, **kw), (3, 5, 24)),
    "RMSNorm eps": (lambda: nn.RMSNorm(24, eps=1e-6), lambda **kw: normkit.RMSNorm(24, eps=1e-6, **kw), (2, 24)),
    "GroupNorm": (lambda: nn.GroupNorm(3, 12), lambda **kw: normkit.GroupNorm(3, 12, **kw), (2, 12, 5, 7)),
    "BatchNorm1d": (lambda: nn.BatchNorm1d(12), lambda **kw: normkit.BatchNorm1d(12, **kw), (6, 12, 5)),
    "BatchNorm1d 2-d": (lambda: nn.BatchNorm1d(12), lambda **kw: normkit.BatchNorm1d(12, **kw), (9, 12)),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(12), lambda **kw: normkit.BatchNorm2d(12, **kw), (3, 12, 5, 7)),
    "InstanceNorm1d": (
        lambda: nn.InstanceNorm1d(12, affine=True),
        lambda **kw: normkit.InstanceNorm1d(12, affine=True, **kw),
        (3, 12, 17),
    ),
    "InstanceNorm2d": (
        lambda: nn.InstanceNorm2d(12, affine=True, track_running_stats=True),
        lambda **kw: normkit.InstanceNorm2d(12, affine=True, track_running_stats=True, **kw),
        (3, 12, 5, 7),
    ),
}


def _pair(name: str, backend: str | None, seed: object) -> tuple[nn.Module, nn.Module]:
    """torch.nn's module (random parameters and statistics) and normkit's twin loaded from it."""
    make_torch, make_ours, _ = MODULES[name]
    theirs = randomize_(make_torch(), seed_of(seed))
    ours = make_ours(backend=backend)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _run(
    module: nn.Module, inputs: list[Tensor], seed: object, ctx: Callable[[], Any] = contextlib.nullcontext
) -> dict[str, Tensor]:
    """Output(s), input and parameter gradients under a random upstream gradient, and the
    module's buffers after the call."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    with ctx():
        out = module(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    params = [p for p in module.parameters() if p.requires_grad]
    dys = [_randn(*y.shape, seed=(seed, "dy", i), dtype=y.dtype) for i, y in enumerate(outs)]
    grads = torch.autograd.grad(outs, leaves + params, dys)
    got = {f"y{i}": y.detach() for i, y in enumerate(outs)}
    got.update({f"dx{i}": g for i, g in enumerate(grads[: len(leaves)])})
    got.update(
        {
            f"d.{n}": g
            for (n, p), g in zip(
                [(n, p) for n, p in module.named_parameters() if p.requires_grad], grads[len(leaves) :], strict=True
            )
        }
    )
    got.update({f"buf.{n}": b.detach().clone() for n, b in module.named_buffers() if b.is_floating_point()})
    return got


def _float64_truth(module: nn.Module, inputs: list[Tensor], seed: object) -> dict[str, Tensor]:
    """The same call in float64 (a float64 copy of torch's module, no autocast)."""
    return _run(copy.deepcopy(module).double(), [x.double() for x in inputs], seed)


def _judge(got: dict[str, Tensor], low: dict[str, Tensor], truth: dict[str, Tensor]) -> None:
    """Every result has torch's dtype and is within twice torch's own error of float64."""
    assert got.keys() == low.keys()
    for name in got:
        assert got[name].dtype == low[name].dtype, f"{name}: {got[name].dtype}, torch gives {low[name].dtype}"
    assert_within_bound(got, {k: v.to(F64) for k, v in truth.items()}, low)


# ---- 1. CPU autocast --------------------------------------------------------------------------

AUTOCAST = (torch.bfloat16, torch.float16)
# (input dtype, parameter dtype): float32 throughout; low-precision input with float32 parameters
# (an autocast Linear's output into a float32 norm); all in the low precision.
MIXES = ("f32 in, f32 params", "low in, f32 params", "low in, low params")


def _mixed(theirs: nn.Module, ours: nn.Module, x: Tensor, mix: str, low: torch.dtype, backend: str | None) -> Tensor:
    if backend == "numba" and low == torch.float16 and mix != "f32 in, f32 params":
        pytest.skip("numba declines float16 by design (BackendError, documented)")
    if mix == "low in, low params":
        theirs.to(low)
        ours.to(low)
    return x if mix == "f32 in, f32 params" else x.to(low)


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("low", AUTOCAST, ids=str)
@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("name", list(MODULES))
def test_modules_under_cpu_autocast_match_torch(name: str, backend: str | None, low: torch.dtype, mix: str) -> None:
    """A normkit module inside ``torch.autocast("cpu", dtype=low)`` gives torch.nn's dtypes, and
    values, gradients and running statistics within the bound, on every backend name."""
    seed = ("autocast", name, backend, str(low), mix)
    theirs, ours = _pair(name, backend, seed)
    x = _mixed(theirs, ours, _randn(*MODULES[name][2], seed=seed), mix, low, backend)
    truth = _float64_truth(theirs, [x], seed)
    autocast = lambda: torch.autocast("cpu", dtype=low)  # noqa: E731
    low_run = _run(theirs, [x], seed, autocast)
    _judge(_run(ours, [x], seed, autocast), low_run, truth)


ADD_NORMS = {
    "add_layer_norm": (
        lambda x, r, w, b: NF.add_layer_norm(x, r, (x.shape[-1],), w, b, 1e-5),
        lambda x, r, w, b: (F.layer_norm(x + r, (x.shape[-1],), w, b, 1e-5), x + r),
    ),
    "add_rms_norm": (
        lambda x, r, w, b: NF.add_rms_norm(x, r, (x.shape[-1],), w, 1e-6),
        lambda x, r, w, b: (F.rms_norm(x + r, (x.shape[-1],), w, 1e-6), x + r),
    ),
}


class _Call(nn.Module):
    """A functional call with its parameters held by a module (so ``_run`` finds them)."""

    def __init__(self, fn: Callable[..., Any], width: int, seed: object, bias: bool = True) -> None:
        super().__init__()
        self.fn = fn
        self.weight = nn.Parameter(_randn(width, seed=(seed, "w")))
        self.bias = nn.Parameter(_randn(width, seed=(seed, "b"))) if bias else None

    def forward(self, x: Tensor, r: Tensor) -> Any:
        return self.fn(x, r, self.weight, self.bias)


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("low", AUTOCAST, ids=str)
@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("op", list(ADD_NORMS))
def test_add_norms_under_cpu_autocast_match_torch(op: str, backend: str | None, low: torch.dtype, mix: str) -> None:
    """add_layer_norm / add_rms_norm inside CPU autocast: torch's composition's dtypes (y and
    residual_out), values and gradients within the bound."""
    seed = ("autocast add", op, backend, str(low), mix)
    ours_fn, torch_fn = ADD_NORMS[op]
    if backend is not None:
        ours_fn = (lambda f: lambda *a: _with_backend(backend, f, *a))(ours_fn)
    bias = op == "add_layer_norm"
    theirs, ours = _Call(torch_fn, 40, seed, bias), _Call(ours_fn, 40, seed, bias)
    x = _mixed(theirs, ours, _randn(3, 7, 40, seed=(seed, "x")), mix, low, backend)
    r = _randn(3, 7, 40, seed=(seed, "r"), dtype=x.dtype)
    truth = _float64_truth(theirs, [x, r], seed)
    autocast = lambda: torch.autocast("cpu", dtype=low)  # noqa: E731
    _judge(_run(ours, [x, r], seed, autocast), _run(theirs, [x, r], seed, autocast), truth)


def _with_backend(backend: str, fn: Callable[..., Any], *args: Any) -> Any:
    with normkit.use_backend(backend):
        return fn(*args)


# ---- 2. real models from HF transformers and diffusers configs --------------------------------

_GROUPS_OF_TWO = (
    "convert's probe refuses a numba (and reference) GroupNorm with 2-element groups in float32: "
    "normkit.convert(nn.GroupNorm(8, 16), backend='numba', strict=True) raises (also (2, 4), (3, 6), "
    "(4, 8), (6, 12); diffusers' UNet2DModel(norm_num_groups=8, block_out_channels=(16, 32)) keeps 3 "
    "of 21). On probe [2, 16] offset by 64 torch's own float32 output is 2.9e-5 off float64 and its "
    "input gradient 8.7e-2 off; numba's are 6.0e-8 and 1.1e-4. _probe.nearer_truth compares numba's "
    "worst error (its input gradient, 1.1e-4) with twice torch's error on the first quantity that "
    "fails (its output, 2.9e-5): compare() returns at the first failure, so torch's far larger "
    "input-gradient error is never measured."
)


def _llm(config: str, model: str, **extra: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        transformers = pytest.importorskip("transformers")
        cfg = getattr(transformers, config)(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            attention_dropout=0.0,
            **extra,
        )
        cfg._attn_implementation = "eager"
        return getattr(transformers, model)(cfg)

    return build


def _bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(cfg)


def _unet() -> nn.Module:
    diffusers = pytest.importorskip("diffusers")
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )


IDS = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(12))
LABELS = torch.tensor([0, 2])
IMAGE, TARGET = _randn(2, 3, 8, 8, seed="unet x"), _randn(2, 3, 8, 8, seed="unet target")


def _lm_loss(model: nn.Module) -> tuple[Tensor, Tensor]:
    out = model(input_ids=IDS, labels=IDS)
    return out.loss, out.logits


def _bert_loss(model: nn.Module) -> tuple[Tensor, Tensor]:
    out = model(input_ids=IDS, labels=LABELS)
    return out.loss, out.logits


def _unet_loss(model: nn.Module) -> tuple[Tensor, Tensor]:
    y = model(IMAGE.to(next(model.parameters()).dtype), 3).sample
    return F.mse_loss(y.double(), TARGET.double()), y


# name: (builder, loss of a model, decoder that can generate)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], tuple[Tensor, Tensor]], bool]] = {
    "llama": (_llm("LlamaConfig", "LlamaForCausalLM"), _lm_loss, True),
    "qwen2": (_llm("Qwen2Config", "Qwen2ForCausalLM"), _lm_loss, True),
    "gemma (1 + weight)": (_llm("GemmaConfig", "GemmaForCausalLM", head_dim=8), _lm_loss, True),
    "bert": (_bert, _bert_loss, False),
    "unet GroupNorm": (_unet, _unet_loss, False),
}


def _random_norms_(model: nn.Module, seed: object) -> nn.Module:
    """Random norm weights and biases (HF starts them at 1 or 0, Gemma's weight at 0: a wrong
    formula hides there)."""
    gen = torch.Generator().manual_seed(seed_of(seed))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (0.0 if p.abs().max() == 0 else 1.0))
    return model


def _train_step(model: nn.Module, loss_of: Callable[[nn.Module], tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """One SGD step with momentum: the loss and output before, every parameter gradient, and the
    loss after the step."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss, y = loss_of(model)
    loss.backward()
    got = {"loss": loss.detach().reshape(1), "y": y.detach()}
    got.update({f"d.{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    opt.step()
    with torch.no_grad():
        got["loss after step"] = loss_of(model)[0].detach().reshape(1)
    return got


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "autocast bf16"])
@pytest.mark.parametrize("backend", ["numba", None])
@pytest.mark.parametrize("name", list(MODELS))
def test_converted_model_trains_like_the_original(name: str, backend: str | None, precision: str) -> None:
    """A tiny HF / diffusers model converted (strict) to numba or "auto", in float32, in
    bfloat16, or in float32 trained under CPU autocast to bfloat16: loss, output, every parameter
    gradient and the loss after one optimizer step within twice the unconverted model's own
    error (under the same precision) of the float64 model's."""
    if precision == "bfloat16" and MODELS[name][2]:
        pytest.skip("the decoders' bf16 run adds time, not reach: bert and the UNet cover bf16")
    build, loss_of, _ = MODELS[name]
    torch.manual_seed(seed_of("model", name))
    model = _random_norms_(build(), ("model", name))
    truth = _train_step(copy.deepcopy(model).double(), loss_of)
    if precision == "bfloat16":
        model = model.to(torch.bfloat16)
    converted = normkit.convert(copy.deepcopy(model), backend=backend, strict=True)
    assert any(type(m).__module__.startswith("normkit") for m in converted.modules())
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast bf16")
    with autocast:
        low = _train_step(model, loss_of)
    with autocast:
        got = _train_step(converted, loss_of)
    _judge(got, low, truth)


@pytest.mark.parametrize("backend", ["numba", None])
@pytest.mark.parametrize("name", [n for n, (_, _, decoder) in MODELS.items() if decoder])
def test_converted_decoder_generates_saves_and_reloads(name: str, backend: str | None) -> None:
    """generate() gives the original's greedy tokens; the converted model's state_dict (through
    torch.save / torch.load(weights_only=True)) loads into a fresh unconverted model that then
    gives the original's logits to the bit; the pickled converted model keeps its backend."""
    build, _, _ = MODELS[name]
    torch.manual_seed(seed_of("generate", name))
    model = _random_norms_(build().eval(), ("generate", name))
    converted = normkit.convert(copy.deepcopy(model), backend=backend, strict=True)
    prompt = IDS[:, :5]
    options = {"max_new_tokens": 6, "do_sample": False, "attention_mask": torch.ones_like(prompt), "pad_token_id": 0}
    assert torch.equal(converted.generate(prompt, **options), model.generate(prompt, **options))

    buffer = io.BytesIO()
    torch.save(converted.state_dict(), buffer)
    buffer.seek(0)
    fresh = build().eval()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=IDS).logits, model(input_ids=IDS).logits)

    copied = pickle.loads(pickle.dumps(converted))
    norms = [m for m in copied.modules() if type(m).__module__.startswith("normkit")]
    assert norms and all(m.backend == backend for m in norms)
    with torch.no_grad():
        assert torch.equal(copied(input_ids=IDS).logits, converted(input_ids=IDS).logits)


@pytest.mark.parametrize("backend", ["numba", "reference"])
@pytest.mark.parametrize("groups", [(2, 4), (3, 6), (4, 8), (8, 16)], ids=str)
def test_convert_takes_a_group_norm_of_two_element_groups(groups: tuple[int, int], backend: str) -> None:
    """normkit.convert(strict=True) takes a float32 GroupNorm whose groups hold two channels on
    backends nearer float64 than torch itself (the minimal repro of the UNet's leftovers).
    Found by this attack (_GROUPS_OF_TWO), fixed in dd6d7e1."""
    normkit.convert(nn.GroupNorm(*groups), backend=backend, strict=True)


# ---- 3. numba kernels from several Python threads at once -------------------------------------

# One call each of the numba kernels' families: (x's shape, call(x, weight, bias, residual)).
THREADED: dict[str, tuple[tuple[int, ...], Callable[..., Any]]] = {
    "layer_norm": ((33, 1031), lambda x, w, b, r: NF.layer_norm(x, (1031,), w, b, backend="numba")),
    "rms_norm 8x4096": ((8, 4096), lambda x, w, b, r: NF.rms_norm(x, (4096,), w, backend="numba")),
    "add_rms_norm": ((17, 257), lambda x, w, b, r: NF.add_rms_norm(x, r, (257,), w, backend="numba")),
    "add_layer_norm": ((17, 257), lambda x, w, b, r: NF.add_layer_norm(x, r, (257,), w, b, backend="numba")),
    "group_norm": ((3, 32, 9, 11), lambda x, w, b, r: NF.group_norm(x, 8, w, b, backend="numba")),
    "group_norm channels_last": (
        (3, 32, 9, 11),
        lambda x, w, b, r: NF.group_norm(x.to(memory_format=torch.channels_last), 4, w, b, backend="numba"),
    ),
    "batch_norm training": (
        (5, 32, 7, 6),
        lambda x, w, b, r: NF.batch_norm(x, None, None, w, b, True, backend="numba"),
    ),
    "instance_norm": ((3, 32, 13), lambda x, w, b, r: NF.instance_norm(x, weight=w, bias=b, backend="numba")),
}


def _threaded_job(kind: str, dtype: torch.dtype, seed: int) -> list[Tensor]:
    """Forward and backward of one call with its own random inputs: y, dx, dw (and d residual)."""
    shape, call = THREADED[kind]
    width = shape[-1] if len(shape) == 2 else shape[1]
    x = _randn(*shape, seed=(kind, seed, "x"), dtype=dtype).requires_grad_()
    r = _randn(*shape, seed=(kind, seed, "r"), dtype=dtype).requires_grad_()
    w = _randn(width, seed=(kind, seed, "w")).requires_grad_()
    b = _randn(width, seed=(kind, seed, "b")).requires_grad_()
    out = call(x, w, b, r)
    outs = out if isinstance(out, tuple) else (out,)
    dys = [_randn(*y.shape, seed=(kind, seed, "dy", i), dtype=y.dtype) for i, y in enumerate(outs)]
    grads = torch.autograd.grad(outs, (x, w, b, r), dys, allow_unused=True)
    return [y.detach() for y in outs] + [g for g in grads if g is not None]


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("threads", [1, 2])
def test_numba_from_many_python_threads_gives_the_serial_bits(threads: int, restore_threads: None) -> None:
    """Every kernel family, both dtypes, run from a pool of 4 Python threads all at once (the
    jobs interleaved): each job's results equal its serial run to the bit; no deadlock (each
    job must end within 120 s)."""
    torch.set_num_threads(threads)
    jobs = [(kind, dtype, seed) for seed in range(2) for dtype in (torch.float32, torch.bfloat16) for kind in THREADED]
    serial = [_threaded_job(*job) for job in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(_threaded_job, *job) for job in jobs]
        threaded = [f.result(timeout=120) for f in futures]
    for job, want, got in zip(jobs, serial, threaded, strict=True):
        for i, (a, b) in enumerate(zip(want, got, strict=True)):
            assert torch.equal(a, b), f"{job} result {i}: threaded differs by {(a.double() - b.double()).abs().max()}"


def test_numba_forward_in_one_thread_while_backward_in_another(restore_threads: None) -> None:
    """Thread A builds graphs (forwards) while thread B runs the backward of graphs built before,
    and a third flips torch's thread count between 1 and 2: every result equals the serial one
    to the bit (numba's contract: the same bits whatever the thread count)."""
    kinds = list(THREADED)
    want = {kind: _threaded_job(kind, torch.float32, 7) for kind in kinds}

    def forwards() -> dict[str, Tensor]:
        out = {}
        for kind in kinds * 2:
            shape, call = THREADED[kind]
            width = shape[-1] if len(shape) == 2 else shape[1]
            x, r = (_randn(*shape, seed=(kind, 7, n)) for n in ("x", "r"))
            w, b = (_randn(width, seed=(kind, 7, n)) for n in ("w", "b"))
            y = call(x, w, b, r)
            out[kind] = (y if isinstance(y, tuple) else (y,))[0].detach()
        return out

    def backwards() -> dict[str, list[Tensor]]:
        return {kind: _threaded_job(kind, torch.float32, 7) for kind in kinds * 2}

    def flip() -> None:
        for i in range(40):
            torch.set_num_threads(1 + i % 2)

    with ThreadPoolExecutor(max_workers=3) as pool:
        f, b, t = pool.submit(forwards), pool.submit(backwards), pool.submit(flip)
        got_y, got_all = f.result(timeout=120), b.result(timeout=120)
        t.result(timeout=120)
    for kind in kinds:
        assert torch.equal(got_y[kind], want[kind][0]), f"{kind}: forward differs under a concurrent backward"
        for a, c in zip(want[kind], got_all[kind], strict=True):
            assert torch.equal(a, c), f"{kind}: backward differs under a concurrent forward"


# ---- 4. a module's life outside a plain forward ----------------------------------------------


def _saved_and_loaded(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES: dict[str, Callable[[nn.Module], nn.Module]] = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch.save": _saved_and_loaded,
}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("backend", [None, "numba", "reference"])
@pytest.mark.parametrize("name", list(MODULES))
def test_copies_keep_backend_state_and_bits(name: str, backend: str | None, how: str) -> None:
    """deepcopy / pickle / torch.save+load of a module with a backend set, in training mode after
    one step: the copy keeps its backend and state, and its next training call gives the
    original's bits (output, gradients, running statistics)."""
    seed = ("copies", name, backend, how)
    _, ours = _pair(name, backend, seed)
    x = _randn(*MODULES[name][2], seed=seed)
    _run(ours, [x], seed)
    copied = COPIES[how](ours)
    assert copied.backend == backend and copied.training
    for key, value in ours.state_dict().items():
        assert torch.equal(copied.state_dict()[key], value), key
    want, got = _run(ours, [x], (seed, 2)), _run(copied, [x], (seed, 2))
    for key in want:
        assert torch.equal(want[key], got[key]), key


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", [None, "numba"])
@pytest.mark.parametrize("name", list(MODULES))
def test_module_cast_after_construction_matches_torch(name: str, backend: str | None, dtype: torch.dtype) -> None:
    """``module.to(dtype)`` after construction (and after loading torch's state): normkit's
    results in ``dtype`` within the bound of torch.nn's twin cast the same way."""
    seed = ("cast", name, backend, str(dtype))
    theirs, ours = _pair(name, backend, seed)
    x = _randn(*MODULES[name][2], seed=seed)
    truth = _float64_truth(theirs, [x], seed)
    theirs.to(dtype), ours.to(dtype)
    _judge(_run(ours, [x.to(dtype)], seed), _run(theirs, [x.to(dtype)], seed), truth)


@pytest.mark.parametrize("backend", [None, "numba"])
@pytest.mark.parametrize("name", list(MODULES))
def test_state_dict_from_and_to_torch_twin(name: str, backend: str | None) -> None:
    """normkit loads torch.nn's twin's state_dict (strict), and torch loads normkit's; an extra
    key gives torch's error (strict) or torch's result (strict=False); a state of a wrong
    shape gives torch's error and changes nothing."""
    seed = ("state", name, backend)
    theirs, ours = _pair(name, backend, seed)
    fresh = MODULES[name][0]()
    fresh.load_state_dict(ours.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    extra = {**theirs.state_dict(), "extra.weight": torch.ones(2)}
    loose = copy.deepcopy(theirs).load_state_dict(extra, strict=False)
    assert str(ours.load_state_dict(extra, strict=False)) == str(loose)
    with pytest.raises(RuntimeError) as torch_error:
        copy.deepcopy(theirs).load_state_dict(extra)
    with pytest.raises(RuntimeError) as our_error:
        ours.load_state_dict(extra)
    assert str(our_error.value).replace(type(ours).__name__, "?") == str(torch_error.value).replace(
        type(theirs).__name__, "?"
    )
    wrong = {k: torch.zeros(v.numel() + 1) if v.dim() else v for k, v in theirs.state_dict().items()}
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(RuntimeError):
        ours.load_state_dict(wrong)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a failed load_state_dict"


TRACERS: dict[str, Callable[[nn.Module, Tensor], Callable[[Tensor], Tensor]]] = {
    "torch.export": lambda m, x: torch.export.export(m, (x,)).module(),
    "jit.trace": lambda m, x: torch.jit.trace(m, (x,), check_trace=False),
    "fx in a model": lambda m, x: torch.fx.symbolic_trace(nn.Sequential(nn.Identity(), m)),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("tracer", list(TRACERS))
@pytest.mark.parametrize("backend", [None, "numba"])
@pytest.mark.parametrize("name", list(MODULES))
def test_traced_module_runs_like_torch(name: str, backend: str | None, tracer: str, training: bool) -> None:
    """torch.export / jit.trace / fx of a normkit module (train and eval): two calls on new
    inputs give torch.nn's twin's outputs and running statistics (float32 tolerance)."""
    seed = ("traced", name, backend, tracer, training)
    theirs, ours = _pair(name, backend, seed)
    theirs.train(training), ours.train(training)
    shape = MODULES[name][2]
    if backend == "numba" and not training and name == "InstanceNorm2d":
        with pytest.raises(normkit.BackendError, match="use_input_stats=False"):
            ours(_randn(*shape, seed=seed))  # declined by design, eager as traced
        return
    graph = TRACERS[tracer](ours, _randn(*shape, seed=(seed, 0)))
    if tracer == "jit.trace":  # tracing ran one real call (and its statistics update): torch's too
        theirs(_randn(*shape, seed=(seed, 0)))
    for step in (1, 2):
        x = _randn(*shape, seed=(seed, step))
        torch.testing.assert_close(graph(x), theirs(x))
    theirs_buffers = dict(theirs.named_buffers())
    for key, value in ours.named_buffers() if tracer != "torch.export" else graph.named_buffers():
        torch.testing.assert_close(value, theirs_buffers[key.split(".")[-1]], msg=key)


# ---- 5. torch's module_db samples in bfloat16 on numba and "auto" -----------------------------
# tests/test_module_db.py runs them in float64 and float32 on every backend; here in bfloat16,
# and bfloat16 input into float32 parameters (what an autocast model feeds its norms).


def _module_db_samples() -> list[Any]:
    torch.manual_seed(0)  # module_inputs_func draws with the global generator
    out = []
    for info in module_db():
        twin = getattr(normkit, info.module_cls.__name__, None)
        if not (isinstance(twin, type) and issubclass(twin, info.module_cls)):
            continue
        for training in (True, False) if info.train_and_eval_differ else (True,):
            for s in info.module_inputs_func(
                info, device="cpu", dtype=torch.float32, requires_grad=True, training=training
            ):
                x = s.forward_input.args[0]
                if x.numel() > 4096:  # torch's large-batch samples: time, not reach
                    continue
                args = (tuple(s.constructor_input.args), tuple(s.constructor_input.kwargs.items()))
                out.append(
                    pytest.param(
                        info.module_cls.__name__,
                        args,
                        x.detach(),
                        training,
                        id=f"{info.module_cls.__name__}-{s.desc or 'default'}-{training}",
                    )
                )
    return out


@pytest.mark.parametrize("mix", ["bf16", "bf16 in, f32 params"])
@pytest.mark.parametrize("backend", ["numba", None])
@pytest.mark.parametrize(("name", "args", "x", "training"), _module_db_samples())
def test_module_db_samples_in_bfloat16(
    name: str, args: tuple, x: Tensor, training: bool, backend: str | None, mix: str
) -> None:
    """Each of torch's module_db samples for a norm with a normkit twin, in bfloat16 (or bfloat16
    input into float32 parameters): torch's dtypes and the bound against float64, or torch's
    error where torch refuses the sample."""
    seed = ("module_db bf16", name, args, training)
    theirs = randomize_(getattr(nn, name)(*args[0], **dict(args[1])), seed_of(seed)).train(training)
    ours = getattr(normkit, name)(*args[0], **dict(args[1]), backend=backend).train(training)
    ours.load_state_dict(theirs.state_dict())
    try:
        truth = _float64_truth(theirs, [x], seed)
    except Exception:  # noqa: BLE001 - torch's error samples: compared below in bf16
        truth = None
    if mix == "bf16":
        theirs.to(torch.bfloat16), ours.to(torch.bfloat16)
    x = x.to(torch.bfloat16)
    try:
        low = _run(theirs, [x], seed)
    except NotImplementedError as e:
        # ATen has no CPU bf16 avg_pool3d (4-D+ LocalResponseNorm): normkit computes it anyway
        # (README's support table, note [10]): judged against float64 alone.
        assert "not implemented for 'BFloat16'" in str(e) and name == "LocalResponseNorm"
        got = run_or_skip(backend, lambda: _run(ours, [x], seed))
        assert got["y0"].dtype == torch.bfloat16
        assert bound(got["y0"], truth["y0"], None).ok
        return
    except Exception as e:  # noqa: BLE001 - torch refuses: normkit must say the same
        assert_same_error(e, raised(lambda: _run(ours, [x], seed)), f"{name} on {tuple(x.shape)}")
        return
    assert truth is not None
    _judge(run_or_skip(backend, lambda: _run(ours, [x], seed)), low, truth)


# ---- 6. generated calls under CPU autocast: shapes, layouts, dtypes ---------------------------

_RESTRIDED_GRADIENT = (
    "the default path's batch_norm (and backend='torch') restrides a contiguous upstream gradient "
    "of an (N, C, 1, 1) or (N, C, 1, 1, 1) output: functional.canonical_strides views dy of strides "
    "(6, 1, 1, 1) as (6, 1, 6, 6) because it is channels_last-dense too, so ATen's backward takes "
    "its channels_last kernel where torch's own call does not. The gradients are not torch's bits "
    "in any dtype, and for bf16 input with float32 parameters (an autocast model's BatchNorm after "
    "global pooling) x (2, 6, 1, 1): dx is 1.9e-2 off float64 where F.batch_norm's is 1.3e-5 "
    "(bound 7.8e-3)."
)


@pytest.mark.parametrize("backend", [None, "torch"])
@pytest.mark.parametrize(
    "dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)], ids=str
)
@pytest.mark.parametrize("shape", [(2, 6, 1, 1), (16, 32, 1, 1), (4, 8, 1, 1, 1)], ids=str)
def test_batch_norm_of_size_one_spatial_axes_gives_torch_gradients(
    shape: tuple[int, ...], dtypes: tuple, backend: str | None
) -> None:
    """normkit's batch_norm settled on ATen gives F.batch_norm's gradients to the bit on a plain
    contiguous input whose spatial axes have size 1 (a BatchNorm2d after global pooling).
    Found by this attack's autocast fuzz (_RESTRIDED_GRADIENT), fixed in dd6d7e1."""
    seed = ("size-1 spatial", shape, dtypes, backend)
    x = _randn(*shape, seed=(seed, "x"), dtype=dtypes[0])
    w, b = _randn(shape[1], seed=(seed, "w"), dtype=dtypes[1]), _randn(shape[1], seed=(seed, "b"), dtype=dtypes[1])
    dy = _randn(*shape, seed=(seed, "dy"), dtype=dtypes[0])
    results = []
    for call in (F.batch_norm, lambda *a: NF.batch_norm(*a, backend=backend)):
        xs, ws, bs = (t.detach().requires_grad_() for t in (x, w, b))
        y = call(xs, None, None, ws, bs, True)
        results.append([y.detach(), *torch.autograd.grad(y, (xs, ws, bs), dy)])
    for name, theirs, ours in zip(("y", "dx", "dw", "db"), *results, strict=True):
        assert torch.equal(ours, theirs), f"{name}: {(ours.double() - theirs.double()).abs().max():.3g} off torch's"


@st.composite
def _autocast_calls(draw: st.DrawFn) -> tuple[str, tuple[int, ...], str, torch.dtype, str | None]:
    op = draw(st.sampled_from(["layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm"]))
    if op in ("layer_norm", "rms_norm"):
        shape = (*draw(st.lists(st.integers(1, 5), min_size=0, max_size=2)), draw(st.integers(1, 300)))
        layouts = ["contiguous", "transposed"] if len(shape) >= 2 else ["contiguous"]
    else:
        groups = draw(st.integers(1, 4))
        channels = groups * draw(st.integers(1, 5)) if op == "group_norm" else draw(st.integers(1, 12))
        spatial = draw(st.lists(st.integers(1, 9), min_size=1 if op == "instance_norm" else 0, max_size=2))
        shape = (draw(st.integers(2 if op == "batch_norm" else 1, 4)), channels, *spatial)
        layouts = ["contiguous", "transposed"] + (["channels_last"] if len(shape) == 4 else [])
    layout = draw(st.sampled_from(layouts))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    return op, shape, layout, dtype, draw(st.sampled_from(["numba", None]))


def _groups(channels: int) -> int:
    return 4 if channels % 4 == 0 else 1


def _functional_call(op: str, lib: Any, x: Tensor, w: Tensor, b: Tensor, backend: str | None) -> Tensor:
    kw = {} if lib is F else {"backend": backend}
    if op == "layer_norm":
        return lib.layer_norm(x, (x.shape[-1],), w, b, 1e-5, **kw)
    if op == "rms_norm":
        return lib.rms_norm(x, (x.shape[-1],), w, 1e-6, **kw)
    if op == "group_norm":
        return lib.group_norm(x, _groups(x.shape[1]), w, b, 1e-5, **kw)
    if op == "batch_norm":
        return lib.batch_norm(x, None, None, w, b, True, 0.1, 1e-5, **kw)
    return lib.instance_norm(x, weight=w, bias=b, eps=1e-5, **kw)


@FUZZ
@given(call=_autocast_calls())
def test_generated_functional_calls_under_cpu_autocast(call: tuple) -> None:
    """normkit.functional under ``torch.autocast("cpu", dtype=torch.bfloat16)`` on generated
    shapes, layouts and input dtypes (float32 parameters): torch's dtypes, values and input /
    weight gradients within the bound against float64."""
    op, shape, layout, dtype, backend = call
    # A group of one element: the exact input gradient is 0 and every float32 result is eps-sized
    # noise amplified by rstd = 1/sqrt(eps) (torch 3e-5, numba 3e-5 or 6e-5 by the draw): two
    # noises, not a bound to judge by.
    assume(op != "group_norm" or shape[1] // _groups(shape[1]) * math.prod(shape[2:]) > 1)
    seed = ("autocast fuzz", call)
    width = shape[-1] if op in ("layer_norm", "rms_norm") else shape[1]
    base = _randn(*shape, seed=(seed, "x"), dtype=dtype)
    if layout == "transposed":
        x = base.transpose(0, -1).contiguous().transpose(0, -1)
    elif layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    else:
        x = base
    w, b = _randn(width, seed=(seed, "w")), _randn(width, seed=(seed, "b"))

    def run(lib: Any, cast: torch.dtype | None, autocast: bool) -> dict[str, Tensor]:
        xs = (x if cast is None else x.to(cast)).detach().requires_grad_()
        ws = (w if cast is None else w.to(cast)).detach().requires_grad_()
        bs = (b if cast is None else b.to(cast)).detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = _functional_call(op, lib, xs, ws, bs, backend)
        dy = _randn(*y.shape, seed=(seed, "dy"), dtype=y.dtype)
        grads = torch.autograd.grad(y, (xs, ws), dy)
        return {"y": y.detach(), "dx": grads[0], "dw": grads[1]}

    error = raised(lambda: run(F, None, True))
    if error is not None:  # torch refuses (a single value per group or channel): normkit too
        assert_same_error(error, raised(lambda: run(NF, None, True)), str(call))
        return
    _judge(run(NF, None, True), run(F, None, True), run(F, F64, False))


@pytest.mark.parametrize("backend", ["numba", None])
@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm", "GroupNorm"])
def test_checkpoint_recompute_under_cpu_autocast_gives_the_same_bits(name: str, backend: str | None) -> None:
    """A Linear (or 1x1 conv) and a normkit norm under CPU autocast bf16, run through
    ``torch.utils.checkpoint`` (the backward recomputes the forward under the saved autocast
    state): output and every gradient equal the plain run's bits."""
    make_torch, make_ours, shape = MODULES[name]
    seed = ("checkpoint autocast", name, backend)
    head = nn.Linear(shape[-1], shape[-1]) if name != "GroupNorm" else nn.Conv2d(shape[1], shape[1], 1)
    model = nn.Sequential(head, randomize_(make_ours(backend=backend), seed_of(seed)))
    x = _randn(*shape, seed=seed)
    results = []
    for checkpointed in (False, True):
        copied, xs = copy.deepcopy(model), x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = checkpoint.checkpoint(copied, xs, use_reentrant=False) if checkpointed else copied(xs)
        dy = _randn(*y.shape, seed=(seed, "dy"), dtype=y.dtype)
        results.append([y.detach(), *torch.autograd.grad(y, [xs, *copied.parameters()], dy)])
    for i, (plain, recomputed) in enumerate(zip(*results, strict=True)):
        assert torch.equal(plain, recomputed), f"result {i} differs after checkpoint's recompute"
