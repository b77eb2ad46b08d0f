"""Running statistics whose elements share memory, on every backend, against ATen.

What torch 2.13 does (CPU, established by these tests on its own output):

* ``batch_norm`` in training writes through element pointers, channel by channel, the mean then
  the variance, each read from memory as last written. So it accepts an ``expand``-ed statistic,
  one tensor given as both, or overlapping views: on one thread the result is that loop's (on
  several, its threads race on the shared elements). In eval it only reads them.
* ``instance_norm`` with running statistics copies the new mean in, then the new variance: one
  tensor given as both ends with the variance; a statistic whose elements share memory is
  refused (copy_'s error), ATen writing the mean before refusing the variance. normkit refuses
  such a call before writing anything.

The conftest runs torch on one thread, so ATen's results here are its loop's. Layouts are built
by name; the exact-data cases (two values per channel, integers, momentum 1/2) leave no rounding
to any backend, so every backend must give torch's bits.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import normkit
import normkit.functional as NF
from cases import BACKENDS, skip_if_declined
from normkit import numerics

C = 5

# (name, build(mean0, var0) -> (running_mean, running_var)): values are the channel-wise ones of
# mean0 and var0 where the layout keeps them apart.
LAYOUTS = {
    "expanded": lambda m, v: (m[:1].clone().expand(C), v[:1].clone().expand(C)),
    "mean_expanded": lambda m, v: (m[:1].clone().expand(C), v.clone()),
    "var_expanded": lambda m, v: (m.clone(), v[:1].clone().expand(C)),
    "expanded_0d": lambda m, v: (m[0].clone().expand(C), v[0].clone().expand(C)),
    "same_tensor": lambda m, v: (lambda t: (t, t))(m.clone()),
    "overlapping": lambda m, v: (lambda b: (b[:C], b[1:]))(torch.cat([m, v[-1:]])),
    "interleaved": lambda m, v: (lambda b: (b[0::2], b[1::2]))(torch.stack([m, v], 1).flatten()),
    "strided": lambda m, v: (torch.stack([m, m], 1).flatten()[::2], torch.stack([v, v], 1).flatten()[::2]),
}
SHARED_WITHIN = {"expanded", "mean_expanded", "var_expanded", "expanded_0d"}
SHARED_ROWS = sorted(LAYOUTS)


def _start(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 9, (C,), generator=g).float(), torch.randint(1, 9, (C,), generator=g).float()


def _exact_input(seed: int) -> torch.Tensor:
    """``(2, C)`` small integers: mean, variance and every update are exact in float32."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-16, 17, (2, C), generator=g).float()


def _random_input(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, C, 7, generator=g) * 2 + 0.5


def _call(op: str, backend: str | None, x, rm, rv, training: bool, momentum: float):
    """``op`` on ATen (``backend="aten"``) or through normkit.functional on ``backend``."""
    fn = getattr(F, op) if backend == "aten" else functools.partial(getattr(NF, op), backend=backend)
    mode = {"use_input_stats" if op == "instance_norm" else "training": training}
    return fn(x, rm, rv, momentum=momentum, **mode)


def _outcome(op, backend, x, layout, training, momentum=0.5, seed=0):
    """(output or (error type, message), running_mean, running_var) after one call."""
    rm, rv = LAYOUTS[layout](*_start(seed))
    try:
        out = _call(op, backend, x, rm, rv, training, momentum)
    except RuntimeError as e:
        out = (type(e), str(e))
    return out, rm.clone(), rv.clone()


