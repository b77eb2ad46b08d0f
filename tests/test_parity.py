"""Parity with torch.nn and torch.nn.functional, for every case x backend x dtype of cases.py.

Each module test trains a torch module and its normkit twin (same random parameters and
statistics) for a few steps on the same inputs and random upstream gradients, then evaluates
them, and compares at every step the output, the gradients of input, weight and bias, and the
running statistics. float64/float32 are compared with torch directly; bf16/fp16 against torch in
float64 with the self-calibrating bound of ``cases.assert_close_to_reference``.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import normkit
import normkit.functional as NF
from cases import (
    BACKENDS,
    DTYPES,
    FUNCTIONAL_CASES,
    FUSED_ADD_CASES,
    LAZY_CASES,
    LOW_PRECISION,
    MUST_RUN,
    NORM_CASES,
    REFERENCE,
    STEPS,
    TOLERANCES,
    FunctionalCase,
    FusedAddCase,
    NormCase,
    assert_close_to_reference,
    make_input,
    randomize_,
    run_or_skip,
    seed_of,
    torch_rms_eps,
)
from normkit.backends import BackendError
from normkit.norms import NORMS
from normkit.tools.check import CASES as CHECK_CASES

pytestmark = [
    # torch's rms_norm warns that a bf16 input with a float32 weight takes its unfused path
    pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight:UserWarning"),
    # torch's LazyInstanceNorm with affine=False never learns num_features and warns at each call
    pytest.mark.filterwarnings("ignore:input's size at dim=1 does not match num_features:UserWarning"),
]

_DTYPE_IDS = {d: str(d).removeprefix("torch.") for d in DTYPES}
# (input dtype, parameter dtype): every dtype on its own, and bf16/fp16 inputs into float32
# modules, the mixed mode ATen supports on the CPU.
_PRECISIONS = [(d, d) for d in DTYPES] + [(d, torch.float32) for d in LOW_PRECISION]
_PRECISION_PARAMS = [
    pytest.param(d, p, id=_DTYPE_IDS[d] if d == p else f"{_DTYPE_IDS[d]}-params_{_DTYPE_IDS[p]}")
    for d, p in _PRECISIONS
]
# normkit modules without a torch.nn namesake, and the torch class they extend
_TWIN = {"FusedAddLayerNorm": "LayerNorm", "FusedAddRMSNorm": "RMSNorm"}
# The drop-in twins of torch.nn. Layers torch lacks (LayerNorm2d, FrozenBatchNorm2d, ...) have
# no torch signature, state_dict or repr to match: tests/test_layers.py compares their math.
_MODULE_NAMES = sorted(
    n for n in normkit.__all__ if isinstance(getattr(normkit, n), type) and issubclass(getattr(normkit, n), nn.Module)
    and (hasattr(nn, n) or n in _TWIN)
)
# Keyword-only options beyond torch's, after ``backend``.
# Every module has the precision controls; some have more.
_PRECISION = ["stats_dtype", "out_dtype"]
_OPTIONS = {"RMSNorm": _PRECISION + ["cast", "weight_offset"],
            "FusedAddRMSNorm": _PRECISION + ["cast", "weight_offset"],
            "GroupNorm": _PRECISION + ["group_size"]}
# torch's required arguments that normkit lets default to None for an option (GroupNorm's
# num_groups and num_channels, so that ``GroupNorm(num_channels=64, group_size=16)`` works).
_NONE_DEFAULTS = {"GroupNorm": {"num_groups", "num_channels"}}


def _declined(backend: str, actual: object, expected: object, where: str) -> bool:
    """Whether normkit's backend declined the call (BackendError) where it may: anywhere for an
    optional backend (the test is skipped), only where torch cannot run the call either for the
    built-in CPU backends (which must run everything torch runs)."""
    if not isinstance(actual, BackendError):
        return False
    if isinstance(expected, Exception):
        return True
    if backend in MUST_RUN:
        raise AssertionError(f"{where}: built-in backend {backend!r} declined a call torch runs") from actual
    pytest.skip(f"backend {backend!r} declines this call: {actual}")


def _upstream(y: Tensor, seed: int, via: torch.dtype) -> Tensor:
    """A random upstream gradient for ``y``, never ones (``y.sum().backward()`` would make a
    norm's input gradient zero). Rounded through ``via``, the dtype of the run under test, so the
    float64 reference gets exactly the values the low-precision runs get."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(y.shape, generator=gen, dtype=torch.float64).to(via).to(y.dtype)


def _compare(
    results: dict[str, dict[str, Tensor] | Exception], dtype: torch.dtype, where: str, backend: str
) -> None:
    """Compare normkit's results with torch's (and, in low precision, both with float64's)."""
    expected, actual, reference = results["torch"], results["normkit"], results.get("reference")
    if _declined(backend, actual, expected, where):
        return
    if isinstance(actual, Exception):
        if not isinstance(expected, Exception):
            raise AssertionError(f"{where}: normkit raised but torch did not") from actual
        assert type(actual) is type(expected) and str(actual) == str(expected), (
            f"{where}: normkit raised {type(actual).__name__}({actual}), torch {type(expected).__name__}({expected})"
        )
        return
    if isinstance(expected, Exception):
        # torch has no kernel for this call (LRN of bf16 5-D input on the CPU): normkit may
        # still compute it, judged against float64 alone.
        assert dtype in LOW_PRECISION and isinstance(reference, dict), (
            f"{where}: torch raised {type(expected).__name__}({expected}) but normkit did not"
        )
        expected = {}
    assert isinstance(reference, dict) or reference is None, f"{where}: the float64 reference raised {reference}"
    assert set(actual) == set(expected) or not expected, \
        f"{where}: results {sorted(actual)} != torch's {sorted(expected)}"
    for key, value in actual.items():
        _assert_both_or_neither(value, expected.get(key, value), f"{where}: {key}")
        if value is not None:
            assert_close_to_reference(
                value, expected.get(key), None if reference is None else reference[key], dtype=dtype,
                name=f"{where}: {key}"
            )


def _assert_both_or_neither(actual: Tensor | None, expected: Tensor | None, where: str) -> None:
    """A gradient torch computes (zeros for an empty batch included) normkit must compute too."""
    if (actual is None) != (expected is None):
        raise AssertionError(f"{where}: normkit gives {'no tensor' if actual is None else 'a tensor'}, "
                             f"torch {'none' if expected is None else 'a tensor'}")


def _module_step(
    module: nn.Module, make_x: Callable[[], Tensor], seed: int, dtype: torch.dtype
) -> dict[str, Tensor] | Exception:
    """One forward/backward of ``module``: its output, the gradients of input and parameters,
    and its running statistics after the call."""
    for p in module.parameters():
        p.grad = None
    x = make_x()
    try:
        y = module(x)
    except Exception as e:  # compared with torch's exception by _compare
        return e
    y.backward(_upstream(y, seed, dtype))
    out = {"out": y.detach(), "grad_input": x.grad}
    out.update({f"grad_{name}": p.grad for name, p in module.named_parameters()})
    out.update({name: b.clone() for name, b in module.named_buffers()})
    return out


def _check_steps(
    case: NormCase, dtype: torch.dtype, backend: str, mods: dict[str, nn.Module], modes: list[str], start: int = 0
) -> None:
    """Run ``modes`` ("train"/"eval") steps on every module of ``mods`` and compare each step."""
    for i, mode in enumerate(modes, start):
        seed = seed_of(case.id, i)

        def make_x(float64: bool = False, seed: int = seed) -> Tensor:
            x = case.input(dtype, seed, requires_grad=not float64)
            return x.detach().double().requires_grad_() if float64 else x

        results: dict[str, Any] = {}
        for who, module in mods.items():
            module.train(mode == "train")
            results[who] = _module_step(module, (lambda: make_x(True)) if who in ("reference", "oracle") else make_x,
                                        seed_of(case.id, i, "dy"), dtype)
        where = f"step {i} ({mode})"
        _compare(results, dtype, where, backend)
        if "oracle" in results:  # normkit.reference in float64 against torch in float64
            tol = TOLERANCES["oracle"]
            for key, value in results["reference"].items():
                _assert_both_or_neither(results["oracle"][key], value, f"{where}: oracle {key}")
                if value is not None:
                    torch.testing.assert_close(results["oracle"][key], value, rtol=tol.rtol, atol=tol.atol,
                                               msg=lambda m, key=key, where=where: f"{where}: oracle {key}: {m}")


def _float64_twins(torch_mod: nn.Module, nk_mod: nn.Module, dtype: torch.dtype) -> dict[str, nn.Module]:
    """The float64 reference (torch) and, for bf16, the float64 oracle (normkit.reference)."""
    if dtype not in LOW_PRECISION:
        return {}
    reference = copy.deepcopy(torch_mod).double()
    if getattr(reference, "eps", 0.0) is None:  # RMSNorm's eps=None depends on the input's dtype
        reference.eps = torch_rms_eps(dtype)
    twins = {"reference": reference}
    if dtype == torch.bfloat16 and "reference" in BACKENDS:
        twins["oracle"] = copy.deepcopy(nk_mod).double()
        twins["oracle"].backend = "reference"
        if getattr(twins["oracle"], "eps", 0.0) is None:
            twins["oracle"].eps = torch_rms_eps(dtype)
    return twins


def _is_stateful(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._NormBase)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "param_dtype"), _PRECISION_PARAMS)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in NORM_CASES])
def test_module_matches_torch(case: NormCase, dtype: torch.dtype, param_dtype: torch.dtype, backend: str) -> None:
    torch_mod = randomize_(case.build(nn), seed_of(case.id)).to(param_dtype)
    nk_mod = case.build(normkit, backend=backend).to(param_dtype)
    nk_mod.load_state_dict(torch_mod.state_dict())
    mods = {"torch": torch_mod, "normkit": nk_mod, **_float64_twins(torch_mod, nk_mod, dtype)}
    # Stateful modules: several training steps (running statistics mix batches), then eval.
    modes = ["train"] * STEPS + ["eval"] if _is_stateful(torch_mod) else ["train"]
    _check_steps(case, dtype, backend, mods, modes)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "param_dtype"), _PRECISION_PARAMS)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in LAZY_CASES])
