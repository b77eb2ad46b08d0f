"""What the project claims runs is what runs.

- The README's table is :func:`normkit.support_matrix` as generated now (a backend changed
  without ``make support-matrix`` fails here), and it is the same on a machine without Triton.
- Every cell is true: on the CPU each call the torch and reference columns say runs does run,
  and each one they decline raises ``BackendError``; the triton column is what the registered
  backend's own checks say, under the interpreter, on real CPU tensors.
- The claims the issue found false: LayerNorm2d/RMSNorm2d run on triton (no copy of a
  channels_last input), ``stats_dtype=float64`` on triton is a clear ``BackendError``,
  LocalResponseNorm under CPU autocast returns torch's dtype on every backend.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import normkit
import normkit.functional as NF
from cases import BACKENDS, assert_close_to_reference, make_input, randomize_, seed_of
from normkit import support
from normkit.backends import _LAZY, _REGISTRY, OPS, BackendError, _lookup

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def matrix() -> support.SupportMatrix:
    return normkit.support_matrix()


def test_readme_table_is_the_generated_one(matrix: support.SupportMatrix) -> None:
    assert support.readme_table(README.read_text()) == matrix.to_markdown(), (
        "README.md's support table is stale: run `make support-matrix`"
    )


def test_every_op_of_every_backend_has_representative_calls() -> None:
    ops = set(NF.__all__)
    for name in ("torch", "reference"):
        ops |= set(_REGISTRY[name].ops)
    ops |= set(support._declared_ops("triton")) if "triton" in _LAZY else set()
    assert set(support.CALLS) == ops


def test_the_triton_column_does_not_depend_on_this_machine(
    matrix: support.SupportMatrix, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without Triton (or a GPU, or the interpreter) the cells are the same: only the
    availability line changes, and it says "not available here", not "unsupported"."""
    monkeypatch.delitem(_REGISTRY, "triton", raising=False)
    loader = _LAZY["triton"][1]
    monkeypatch.setitem(_LAZY, "triton", (lambda: False, loader))
    bare = normkit.support_matrix(["triton"])
    assert bare.available == {"triton": False}
    assert bare.cells == tuple(c for c in matrix.cells if c.backend == "triton")
    assert bare.availability() == [
        "triton: not available here (its column says what it runs where it is available)"
    ]


def _real_call(op: str, build: support.Build, dtype: torch.dtype) -> tuple[tuple[Any, ...], dict[str, Any]]:
    maker = support._Maker(dtype, "cpu")
    maker.filled = True
    return build(maker)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_cpu_cells_of_the_builtin_backends_are_what_runs(matrix: support.SupportMatrix, backend: str) -> None:
    for op, variants in support.CALLS.items():
        for variant, build in variants:
            for dtype in support.DTYPES:
                args, kwargs = _real_call(op, build, dtype)
                if matrix.runs(backend, op, variant, dtype, device="cpu"):
                    OPS[op].function(*args, backend=backend, **kwargs)  # must not raise
                else:
                    with pytest.raises(BackendError):
                        OPS[op].function(*args, backend=backend, **kwargs)


class _Reached(Exception):
    pass