@pytest.mark.parametrize("layout", SHARED_ROWS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("backend", [*BACKENDS, None])
@skip_if_declined
def test_batch_norm_shared_stats_exact_bits(backend, training, layout):
    """Exact data: every backend (and the default path) gives ATen's output and ATen's bits in
    the running statistics, whatever memory they share."""
    x = _exact_input(1)
    want_y, want_m, want_v = _outcome("batch_norm", "aten", x, layout, training)
    y, m, v = _outcome("batch_norm", backend, x, layout, training)
    # (ATen's contiguous path forms y as x * alpha + beta: 3e-5 off on a constant channel at
    # |x * alpha| ~ 1600, where its strided path gives the exact 0)
    torch.testing.assert_close(y, want_y, rtol=1e-6, atol=1e-4)
    assert torch.equal(m, want_m) and torch.equal(v, want_v), (m, want_m, v, want_v)


def _batch_stats(backend: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch mean and unbiased variance as ``backend`` rounds them to float32: its update
    with momentum 1 into zeros (``b * 1 + 0 * 0`` is ``b``)."""
    rm, rv = torch.zeros(C), torch.zeros(C)
    NF.batch_norm(x, rm, rv, training=True, momentum=1.0, backend=backend)
    return rm, rv


def _aten_loop(rm: torch.Tensor, rv: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, momentum: float) -> None:
    """ATen's batch_norm running update on one thread, element by element, in float32 with the
    policy's arithmetic (``b * momentum + r * (1 - momentum)``, each step rounded)."""
    keep = torch.tensor(1.0 - momentum, dtype=torch.float32)
    mom = torch.tensor(momentum, dtype=torch.float32)
    for c in range(C):
        for r, b in ((rm, mean), (rv, var)):
            r[c] = b[c] * mom + r[c] * keep


@pytest.mark.parametrize("layout", SHARED_ROWS)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@skip_if_declined
def test_batch_norm_shared_stats_follow_atens_loop(backend, layout):
    """Random data, momentum 0.1: each normkit backend's running statistics are ATen's loop run
    on that backend's own batch statistics, to the bit; and within rounding of ATen's."""
    x = _random_input(2)
    mean, var = _batch_stats(backend, x)
    start = _start(3)
    want_m, want_v = LAYOUTS[layout](*start)
    _aten_loop(want_m, want_v, mean, var, 0.1)
    rm, rv = LAYOUTS[layout](*start)
    NF.batch_norm(x, rm, rv, training=True, momentum=0.1, backend=backend)
    assert torch.equal(rm, want_m) and torch.equal(rv, want_v), (rm, want_m, rv, want_v)
    aten_m, aten_v = LAYOUTS[layout](*start)
    F.batch_norm(x, aten_m, aten_v, training=True, momentum=0.1)
    torch.testing.assert_close((rm, rv), (aten_m, aten_v), rtol=2e-6, atol=1e-7)


def test_aten_loop_is_atens():
    """The oracle above is ATen's own behaviour: its running statistics on one thread are
    :func:`_aten_loop` run on its batch statistics (within float64-vs-float32 rounding: ATen
    computes each step in double)."""
    x = _random_input(4)
    rm, rv = torch.zeros(C), torch.zeros(C)
    F.batch_norm(x, rm, rv, training=True, momentum=1.0)
    for layout in SHARED_ROWS:
        want_m, want_v = LAYOUTS[layout](*_start(5))
        _aten_loop(want_m, want_v, rm, rv, 0.1)
        got_m, got_v = LAYOUTS[layout](*_start(5))
        F.batch_norm(x, got_m, got_v, training=True, momentum=0.1)
        torch.testing.assert_close((got_m, got_v), (want_m, want_v), rtol=2e-7, atol=1e-7, msg=layout)


@pytest.mark.parametrize("layout", SHARED_ROWS)
@pytest.mark.parametrize("backend", [*BACKENDS, None])
@skip_if_declined
def test_instance_norm_shared_stats(backend, layout):
    """instance_norm: ATen's result where it accepts the layout (one tensor as both ends with the
    variance); where it refuses, torch's error and message, and nothing written (ATen itself
    writes the mean before it refuses an ``expand``-ed variance)."""
    x = _exact_input(6).reshape(1, C, 2).expand(2, C, 2).contiguous() + torch.arange(2.0).view(2, 1, 1)
    want_y, want_m, want_v = _outcome("instance_norm", "aten", x, layout, True)
    y, m, v = _outcome("instance_norm", backend, x, layout, True)
    if isinstance(want_y, tuple):
        assert y == want_y
        start_m, start_v = LAYOUTS[layout](*_start(0))
        assert torch.equal(m, start_m) and torch.equal(v, start_v), "a refused call wrote"
        return
    torch.testing.assert_close(y, want_y, rtol=1e-6, atol=1e-6)
    assert torch.equal(m, want_m) and torch.equal(v, want_v), (m, want_m, v, want_v)


@pytest.mark.parametrize("backend", [*BACKENDS, None])
@skip_if_declined
def test_refused_batch_norm_with_shared_stats_writes_nothing(backend):
    """A call refused for another reason (a running variance of the wrong size) writes neither
    statistic, even an ``expand``-ed mean."""
    x = _random_input(7)
    rm, rv = torch.zeros(1).expand(C), torch.ones(C - 1)
    with pytest.raises(RuntimeError) as want:
        F.batch_norm(x, rm, rv, training=True)
    with pytest.raises(RuntimeError) as got:
        NF.batch_norm(x, rm, rv, training=True, backend=backend)
    assert str(got.value) == str(want.value)
    assert torch.equal(rm, torch.zeros(C)) and torch.equal(rv, torch.ones(C - 1))


def test_update_running_stats_writes():
    """The policy's two writes directly: batch_norm's loop (the default) and instance_norm's copy
    (``inference_ok=False``), on one tensor given as both and on an ``expand``-ed one."""
    mean, var = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 8.0, 16.0])
    t = torch.zeros(3)
    numerics.update_running_stats(t, t, mean, var, 0.5)
    assert torch.equal(t, (mean * 0.5) * 0.5 + var * 0.5)  # the mean's update, then the variance's
    t = torch.zeros(3)
    numerics.update_running_stats(t, t, mean, var, 0.5, inference_ok=False)
    assert torch.equal(t, var * 0.5)  # both computed first: the variance is written last
    e = torch.zeros(1).expand(3)
    numerics.update_running_stats(e, None, mean, var, 0.5)
    assert torch.equal(e, torch.full((3,), ((0.5 * 0.5) + 1.0) * 0.5 + 1.5))  # channels in order
    rm, e = torch.zeros(3), torch.zeros(1).expand(3)
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        numerics.update_running_stats(rm, e, mean, var, 0.5, inference_ok=False)
    assert torch.equal(rm, torch.zeros(3)), "the mean was written before the variance was refused"


