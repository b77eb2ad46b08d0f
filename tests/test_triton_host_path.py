"""The Triton launchers' host-side shortcuts (issue 15 item 9) give what they replace: the
integer helpers triton's values, the memoized tile choices the current block override, the
eager BatchNorm statistics the custom op's results and running-statistics update."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from normkit.ops.triton import _launch, backend, batch_norm, channels_last, row_norm  # noqa: E402

INTS = [*range(0, 70), 127, 128, 129, 4095, 4096, 4097, 40960, 2**31 - 1, 2**31, 2**40 + 3]


def test_next_power_of_2_and_cdiv_match_triton() -> None:
    assert [_launch.next_power_of_2(n) for n in INTS] == [triton.next_power_of_2(n) for n in INTS]
    pairs = [(a, b) for a in INTS for b in (1, 2, 3, 7, 16, 100, 4096)]
    assert [_launch.cdiv(a, b) for a, b in pairs] == [triton.cdiv(a, b) for a, b in pairs]


def test_memoized_tiles_follow_the_block_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """The block override is an argument of the memoized functions, read per call: setting or
    removing the environment variable changes the next call's tiles."""
    monkeypatch.delenv(_launch.BLOCK_ENV_VAR, raising=False)
    wide = row_norm._blocks(4, 1000, "fwd", 4, None)
    wide_cl = channels_last.channel_blocks(64, 4, 1000, "fwd", 4)
    assert wide.SINGLE_BLOCK and wide_cl.SINGLE_BLOCK
    monkeypatch.setenv(_launch.BLOCK_ENV_VAR, "64")
    assert row_norm._blocks(4, 1000, "fwd", 4, None) == row_norm._blocks(4, 1000, "fwd", 4, 64)
    assert not row_norm._blocks(4, 1000, "fwd", 4, None).SINGLE_BLOCK
    assert not channels_last.channel_blocks(64, 4, 1000, "fwd", 4).SINGLE_BLOCK
    monkeypatch.setenv(_launch.BLOCK_ENV_VAR, "48")
    with pytest.raises(ValueError, match="power of two"):
        row_norm._blocks(4, 1000, "fwd", 4, None)
    monkeypatch.delenv(_launch.BLOCK_ENV_VAR)
    assert row_norm._blocks(4, 1000, "fwd", 4, None) == wide
    assert channels_last.channel_blocks(64, 4, 1000, "fwd", 4) == wide_cl


def test_interpreting_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not backend.interpreting()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not backend.interpreting()


@pytest.mark.skipif(not backend.is_available(), reason="needs CUDA or TRITON_INTERPRET=1")
def test_eager_statistics_equal_the_custom_op() -> None:
    """Eager BatchNorm calls the statistics' Python body, not the custom op: same statistics,
    same running-statistics update, bit for bit."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, 2, generator=gen).to(device)
    w, b = torch.randn(5, generator=gen).to(device), torch.randn(5, generator=gen).to(device)
    stats = torch.rand(2, 5, generator=gen).to(device) + 0.5
    direct_rm, direct_rv = stats[0].clone(), stats[1].clone()
    op_rm, op_rv = stats[0].clone(), stats[1].clone()
    assert _launch.eager_direct()
    direct = batch_norm.batch_norm_stats(x, w, b, direct_rm, direct_rv, 0.3, 1e-5)
    op = batch_norm._batch_norm_stats_op(x, w, b, op_rm, op_rv, 0.3, 1e-5)
    for d, o in zip((*direct, direct_rm, direct_rv), (*op, op_rm, op_rv), strict=True):
        assert torch.equal(d, o)
    assert not torch.equal(direct_rm, stats[0])  # the update happened
