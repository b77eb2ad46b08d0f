"""The interpreter's share of the triton cases (tests/interpreter_share.py): float32 and float64
always, one low precision per case, every low precision somewhere, the same choice every time."""

from __future__ import annotations

import itertools
import types
from types import SimpleNamespace

import pytest
import torch

import interpreter_share

LOW = [
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
]
ALL = [(torch.float64, torch.float64), (torch.float32, torch.float32), *LOW]


def _item(case: str, dtype: torch.dtype, param_dtype: torch.dtype, backend: str) -> SimpleNamespace:
    params = {"case": SimpleNamespace(id=case), "dtype": dtype, "param_dtype": param_dtype, "backend": backend}
    nodeid = f"tests/test_x.py::test_y[{case}-{dtype}-{param_dtype}-{backend}]"
    return SimpleNamespace(
        callspec=SimpleNamespace(params=params), path="tests/test_x.py", originalname="test_y", nodeid=nodeid
    )


def _table() -> list[SimpleNamespace]:
    return [_item(f"case{i}", d, p, b) for i, (d, p), b in itertools.product(range(40), ALL, ["torch", "triton"])]


@pytest.fixture
def active(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(interpreter_share, "ACTIVE", True)


def test_one_low_precision_per_triton_case_and_every_one_somewhere(active: None) -> None:
    items = _table()
    dropped = {id(i) for i in interpreter_share.deselected(items)}
    kept = [i for i in items if id(i) not in dropped]
    assert all(i.callspec.params["backend"] == "triton" for i in items if id(i) in dropped)
    for case in range(40):
        mine = [
            i.callspec.params
            for i in kept
            if i.callspec.params["case"].id == f"case{case}" and i.callspec.params["backend"] == "triton"
        ]
        precisions = [(p["dtype"], p["param_dtype"]) for p in mine]
        assert ALL[0] in precisions and ALL[1] in precisions
        assert len([p for p in precisions if p in LOW]) == 1
    low_kept = {(i.callspec.params["dtype"], i.callspec.params["param_dtype"]) for i in kept} & set(LOW)
    assert low_kept == set(LOW)


def test_every_variant_runs_even_with_few_or_uneven_cases(active: None) -> None:
    """Two cases of four variants each and one of two: every variant still runs on a case."""
    items = [_item(f"case{i}", d, p, "triton") for i in range(2) for d, p in ALL]
    items += [_item("case9", d, p, "triton") for d, p in ALL[:4]]
    dropped = {id(i) for i in interpreter_share.deselected(items)}
    kept = {(i.callspec.params["dtype"], i.callspec.params["param_dtype"]) for i in items if id(i) not in dropped}
    assert kept == set(ALL)


def test_same_choice_in_any_order(active: None) -> None:
    items = _table()
    first = {i.nodeid for i in interpreter_share.deselected(items)}
    assert first == {i.nodeid for i in interpreter_share.deselected(items[::-1])}
    assert first == {i.nodeid for i in interpreter_share.deselected(_table())}


def test_nothing_dropped_when_inactive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(interpreter_share, "ACTIVE", False)
    assert interpreter_share.deselected(_table()) == []


# ---- the interpreter's language patch, once per launch -------------------------------------------

needs_interpreter = pytest.mark.skipif(not interpreter_share.INTERPRETED, reason="needs TRITON_INTERPRET=1")


class _Counting:
    """A stand-in for Triton's patch: counts its calls, returns a scope with restore()."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.restored = 0

    def __call__(self, fn):
        self.calls.append(fn.__name__)
        return SimpleNamespace(restore=lambda: setattr(self, "restored", self.restored + 1))


def _fn(name: str, **globals_):
    """A function named ``name`` whose module globals are ``globals_``."""
    return types.FunctionType((lambda: None).__code__, globals_, name)


def test_device_calls_skip_the_patch_only_when_the_launch_covers_their_modules() -> None:
    tl, core = types.ModuleType("tl"), types.ModuleType("core")
    plain = _Counting()
    patch = interpreter_share.once_per_launch(plain, (tl, core))
    launch = patch(_fn("kernel", tl=tl, x=1))
    assert isinstance(patch(_fn("helper", tl=tl)), interpreter_share._Nothing)
    patch(_fn("other", core=core))  # a module the launch did not patch: Triton's own patch
    patch(_fn("again", core=core, tl=tl))  # patched by the call before, in this launch
    assert plain.calls == ["kernel", "other"]
    launch.restore()
    assert plain.restored == 1
    patch(_fn("helper", tl=tl)).restore()  # no launch running now: patched as a launch
    assert plain.calls == ["kernel", "other", "helper"] and plain.restored == 2


@needs_interpreter
def test_patch_once_per_launch_gives_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """normkit's kernels with device-function calls (chunked LayerNorm, GroupNorm + GELU, both
    directions): every launch patched and restored, a small fraction of Triton's patches on
    every device call, the same bits, and the language builtins restored afterwards."""
    import triton.language as tl
    from triton.runtime import interpreter

    from normkit.ops.triton import row_norm as T

    plain = getattr(interpreter._patch_lang, "plain", interpreter._patch_lang)
    gen = torch.Generator().manual_seed(3)
    x, dy = torch.randn(5, 70, generator=gen), torch.randn(5, 70, generator=gen)
    w, b = torch.randn(70, generator=gen), torch.randn(70, generator=gen)
    image, dimage = torch.randn(2, 6, 3, 3, generator=gen), torch.randn(2, 6, 3, 3, generator=gen)
    gw, gb = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    monkeypatch.setenv(T.BLOCK_ENV_VAR, "16")
    patched, restored = [], []

    def counted(fn):
        patched.append(fn.__name__)
        scope = plain(fn)
        return SimpleNamespace(restore=lambda: (restored.append(fn.__name__), scope.restore()))

    def step(patch):
        monkeypatch.setattr(interpreter, "_patch_lang", patch)
        patched.clear()
        restored.clear()
        leaves = [t.clone().requires_grad_() for t in (x, w, b, image, gw, gb)]
        y = T.layer_norm(leaves[0], [70], leaves[1], leaves[2])
        z = T.group_norm_act(leaves[3], 3, leaves[4], leaves[5], 1e-5, "gelu")
        return [y, z, *torch.autograd.grad([y, z], leaves, [dy, dimage])], len(patched), len(restored)

    want, every_call, launches = step(counted)
    got, once, launches_once = step(interpreter_share.once_per_launch(counted, (tl, tl.core)))
    assert all(torch.equal(g, w_) for g, w_ in zip(got, want, strict=True))
    assert 0 < launches == launches_once <= once < every_call / 4
    assert all(tl.core.is_builtin(f) for f in (tl.load, tl.where, tl.exp))  # the launches restored tl