def test_reference_split_keeps_import_paths():
    """The masked norms and LocalResponseNorm moved out of normkit.reference; every old name
    still resolves there, to the same objects."""
    from normkit import reference, reference_lrn, reference_masked

    for name in ("MaskedNormalize", "masked_batch_norm", "masked_instance_norm"):
        assert getattr(reference, name) is getattr(reference_masked, name)
    for name in ("LocalResponseNorm", "local_response_norm"):
        assert getattr(reference, name) is getattr(reference_lrn, name)
    assert set(reference_masked.__all__) | set(reference_lrn.__all__) <= set(reference.__all__)
    assert normkit.reference.masked_batch_norm is reference_masked.masked_batch_norm


@pytest.mark.parametrize("backend", BACKENDS)
@skip_if_declined
def test_compiled_batch_norm_with_one_tensor_as_both_stats(backend):
    """Under torch.compile (no memory addresses to compare) one tensor given as both statistics
    still gets the mean's update then the variance's, the eager bits."""
    x = _random_input(8)

    def step(t: torch.Tensor) -> torch.Tensor:
        return NF.batch_norm(x, t, t, training=True, backend=backend)

    eager, compiled = torch.full((C,), 0.5), torch.full((C,), 0.5)
    step(eager)
    torch._dynamo.reset()
    torch.compile(step, backend="eager", fullgraph=False)(compiled)
    torch._dynamo.reset()
    assert torch.equal(compiled, eager), (compiled, eager)
