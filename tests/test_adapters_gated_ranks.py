"""convert on gated RMSNorms written for their model's input ranks only (Falcon-H1's
``FalconH1RMSNormGated`` unpacks ``(N, L, D)`` or ``(N, D)``), and with ``n_groups`` instead of
``group_size``. Self-contained copies of that pattern (no transformers needed)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import normkit


class RankLimitedGatedNorm(nn.Module):
    """Falcon-H1's gated norm, shape for shape: 2-D or 3-D input only, ``n_groups`` groups, the
    gate after the norm (``norm_before_gate=True``) or before it."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, n_groups: int = 1, norm_before_gate: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.n_groups = n_groups
        self.norm_before_gate = norm_before_gate

    def forward(self, hidden_states, gate=None):
        dtype, ndim = hidden_states.dtype, hidden_states.ndim
        if not self.norm_before_gate and gate is not None:
            hidden_states = hidden_states * F.silu(gate.to(torch.float32))
        if ndim == 3:
            n, seq, dim = hidden_states.shape
        else:
            (n, dim), seq = hidden_states.shape, 1
        h = hidden_states.to(torch.float32).view(n, seq, self.n_groups, dim // self.n_groups)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        h = (self.weight.view(self.n_groups, dim // self.n_groups) * h).view(n, seq, dim)
        if ndim == 2:
            h = h.squeeze(1)
        if self.norm_before_gate and gate is not None:
            h = h * F.silu(gate.to(torch.float32))
        return h.to(dtype)


class Block(nn.Module):
    def __init__(self, norm: nn.Module, d: int):
        super().__init__()
        self.proj = nn.Linear(d, 2 * d)
        self.norm = norm

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return self.norm(h, gate)


def _convert(m: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return normkit.convert(m, backend="torch")


@pytest.mark.parametrize("before", [True, False])
@pytest.mark.parametrize("n_groups", [1, 2, 4])
def test_rank_limited_gated_norm_converts_with_its_groups(n_groups: int, before: bool) -> None:
    torch.manual_seed(n_groups)
    m = Block(RankLimitedGatedNorm(32, n_groups=n_groups, norm_before_gate=before), 32)
    with torch.no_grad():
        m.norm.weight.normal_()
    m2 = _convert(copy.deepcopy(m))
    assert isinstance(m2.norm, normkit.GatedRMSNorm)
    assert m2.norm.group_size == 32 // n_groups and m2.norm.norm_before_gate == before
    for shape in ((3, 5, 32), (4, 32)):
        x = torch.randn(shape, requires_grad=True)
        g = torch.randn(shape)
        y0, y1 = m(x), m2(x)
        torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
        grads = [torch.autograd.grad(y, (x, mm.norm.weight), g) for y, mm in ((y0, m), (y1, m2))]
        for p, q in zip(*grads, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_probing_ranks_fires_no_hook() -> None:
    m = Block(RankLimitedGatedNorm(16, n_groups=2), 16)
    calls = []
    m.norm.register_forward_hook(lambda *a: calls.append(1))
    m2 = _convert(m)
    assert calls == []
    m2(torch.randn(2, 3, 16))
    assert calls == [1]


class RefusesEverything(RankLimitedGatedNorm):
    def forward(self, hidden_states, gate=None):
        raise RuntimeError("this norm takes nothing")


def test_a_gated_norm_refusing_every_probe_is_left() -> None:
    """No rank taken is no evidence: the norm stays (not accepted on zero probes)."""
    m = Block(RefusesEverything(16), 16)
    m2 = _convert(m)
    assert type(m2.norm) is RefusesEverything