def test_lazy_module_becomes_normkit_module_and_matches_torch(
    case: NormCase, dtype: torch.dtype, param_dtype: torch.dtype, backend: str
) -> None:
    # Lazy modules take their parameters' dtype from the constructor, not from the input.
    torch_mod = case.build(nn, dtype=param_dtype)
    nk_mod = case.build(normkit, backend=backend, dtype=param_dtype)
    mods = {"torch": torch_mod, "normkit": nk_mod}
    if dtype in LOW_PRECISION:
        mods["reference"] = case.build(nn, dtype=torch.float64)
    # The first call materializes the parameters (weight 1, bias 0) and converts the class.
    _check_steps(case, dtype, backend, mods, ["train"])
    become = case.module.removeprefix("Lazy")
    assert type(nk_mod) is getattr(normkit, become), f"{case.module} became {type(nk_mod).__name__}"
    assert type(torch_mod) is getattr(nn, become)
    assert nk_mod.backend == backend
    # Then random parameters and statistics in all of them, and more steps.
    randomize_(torch_mod, seed_of(case.id))
    for who in mods:
        if who != "torch":
            mods[who].load_state_dict(torch_mod.state_dict())
    modes = ["train"] * (STEPS - 1) + ["eval"]
    _check_steps(case, dtype, backend, mods, modes, start=1)


