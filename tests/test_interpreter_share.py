"""The interpreter's share of the triton cases (tests/interpreter_share.py): float32 and float64
always, one low precision per case, every low precision somewhere, the same choice every time."""

from __future__ import annotations

import itertools
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
