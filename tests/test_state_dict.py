"""Checkpoints move freely between torch.nn and normkit, and modules survive copy and pickle.

For every module configuration of the table of cases (Lazy modules after materialization and the
fused residual-add modules included): a torch checkpoint loads into normkit with ``strict=True``
and back, old checkpoints without ``num_batches_tracked`` load as torch loads them, and
``copy.deepcopy`` / ``pickle`` keep the class, the backend, the state and the behaviour.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections import OrderedDict

import pytest
import torch
from torch import Tensor, nn

import normkit
from cases import (
    BACKENDS,
    FUSED_ADD_CASES,
    LAZY_CASES,
    NORM_CASES,
    NormCase,
    assert_close_to_reference,
    make_input,
    randomize_,
    seed_of,
    skip_if_declined,
)

pytestmark = pytest.mark.filterwarnings(
    # torch's LazyInstanceNorm with affine=False never learns num_features and warns at each call
    "ignore:input's size at dim=1 does not match num_features:UserWarning"
)


def _unique_configs(cases: tuple[NormCase, ...]) -> list[NormCase]:
    """One case per module configuration (module, args, kwargs), preferring a non-empty input."""
    seen: dict[tuple, NormCase] = {}
    for case in cases:
        key = (case.module, case.args, case.kwargs)
        if key not in seen or 0 in seen[key].shape:
            seen[key] = case
    return list(seen.values())


CONFIGS = _unique_configs(NORM_CASES)
STATEFUL = [c for c in CONFIGS if c.stateful]
_BACKENDS_AND_NONE = [None, *BACKENDS]


def _assert_same_state(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert list(actual) == list(expected)
    for key, value in actual.items():
        assert value.dtype == expected[key].dtype and torch.equal(value, expected[key]), f"{key} differs"


def _trained(case: NormCase, lib, **kw) -> nn.Module:
    """A module with random parameters and statistics that has also seen one training batch."""
    module = randomize_(case.build(lib, **kw), seed_of(case.id))
    if case.stateful:
        with torch.no_grad():
            module(case.input(torch.float32, seed_of(case.id, "warm"), requires_grad=False))
    return module


def _outputs_match(ours: nn.Module, theirs: nn.Module, case: NormCase, name: str) -> None:
    """Same output in eval, then the same output and state after a training step."""
    x = case.input(torch.float32, seed_of(case.id, name), requires_grad=False)
    for mode in ("eval", "train"):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        with torch.no_grad():
            assert_close_to_reference(ours(x), theirs(x), name=f"{name} {mode}")
    for (key, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        if a.is_floating_point():
            assert_close_to_reference(a, b, name=f"{name} {key}")
        else:
            assert torch.equal(a, b), f"{name} {key}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CONFIGS])
@skip_if_declined
def test_torch_checkpoint_loads_into_normkit_and_back(case: NormCase, backend: str) -> None:
    theirs = _trained(case, nn)
    checkpoint = theirs.state_dict()
    ours = case.build(normkit, backend=backend)
    result = ours.load_state_dict(checkpoint, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    _assert_same_state(ours.state_dict(), checkpoint)
    back = case.build(nn)
    back.load_state_dict(ours.state_dict(), strict=True)
    _assert_same_state(back.state_dict(), checkpoint)
    _outputs_match(ours, theirs, case, "torch -> normkit")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CONFIGS])
@skip_if_declined
def test_normkit_checkpoint_loads_into_torch(case: NormCase, backend: str) -> None:
    ours = _trained(case, normkit, backend=backend)
    theirs = case.build(nn)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    _assert_same_state(theirs.state_dict(), ours.state_dict())
    _outputs_match(ours, theirs, case, "normkit -> torch")


def _call(module: nn.Module, x: Tensor) -> Tensor | ValueError:
    """``module(x)`` without gradients, or the ValueError it raises (torch's lazy instance norms
    read num_features from dim 1, so the unbatched case raises in torch and normkit alike)."""
    with torch.no_grad():
        try:
            return module(x)
        except ValueError as e:
            return e


def _same_result(actual: Tensor | ValueError, expected: Tensor | ValueError, name: str) -> None:
    if isinstance(expected, ValueError) or isinstance(actual, ValueError):
        assert str(actual) == str(expected), f"{name}: {actual!r} != torch's {expected!r}"
    else:
        assert_close_to_reference(actual, expected, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in LAZY_CASES])
@skip_if_declined
def test_lazy_checkpoints_after_materialization(case: NormCase, backend: str) -> None:
    x = case.input(torch.float32, seed_of(case.id), requires_grad=False)
    source = case.build(nn)
    _call(source, x)  # materializes: a torch.nn.BatchNorm2d etc. now
    randomize_(source, seed_of(case.id))
    # Into unmaterialized lazy modules: the load materializes the parameters (torch leaves
    # num_features at 0 then, which its InstanceNorm check rejects): normkit does what torch does.
    loaded = {}
    for who, lib, kw in (("torch", nn, {}), ("normkit", normkit, {"backend": backend})):
        loaded[who] = case.build(lib, **kw)
        result = loaded[who].load_state_dict(source.state_dict(), strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        loaded[who].eval()
    _assert_same_state(loaded["normkit"].state_dict(), source.state_dict())
    _same_result(_call(loaded["normkit"], x), _call(loaded["torch"], x), "torch -> lazy normkit")
    assert type(loaded["normkit"]).__name__ == type(loaded["torch"]).__name__
    # A normkit lazy module materialized by a call is normkit's class; its checkpoint loads into
    # the materialized torch module.
    ours = case.build(normkit, backend=backend)
    _call(ours, x)
    assert type(ours) is getattr(normkit, case.module.removeprefix("Lazy")) and ours.backend == backend
    randomize_(ours, seed_of(case.id, "ours"))
    back = copy.deepcopy(source)
    back.load_state_dict(ours.state_dict(), strict=True)
    _assert_same_state(back.state_dict(), ours.state_dict())
    ours.eval()
    back.eval()
    _same_result(_call(ours, x), _call(back, x), "materialized normkit -> torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in FUSED_ADD_CASES if c.residual_dtype is None])
@skip_if_declined
def test_fused_add_module_checkpoint_is_its_norms(case, backend: str) -> None:
    twin = (nn.LayerNorm if case.op == "add_layer_norm" else nn.RMSNorm)(case.normalized_shape,
                                                                         elementwise_affine=case.affine)
    randomize_(twin, seed_of(case.id))
    ours = getattr(normkit, case.module)(case.normalized_shape, elementwise_affine=case.affine, backend=backend)
    ours.load_state_dict(twin.state_dict(), strict=True)
    back = type(twin)(case.normalized_shape, elementwise_affine=case.affine)
    back.load_state_dict(ours.state_dict(), strict=True)
    _assert_same_state(back.state_dict(), twin.state_dict())
    x = make_input(case.shape, torch.float32, seed_of(case.id, "x"), requires_grad=False)
    residual = make_input(case.shape, torch.float32, seed_of(case.id, "r"), requires_grad=False)
    with torch.no_grad():
        y, residual_out = ours(x, residual)
        assert_close_to_reference(residual_out, x + residual)
        assert_close_to_reference(y, twin(x + residual))


# ---- old checkpoints ---------------------------------------------------------------------------


def _old_checkpoint(module: nn.Module, prefix: str = "") -> OrderedDict:
    """``module``'s checkpoint as torch < 0.4.1 wrote it: no num_batches_tracked, version 1,
    saved and loaded through torch.save/torch.load like a file on disk."""
    state = module.state_dict(prefix=prefix)
    del state[prefix + "num_batches_tracked"]
    state._metadata[prefix.rstrip(".")]["version"] = 1
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in STATEFUL])
@skip_if_declined
def test_old_checkpoint_without_num_batches_tracked_loads_like_torch(case: NormCase, backend: str) -> None:
    checkpoint = _old_checkpoint(_trained(case, nn))
    assert "num_batches_tracked" not in checkpoint and checkpoint._metadata[""]["version"] == 1
    theirs, ours = case.build(nn), case.build(normkit, backend=backend)
    theirs.load_state_dict(copy.copy(checkpoint), strict=True)
    ours.load_state_dict(copy.copy(checkpoint), strict=True)
    assert ours.num_batches_tracked.item() == 0 and ours.num_batches_tracked.dtype == torch.long
    _assert_same_state(ours.state_dict(), theirs.state_dict())
    # torch keeps a module's own counter rather than resetting it: so must normkit
    theirs.num_batches_tracked.fill_(5)
    ours.num_batches_tracked.fill_(5)
    theirs.load_state_dict(copy.copy(checkpoint), strict=True)
    ours.load_state_dict(copy.copy(checkpoint), strict=True)
    _assert_same_state(ours.state_dict(), theirs.state_dict())
    _outputs_match(ours, theirs, case, "old checkpoint")  # momentum=None averages with that counter


@pytest.mark.parametrize("backend", BACKENDS)
@skip_if_declined
def test_old_checkpoint_of_a_nested_module(backend: str) -> None:
    theirs = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, momentum=None))
    randomize_(theirs, 0)
    checkpoint = _old_checkpoint(theirs[1], prefix="1.")
    checkpoint.update({f"0.{k}": v for k, v in theirs[0].state_dict().items()})
    checkpoint._metadata["0"] = {"version": 1}
    ours = nn.Sequential(nn.Conv2d(2, 3, 1), normkit.BatchNorm2d(3, momentum=None, backend=backend))
    ours.load_state_dict(checkpoint, strict=True)
    assert ours[1].num_batches_tracked.item() == 0
    x = torch.randn(2, 2, 4, 5)
    theirs[1].num_batches_tracked.zero_()
    with torch.no_grad():
        assert_close_to_reference(ours(x), theirs(x))
    assert ours[1].num_batches_tracked.item() == theirs[1].num_batches_tracked.item() == 1
    for key, value in ours.state_dict().items():
        assert_close_to_reference(value.float(), theirs.state_dict()[key].float(), name=key)


@pytest.mark.parametrize("backend", BACKENDS)
@skip_if_declined
def test_pre_0_4_instance_norm_checkpoint_is_handled_like_torch(backend: str) -> None:
    """A version-less checkpoint with running stats, into an InstanceNorm that does not track them:
    torch drops the keys and reports them; normkit must say the same."""
    tracked = randomize_(nn.InstanceNorm2d(3, affine=True, track_running_stats=True), 0)
    state = tracked.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""].pop("version")
    errors = []
    for lib, kw in ((nn, {}), (normkit, {"backend": backend})):
        with pytest.raises(RuntimeError) as info:
            lib.InstanceNorm2d(3, affine=True, **kw).load_state_dict(copy.copy(state), strict=True)
        errors.append(str(info.value))
    assert errors[0] == errors[1]
    assert "Unexpected running stats buffer(s)" in errors[1]


# ---- copy and pickle ---------------------------------------------------------------------------


def _copies(module: nn.Module) -> dict[str, nn.Module]:
    return {"deepcopy": copy.deepcopy(module), "pickle": pickle.loads(pickle.dumps(module))}


@pytest.mark.parametrize("backend", _BACKENDS_AND_NONE)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CONFIGS])
@skip_if_declined
def test_deepcopy_and_pickle_keep_behaviour(case: NormCase, backend: str | None) -> None:
    original = _trained(case, normkit, backend=backend)
    for how, clone in _copies(original).items():
        assert type(clone) is type(original) and clone.backend == backend, how
        assert repr(clone) == repr(original)
        _assert_same_state(clone.state_dict(), original.state_dict())
        twin = copy.deepcopy(original)  # each copy is checked against an untouched twin of the original
        x = case.input(torch.float32, seed_of(case.id, how))
        for mode in ("train", "eval"):
            clone.train(mode == "train")
            twin.train(mode == "train")
            y, expected = clone(x), twin(x)
            assert torch.equal(y, expected), f"{how} {mode}: output differs"
        _assert_same_state(clone.state_dict(), twin.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in LAZY_CASES])
@skip_if_declined
def test_deepcopy_and_pickle_of_materialized_lazy_modules(case: NormCase, backend: str) -> None:
    """(torch cannot deepcopy or pickle an unmaterialized parameter, in normkit as in torch.)"""
    lazy = case.build(normkit, backend=backend)
    _call(lazy, case.input(torch.float32, seed_of(case.id), requires_grad=False))
    randomize_(lazy, seed_of(case.id))
    x = case.input(torch.float32, seed_of(case.id, "copy"), requires_grad=False)
    for how, clone in _copies(lazy).items():
        assert type(clone) is type(lazy) is getattr(normkit, case.module.removeprefix("Lazy")), how
        assert clone.backend == backend
        _assert_same_state(clone.state_dict(), lazy.state_dict())
        twin = copy.deepcopy(lazy)
        _same_result(_call(clone, x), _call(twin, x), how)
        _assert_same_state(clone.state_dict(), twin.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
@skip_if_declined
def test_pickled_model_keeps_backend_and_output(backend: str) -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 1), normkit.BatchNorm2d(4, backend=backend),
                          normkit.GroupNorm(2, 4, backend=backend), nn.Flatten(1), normkit.LayerNorm(4 * 3 * 5))
    randomize_(model, 1)
    model.eval()
    clone = pickle.loads(pickle.dumps(model))
    assert [getattr(m, "backend", "-") for m in clone] == [getattr(m, "backend", "-") for m in model]
    x = torch.randn(2, 2, 3, 5)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))