# ---- the functional API ------------------------------------------------------------------------


def _functional_call(
    case: FunctionalCase, fn: Callable[..., Any], dtype: torch.dtype, param_dtype: torch.dtype, float64: bool, **kw: Any
) -> dict[str, Tensor] | Exception:
    """Call ``fn`` (F.<op> or normkit.functional.<op>) as ``case`` says; its output, gradients
    and (updated in place) running statistics."""
    o, seed = case.options, seed_of(case.id)
    x = make_input(case.shape, dtype, seed, case.layout)
    if float64:
        x, param_dtype = x.detach().double().requires_grad_(), torch.float64
    gen = torch.Generator().manual_seed(seed + 1)

    def rand(shape: tuple[int, ...], lo: float = 0.0, spread: float = 1.0, normal: bool = True) -> Tensor:
        t = (torch.randn(shape, generator=gen, dtype=torch.float64) if normal
             else torch.rand(shape, generator=gen, dtype=torch.float64))
        return (t * spread + lo).to(param_dtype)

    op = case.op.removesuffix("_act")  # a norm + activation takes its norm's arguments
    pshape = tuple(o["normalized_shape"]) if op in ("layer_norm", "rms_norm") else (case.shape[1],)
    params: dict[str, Tensor | None] = {
        name: rand(pshape).requires_grad_() if o.get(name) else None for name in ("weight", "bias")
    }
    stats = (rand(pshape, spread=0.5), rand(pshape, lo=0.5, normal=False)) if o.get("stats") else (None, None)
    eps = o.get("eps", 1e-5)
    if op == "batch_norm":
        args = (x, *stats, params["weight"], params["bias"], o["training"], o.get("momentum", 0.1), eps)
    elif op == "instance_norm":
        args = (x, *stats, params["weight"], params["bias"], o["use_input_stats"], o.get("momentum", 0.1), eps)
    elif op == "layer_norm":
        args = (x, list(o["normalized_shape"]), params["weight"], params["bias"], eps)
    elif op == "rms_norm":
        rms_eps = o.get("eps", torch_rms_eps(dtype) if float64 else None)  # None depends on the input's dtype
        args = (x, list(o["normalized_shape"]), params["weight"], rms_eps)
    elif op == "group_norm":
        args = (x, o["num_groups"], params["weight"], params["bias"], eps)
    elif op == "local_response_norm":
        args = (x, o["size"], o.get("alpha", 1e-4), o.get("beta", 0.75), o.get("k", 1.0))
    else:
        raise KeyError(f"no functional call for {op!r}")
    try:
        y = fn(*args, **kw)
    except Exception as e:  # compared with torch's exception by _compare
        return e
    y.backward(_upstream(y, seed_of(case.id, "dy"), dtype))
    out = {"out": y.detach(), "grad_input": x.grad}
    out.update({f"grad_{n}": p.grad for n, p in params.items() if p is not None})
    if stats[0] is not None:
        out.update(running_mean=stats[0], running_var=stats[1])
    return out


