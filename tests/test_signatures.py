"""Every module class shows its whole constructor signature, and the signature is true.

For each class of ``normkit.modules.__all__``: ``inspect.signature`` (which ``help()`` prints)
is its torch twin's, parameter for parameter (names, kinds, defaults, order; annotations differ
in form), with the few deviations below as data, followed by normkit's keyword-only options,
which are exactly the attributes :meth:`BackendMixin.adopt` sets. The class is then built from
the signature twice, every argument by keyword and the positional ones by position, to show
that the constructor takes what the signature says.
"""

from __future__ import annotations

import inspect
import pydoc

import pytest
from torch import nn
from torch.nn.parameter import UninitializedTensorMixin

import normkit.modules
from normkit.norms import NORMS

_KW = inspect.Parameter.KEYWORD_ONLY
_POS = inspect.Parameter.POSITIONAL_OR_KEYWORD

CLASSES = sorted(n for n in normkit.modules.__all__ if isinstance(getattr(normkit.modules, n), type))

# Where a class deliberately differs from its torch twin, and why.
# torch twin for a class that extends nn.Module directly (FrozenBatchNorm: BatchNorm's statistics
# without momentum, affine or bias options)
_TWIN_OF = {f"FrozenBatchNorm{d}d": (nn.BatchNorm2d, {"momentum", "affine", "track_running_stats", "bias"})
            for d in (1, 2, 3)}
# a required parameter of the class inserted after one of the twin's
_INSERTED = {f"GhostBatchNorm{d}d": ("num_features", "virtual_batch_size") for d in (1, 2)}
# twin parameters renamed (the channel-first norms normalize one channel axis)
_RENAMED = {"LayerNorm2d": {"normalized_shape": "num_channels"}, "RMSNorm2d": {"normalized_shape": "num_channels"}}
# twin's required parameters given a None default, for a keyword-only spelling that replaces them
_NONE_DEFAULTS = {"GroupNorm": {"num_groups", "num_channels"}}
# keyword-only options that are not attributes (GroupNorm's group_size becomes num_groups)
_CONSTRUCTOR_ONLY = {"GroupNorm": {"group_size"}}
# classes without a torch twin outside the table of norms (the norms of today's blocks): their own
# parameters before normkit's options
_NO_TWIN = {"GatedRMSNorm", "ModulatedLayerNorm", "ModulatedRMSNorm", "QKRMSNorm", "SandwichRMSNorm", "DyT", "Derf"}
# known defects, each to be fixed where it lives
_DEFECTS: dict[str, str] = {}

# A value for each required parameter, to build every class.
_REQUIRED = {"num_features": 4, "num_channels": 4, "num_groups": 2, "normalized_shape": 4, "size": 3,
             "virtual_batch_size": 2, "d": 4, "hidden_size": 4, "head_dim": 4}


def _plain(params: list[inspect.Parameter]) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in params]


def _expected_torch_part(name: str, cls: type) -> list[tuple[str, object, object]]:
    """The twin's parameters as the class must show them, before normkit's options."""
    twin, dropped = _TWIN_OF.get(name, (cls.torch_base(), set()))
    if twin is nn.Module and (name in _NO_TWIN or any(spec.module == name for spec in NORMS.values())):
        # a norm of the table without a torch twin: its own parameters before normkit's options
        own = inspect.signature(cls).parameters.values()
        return _plain([p for p in own if p.kind is not _KW])
    assert twin is not nn.Module, f"{name} extends nn.Module directly: give it a twin in _TWIN_OF"
    expected = []
    for p in inspect.signature(twin).parameters.values():
        if p.name in dropped:
            continue
        default = None if p.name in _NONE_DEFAULTS.get(name, ()) else p.default
        expected.append((_RENAMED.get(name, {}).get(p.name, p.name), p.kind, default))
        if name in _INSERTED and p.name == _INSERTED[name][0]:
            expected.append((_INSERTED[name][1], _POS, inspect.Parameter.empty))
    return expected


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(reason=_DEFECTS[n], strict=True)) if n in _DEFECTS else n
    for n in CLASSES
])
def test_signature_is_the_twins_then_keyword_only_options(name: str) -> None:
    cls = getattr(normkit.modules, name)
    params = list(inspect.signature(cls).parameters.values())
    torch_part = _expected_torch_part(name, cls)
    assert _plain(params[:len(torch_part)]) == torch_part
    options = params[len(torch_part):]
    assert all(p.kind is _KW and p.default is not inspect.Parameter.empty for p in options), options
    assert {"backend", "stats_dtype", "out_dtype"} <= {p.name for p in options}
    # the options are what adopt() sets (a positional addition such as virtual_batch_size too)
    attributes = set(cls.init_attributes())
    inserted = {_INSERTED[name][1]} if name in _INSERTED else set()
    assert {p.name for p in options} - _CONSTRUCTOR_ONLY.get(name, set()) == attributes - inserted
    # help() prints the same signature
    assert f"{name}{inspect.signature(cls)}" in pydoc.render_doc(cls, renderer=pydoc.plaintext)


def _shapes(module: nn.Module) -> dict[str, object]:
    return {k: None if isinstance(v, UninitializedTensorMixin) else v.shape for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", CLASSES)
def test_constructor_takes_what_the_signature_shows(name: str) -> None:
    cls = getattr(normkit.modules, name)
    params = inspect.signature(cls).parameters.values()
    values = {p.name: _REQUIRED.get(p.name, p.default) for p in params}
    assert inspect.Parameter.empty not in values.values(), f"{name}: a required parameter without a value"
    by_keyword = cls(**values)
    positional = [values[p.name] for p in params if p.kind is _POS]
    by_position = cls(*positional, **{p.name: values[p.name] for p in params if p.kind is _KW})
    assert repr(by_position) == repr(by_keyword)
    assert _shapes(by_position) == _shapes(by_keyword)
    for attribute, default in cls.init_attributes().items():
        assert getattr(by_keyword, attribute) == values.get(attribute, default), attribute