@pytest.mark.skipif("triton" not in BACKENDS, reason="the triton backend is not available here")
def test_triton_cells_are_the_registered_backends_checks(
    matrix: support.SupportMatrix, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the interpreter the registered backend, on real CPU tensors, accepts exactly the
    calls the GPU column claims (its CPU tensors stand for CUDA ones); no kernel runs."""
    backend = _lookup("triton")
    assert backend is not None
    assert {op: impl.unsupported for op, impl in backend.ops.items()} == support._declared_ops("triton")

    def reached(*args: Any, **kwargs: Any) -> None:
        raise _Reached

    ops = {op: impl._replace(fn=reached) for op, impl in backend.ops.items()}
    monkeypatch.setitem(_REGISTRY, "triton", dataclasses.replace(backend, ops=ops))
    for op, variants in support.CALLS.items():
        for variant, build in variants:
            for dtype in support.DTYPES:
                args, kwargs = _real_call(op, build, dtype)
                try:
                    OPS[op].function(*args, backend="triton", **kwargs)
                    ran = False  # returned without reaching a kernel: impossible
                except _Reached:
                    ran = True
                except BackendError:
                    ran = False
                assert ran == matrix.runs("triton", op, variant, dtype, device="cuda"), f"{op} {variant} {dtype}"


# ---- the claims that were false ----------------------------------------------------------------


def test_matrix_answers_the_issue_s_questions(matrix: support.SupportMatrix) -> None:
    assert matrix.runs("triton", "normalize", "channels (LayerNorm2d)", torch.bfloat16)
    assert matrix.runs("triton", "normalize", "channels, center=False (RMSNorm2d)", torch.float16)
    assert not matrix.runs("triton", "layer_norm", "stats_dtype=float64", torch.float32)
    assert matrix.runs("torch", "local_response_norm", "4-D input", torch.bfloat16, device="cuda")
    assert not matrix.runs("torch", "local_response_norm", "4-D input", torch.bfloat16, device="cpu")
    text = str(matrix)
    assert "float64 is not supported" in text and "use backend='torch' or 'reference'" in text


@pytest.mark.skipif("triton" not in BACKENDS, reason="the triton backend is not available here")
def test_stats_dtype_float64_on_triton_is_a_clear_error() -> None:
    x = make_input((3, 8), torch.float32, seed_of("f64 triton"), requires_grad=False)
    before = x.clone()
    with pytest.raises(BackendError, match=r"float64 is not supported .*stats_dtype=torch.float64 use backend='torch'"):
        NF.layer_norm(x, (8,), stats_dtype=torch.float64, backend="triton")
    with pytest.raises(BackendError, match="float64 is not supported"):
        normkit.LayerNorm2d(4, backend="triton", stats_dtype=torch.float64)(torch.randn(2, 4, 3, 3))
    assert torch.equal(x, before)


@pytest.mark.skipif("triton" not in BACKENDS, reason="the triton backend is not available here")
@pytest.mark.parametrize("name", ["LayerNorm2d", "RMSNorm2d"])
def test_channels_first_norms_run_on_triton_without_copying_channels_last_input(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from normkit.ops.triton import row_norm

    seen: list[torch.Tensor] = []
    launch = row_norm.row_norm_fwd

    def spy(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(x)
        return launch(x, *args, **kwargs)

    monkeypatch.setattr(row_norm, "row_norm_fwd", spy)
    module = randomize_(getattr(normkit, name)(4, backend="triton"), seed_of("triton 2d", name))
    x = make_input((2, 4, 3, 5), torch.float32, seed_of("triton 2d x", name), "channels_last", requires_grad=False)
    y = module(x)
    assert seen and seen[-1].data_ptr() == x.data_ptr(), "the kernel read a copy of the channels_last input"
    assert y.is_contiguous(memory_format=torch.channels_last)
    expected = getattr(normkit, name)(4, backend="reference")
    expected.load_state_dict(module.state_dict())
    torch.testing.assert_close(y, expected(x), rtol=2e-5, atol=2e-5)


# ---- LocalResponseNorm under autocast ----------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 6, 7), (2, 6, 4, 5), (1, 6, 2, 3, 4)], ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("torch", "reference")])
def test_local_response_norm_under_cpu_autocast_matches_torch(
    backend: str, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    """torch returns float32 for 4-D+ low-precision input under CPU autocast (its avg_pool3d
    runs in float32 there); every backend returns torch's dtype, within 2x torch's error
    against float64, and backend="torch" runs what torch runs."""
    x = make_input(shape, dtype, seed_of("lrn autocast", backend, dtype, shape), requires_grad=False)
    reference = F.local_response_norm(x.double(), 3, alpha=1.0)
    results: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "torch": lambda t: F.local_response_norm(t, 3, alpha=1.0),
        "functional": lambda t: NF.local_response_norm(t, 3, alpha=1.0, backend=backend),
        "module": normkit.LocalResponseNorm(3, alpha=1.0, backend=backend),
    }
    outs = {}
    grads = {}
    for name, fn in results.items():
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(xi)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype))
        outs[name], grads[name] = y, xi.grad
    xr = x.double().requires_grad_()
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1)).double()
    F.local_response_norm(xr, 3, alpha=1.0).backward(dy)
    for name in ("functional", "module"):
        assert outs[name].dtype == outs["torch"].dtype, f"{name}: {outs[name].dtype} != torch's {outs['torch'].dtype}"
        assert_close_to_reference(outs[name], outs["torch"], reference, dtype=dtype, name=f"{name} output")
        assert_close_to_reference(grads[name], grads["torch"], xr.grad, dtype=dtype, name=f"{name} input gradient")


# ---- the command line --------------------------------------------------------------------------


def test_cli_support_prints_the_matrix(matrix: support.SupportMatrix, capsys: pytest.CaptureFixture[str]) -> None:
    from normkit.tools.cli import main

    assert main(["support"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["op", "call", "torch"]
    assert "[1] " in out and out.rstrip().splitlines()[-1].startswith(matrix.backends[-1] + ":")
    assert main(["support", "--markdown"]) == 0
    assert capsys.readouterr().out == matrix.to_markdown()