def _torch_functional(case: FunctionalCase) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    """(torch's spelling, normkit's) of the case's op: F.<op>, or for a norm + activation
    F.<norm> followed by the activation."""
    if not case.op.endswith("_act"):
        return getattr(F, case.op), getattr(NF, case.op)
    norm, act = getattr(F, case.op.removesuffix("_act")), case.options["act"]
    return (lambda *args: NF.activate(act, norm(*args))), functools.partial(getattr(NF, case.op), act=act)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_DTYPE_IDS.get)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in FUNCTIONAL_CASES])
def test_functional_matches_torch(case: FunctionalCase, dtype: torch.dtype, backend: str) -> None:
    param_dtype = torch.float32 if dtype in LOW_PRECISION else dtype  # bf16/fp16 input, fp32 weight
    theirs, ours = _torch_functional(case)
    results = {
        "torch": _functional_call(case, theirs, dtype, param_dtype, False),
        "normkit": _functional_call(case, ours, dtype, param_dtype, False, backend=backend),
    }
    if dtype in LOW_PRECISION:
        results["reference"] = _functional_call(case, theirs, dtype, param_dtype, True)
    _compare(results, dtype, case.op, backend)


# ---- the table of norms -------------------------------------------------------------------------


class _With:
    """A functional namespace with keywords bound: ``_With(NF, backend="torch").layer_norm``."""

    def __init__(self, namespace: Any, **kwargs: Any) -> None:
        self.namespace, self.kwargs = namespace, kwargs

    def __getattr__(self, op: str) -> Callable[..., Any]:
        return functools.partial(getattr(self.namespace, op), **self.kwargs)


