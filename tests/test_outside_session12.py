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

Each defect found is a strict xfail whose reason is the minimal repro and the suspected cause.
"""

from __future__ import annotations

import contextlib
import copy
import io
import pickle
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import normkit
import normkit.functional as NF
from _outside import NUMBA_ATTACK_MARKS
from cases import randomize_, seed_of
from normkit.testing import assert_within_bound

pytestmark = NUMBA_ATTACK_MARKS

F64 = torch.float64
BACKEND_NAMES = [None, "auto", "torch", "numba", "reference"]
FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


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
    "InstanceNorm1d": (lambda: nn.InstanceNorm1d(12, affine=True),
                       lambda **kw: normkit.InstanceNorm1d(12, affine=True, **kw), (3, 12, 17)),
    "InstanceNorm2d": (lambda: nn.InstanceNorm2d(12, affine=True, track_running_stats=True),
                       lambda **kw: normkit.InstanceNorm2d(12, affine=True, track_running_stats=True, **kw),
                       (3, 12, 5, 7)),
}


def _pair(name: str, backend: str | None, seed: object) -> tuple[nn.Module, nn.Module]:
    """torch.nn's module (random parameters and statistics) and normkit's twin loaded from it."""
    make_torch, make_ours, _ = MODULES[name]
    theirs = randomize_(make_torch(), seed_of(seed))
    ours = make_ours(backend=backend)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _run(module: nn.Module, inputs: list[Tensor], seed: object, ctx: Callable[[], Any] = contextlib.nullcontext
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
    got.update({f"dx{i}": g for i, g in enumerate(grads[:len(leaves)])})
    got.update({f"d.{n}": g for (n, p), g in zip(
        [(n, p) for n, p in module.named_parameters() if p.requires_grad], grads[len(leaves):], strict=True)})
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


def _mixed(theirs: nn.Module, ours: nn.Module, x: Tensor, mix: str, low: torch.dtype, backend: str | None
           ) -> Tensor:
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
    "add_layer_norm": (lambda x, r, w, b: NF.add_layer_norm(x, r, (x.shape[-1],), w, b, 1e-5),
                       lambda x, r, w, b: (F.layer_norm(x + r, (x.shape[-1],), w, b, 1e-5), x + r)),
    "add_rms_norm": (lambda x, r, w, b: NF.add_rms_norm(x, r, (x.shape[-1],), w, 1e-6),
                     lambda x, r, w, b: (F.rms_norm(x + r, (x.shape[-1],), w, 1e-6), x + r)),
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