def _table_call(name: str, f: Any, dtype: torch.dtype, param_dtype: torch.dtype,
                float64: bool) -> dict[str, Tensor] | Exception:
    """The example of row ``name`` through the namespace ``f``: output and gradients, from random
    parameters and a random upstream gradient."""
    spec = NORMS[name]
    example, seed = spec.example(), seed_of("table", name)
    x = make_input(example.shape, dtype, seed)
    # the per-call tensors (shift/scale, gate) in the input's dtype, the parameters in param_dtype
    extras = [make_input(shape, dtype, seed + 2 + i) for i, shape in enumerate(example.input_shapes)]
    if float64:
        x, param_dtype = x.detach().double().requires_grad_(), torch.float64
        extras = [t.detach().double().requires_grad_() for t in extras]
    gen = torch.Generator().manual_seed(seed + 1)
    params = [torch.randn(shape, generator=gen, dtype=torch.float64).to(param_dtype).requires_grad_()
              for shape in example.param_shapes]
    try:
        y = example.call(f, x, *extras, *params)
    except Exception as e:  # compared with the oracle's exception by _compare
        return e
    y.backward(_upstream(y, seed_of("table", name, "dy"), dtype))
    names = [e.name for e in spec.inputs] + list(spec.params)
    return {"out": y.detach(), "grad_input": x.grad,
            **{f"grad_{n}": t.grad for n, t in zip(names, [*extras, *params], strict=True)}}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_DTYPE_IDS.get)
@pytest.mark.parametrize("name", list(NORMS))
def test_every_norm_of_the_table_matches_its_oracle(name: str, dtype: torch.dtype, backend: str) -> None:
    """Each row's example on each backend against its oracle: torch's twin, or where torch has
    none normkit.reference (in float64 for the truth, in ``dtype`` for the oracle's own error)."""
    oracle = F if NORMS[name].twin is not None else REFERENCE
    param_dtype = torch.float32 if dtype in LOW_PRECISION else dtype  # bf16/fp16 input, fp32 parameters
    results = {
        "torch": _table_call(name, oracle, dtype, param_dtype, False),
        "normkit": _table_call(name, _With(NF, backend=backend), dtype, param_dtype, False),
    }
    if dtype in LOW_PRECISION:
        results["reference"] = _table_call(name, oracle, dtype, param_dtype, True)
    _compare(results, dtype, name, backend)


# ---- residual-add norms ------------------------------------------------------------------------


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The less precise of two dtypes: the one a computation passing through both is judged in."""
    order = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
    return max(a, b, key=lambda d: (order.index(d) >= 2, torch.finfo(d).eps))


def _fused_add(
    case: FusedAddCase, dtype: torch.dtype, api: str, backend: str | None, float64: bool = False
) -> dict[str, Tensor]:
    """``(y, residual_out)`` of the fused op (``api`` "functional" or "module") or, for
    ``backend=None``, of the unfused torch composition (in float64 throughout when ``float64``),
    with gradients into x, residual, weight and bias from random upstream gradients on both
    outputs."""
    seed, layer_norm = seed_of(case.id), case.op == "add_layer_norm"
    res_dtype = case.residual_dtype or dtype
    param_dtype = torch.float32 if dtype in LOW_PRECISION else dtype  # the module runs in fp32
    x = make_input(case.shape, dtype, seed, case.layout, scale=case.scale)
    residual = make_input(case.shape, res_dtype, seed + 1, case.layout, scale=case.scale) if case.residual else None
    gen = torch.Generator().manual_seed(seed + 2)
    weight = torch.randn(case.normalized_shape, generator=gen).to(param_dtype) if case.affine else None
    bias = torch.randn(case.normalized_shape, generator=gen).to(param_dtype) if case.affine and layer_norm else None
    if float64:
        x, residual, weight, bias = (None if t is None else t.detach().double() for t in (x, residual, weight, bias))
        x.requires_grad_()
        if residual is not None:
            residual.requires_grad_()
    params = [p.requires_grad_() for p in (weight, bias) if p is not None]
    if backend is None:  # the unfused composition: add in residual_dtype, normalize, cast back
        stream = torch.float64 if float64 else res_dtype
        residual_out = x.to(stream) if residual is None else x.to(stream) + residual.to(stream)
        # the norm runs at the residual stream's precision (fp32 weights with a bf16 stream: ATen's
        # mixed mode), with RMSNorm's eps=None of that stream (as the low-precision run's, in float64)
        w, b = (p if p is None or stream in LOW_PRECISION else p.to(stream) for p in (weight, bias))
        rms_eps = torch_rms_eps(res_dtype) if float64 else None
        y = F.layer_norm(residual_out, case.normalized_shape, w, b, 1e-5) if layer_norm else F.rms_norm(
            residual_out, case.normalized_shape, w, rms_eps)
        y = y.to(x.dtype)
    elif api == "functional":
        if layer_norm:
            y, residual_out = NF.add_layer_norm(x, residual, case.normalized_shape, weight, bias, 1e-5,
                                                residual_dtype=case.residual_dtype, backend=backend)
        else:
            y, residual_out = NF.add_rms_norm(x, residual, case.normalized_shape, weight,
                                              residual_dtype=case.residual_dtype, backend=backend)
    else:
        module = getattr(normkit, case.module)(case.normalized_shape, elementwise_affine=case.affine,
                                               dtype=param_dtype, residual_dtype=case.residual_dtype,
                                               backend=backend)
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_({"weight": weight, "bias": bias}[name])
        params = list(module.parameters())
        y, residual_out = module(x, residual)
    dy = _upstream(y, seed_of(case.id, "dy"), dtype)
    dres = _upstream(residual_out, seed_of(case.id, "dres"), res_dtype)
    inputs = [x] + ([residual] if residual is not None else []) + params
    grads = torch.autograd.grad((y, residual_out), inputs, (dy, dres))
    names = (["grad_x"] + (["grad_residual"] if residual is not None else [])
             + ["grad_weight", "grad_bias"][: len(params)])
    return {"out": y.detach(), "residual_out": residual_out.detach(), **dict(zip(names, grads, strict=True))}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("api", ["functional", "module"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_DTYPE_IDS.get)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in FUSED_ADD_CASES])
def test_fused_add_norm_matches_unfused_torch(case: FusedAddCase, dtype: torch.dtype, api: str, backend: str) -> None:
    expected = _fused_add(case, dtype, api, None)
    actual = run_or_skip(backend, lambda: _fused_add(case, dtype, api, backend))
    reference = _fused_add(case, dtype, api, None, float64=True) if dtype in LOW_PRECISION else None
    res_dtype = case.residual_dtype or dtype
    assert actual["out"].dtype == dtype and actual["residual_out"].dtype == res_dtype
    assert set(actual) == set(expected)
    # Everything passes through both x's dtype and the residual stream's: judge it in the coarser.
    judged = _coarser(dtype, res_dtype)
    for key, value in actual.items():
        assert_close_to_reference(value, expected[key], None if reference is None else reference[key],
                                  dtype=judged, name=f"{api}: {key}")


# ---- signatures, classes, state_dict keys, repr --------------------------------------------------


def _plain(sig: inspect.Signature) -> list[tuple[str, Any, Any]]:
    """Names, kinds and defaults (annotations differ in form: strings under future annotations)."""
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


_KW = inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("name", _MODULE_NAMES)
def test_module_signature_is_torchs_plus_backend(name: str) -> None:
    ours = _plain(inspect.signature(getattr(normkit, name).__init__))
    theirs = _plain(inspect.signature(getattr(nn, _TWIN.get(name, name)).__init__))
    theirs = [(n, k, None if n in _NONE_DEFAULTS.get(name, ()) else d) for n, k, d in theirs]
    extra = ["residual_dtype", "backend"] if name in _TWIN else ["backend"]
    options = _OPTIONS.get(name, _PRECISION)
    assert ours[:len(ours) - len(options)] == theirs + [(e, _KW, None) for e in extra]
    assert [(n, k) for n, k, _ in ours[len(ours) - len(options):]] == [(o, _KW) for o in options]


@pytest.mark.parametrize("name", NF.__all__)
def test_functional_signature_is_torchs_plus_backend(name: str) -> None:
    ours = _plain(inspect.signature(getattr(NF, name)))
    assert ours[-2:] == [("stats_dtype", _KW, None), ("out_dtype", _KW, None)]  # precision controls
    ours = ours[:-2]
    assert ours[-1] == ("backend", _KW, None)
    if name == "normalize":  # no torch twin (F.normalize is the L_p one): tested in test_layers.py
        return
    if name in NORMS and NORMS[name].twin is None:  # no torch signature to match
        return
    if name in normkit.functional_blocks.__all__:  # the fused blocks torch lacks (qk, sandwich): no signature either
        return
    if name.endswith("_act"):  # the norm's signature, then the activation
        default = {"batch_norm_act": "relu", "group_norm_act": "silu"}[name]
        norm = _plain(inspect.signature(getattr(F, name.removesuffix("_act"))))
        assert ours == norm + [("act", _KW, default), ("backend", _KW, None)]
        return
    if name in ("add_layer_norm", "add_rms_norm"):  # no torch twin: the norm's arguments after (x, residual)
        norm = _plain(inspect.signature(getattr(F, name.removeprefix("add_"))))
        assert ours[:2] == [("x", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
                            ("residual", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty)]
        assert ours[2:] == norm[1:] + [("residual_dtype", _KW, None), ("backend", _KW, None)]
        return
    assert ours == _plain(inspect.signature(getattr(F, name))) + [("backend", _KW, None)]


def _example_args(name: str) -> tuple[Any, ...]:
    """Constructor arguments of ``name`` from the table of cases."""
    for case in NORM_CASES + LAZY_CASES:
        if case.module == name:
            return case.args
    twin = _TWIN[name]
    return next(c.args for c in NORM_CASES if c.module == twin)


@pytest.mark.parametrize("name", _MODULE_NAMES)
def test_module_is_a_torch_module_with_torchs_state_dict_and_repr(name: str) -> None:
    args = _example_args(name)
    ours, theirs = getattr(normkit, name)(*args), getattr(nn, _TWIN.get(name, name))(*args)
    assert isinstance(ours, type(theirs)), f"normkit.{name} is not a torch.nn.{type(theirs).__name__}"
    assert list(ours.state_dict()) == list(theirs.state_dict())
    if name not in _TWIN:
        assert repr(ours) == repr(theirs)
    named = getattr(normkit, name)(*args, backend="reference")
    assert "backend='reference'" in repr(named)
    assert list(named.state_dict()) == list(theirs.state_dict())


def test_every_norm_and_module_has_cases() -> None:
    """A new module class or functional op fails here until it has cases."""
    covered = {c.module for c in NORM_CASES + LAZY_CASES} | {c.module for c in FUSED_ADD_CASES}
    assert set(_MODULE_NAMES) <= covered, f"modules without cases: {sorted(set(_MODULE_NAMES) - covered)}"
    # (every row of the table of norms is a case of test_every_norm_of_the_table_matches_its_oracle)
    ops = {c.op for c in NORM_CASES} | {c.op for c in FUNCTIONAL_CASES} | set(NORMS)
    # (the fused multi-tensor blocks, qk_rms_norm and sandwich_rms_norm, are cases of normkit check)
    ops |= {c.op for c in CHECK_CASES}
    missing = set(NF.__all__) - {"normalize"} - ops - {c.op for c in FUSED_ADD_CASES}  # normalize: test_layers.py
    assert not missing, f"functional ops without cases: {sorted(missing)}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "shape"), [("BatchNorm1d", (1, 3)), ("BatchNorm2d", (1, 3, 1, 1))])
def test_training_batch_of_one_raises_like_torch_and_keeps_buffers(name: str, shape: tuple[int, ...],
                                                                   backend: str) -> None:
    theirs = randomize_(getattr(nn, name)(3), 0)
    ours = getattr(normkit, name)(3, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x = torch.randn(shape)
    with pytest.raises(ValueError) as expected:
        theirs(x)
    with pytest.raises(ValueError) as actual:
        run_or_skip(backend, lambda: ours(x))
    assert str(actual.value) == str(expected.value)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a failed call"
