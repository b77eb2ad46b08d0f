"""Probes for model surgery: before :func:`normkit.convert` or :func:`normkit.fuse_conv_bn`
replaces a module, both the module and its replacement run on small inputs and must agree
(output, input and parameter gradients for a random upstream gradient, and the buffers the call
updates). A wrong adapter then leaves the model as it was instead of changing it.

:func:`probe_inputs` is adversarial for norms: every input rank a norm plausibly takes (2-D,
3-D and 4-D with the features last, 3-D to 5-D with the features at dim 1), each with ordinary
values, rows with outliers (normalized values near sqrt(n): a clamp or a saturation shows), a
large common offset (a norm that does not centre, or centres carelessly) and tiny magnitudes
(where ``eps`` dominates). :func:`compare_inputs` requires that the replacement accepts every
input the original maps to an output of the same shape, and agrees on all of them.

A probe changes nothing: buffers (running statistics, counters) are restored in place after
each run, the random number generator is forked (dropout draws the same mask in both runs and
the caller's stream is restored), gradients come from ``torch.autograd.grad`` (no ``.grad`` is
written), and forwards are called without the modules' hooks (``module.forward``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["TOLERANCE", "Outcome", "compare", "compare_inputs", "difference", "probe_input", "probe_inputs",
           "random_copy", "tensor_home"]

# Largest accepted difference, relative to the largest magnitude of the tensor compared.
# Replacements compute the same formula in another order, so they differ by a few roundings of
# the output dtype; a wrong replacement (a dropped activation, a missing 1 + weight, another
# axis) differs by O(1). float32 allows reductions in another order over a few thousand terms.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


class Outcome(NamedTuple):
    """``error``: the largest relative difference found (``inf`` when they disagree in kind);
    ``reason``: why the replacement was refused, ``None`` when it agrees within tolerance."""

    error: float
    reason: str | None


def tensor_home(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of ``module``'s first floating parameter or buffer (the
    default dtype on the CPU for a module without any)."""
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    for t in (*module.parameters(), *module.buffers()):
        return t.device, torch.get_default_dtype()
    return torch.device("cpu"), torch.get_default_dtype()


def _features(module: nn.Module) -> int | tuple[int, ...]:
    """The feature count of a normkit module or torch.nn norm (a tuple: LayerNorm/RMSNorm over
    several trailing axes)."""
    from .modules import LayerNorm2d, RMSNorm2d

    if isinstance(module, (LayerNorm2d, RMSNorm2d)):
        return module.normalized_shape[0]
    if isinstance(module, nn.LocalResponseNorm):
        return 5
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        shape = tuple(module.normalized_shape)
        return shape[0] if len(shape) == 1 else shape
    return module.num_features


def probe_shapes(module: nn.Module) -> list[tuple[int, ...]]:
    """Every input layout a norm with ``module``'s feature count plausibly takes: (N, C),
    (N, L, C), (N, H, W, C) and (N, C, L), (N, C, H, W), (N, C, D, H, W). The other sizes are
    small and never the feature count, so a norm applied to the wrong axis fails to broadcast
    instead of passing by coincidence. A batch is at least three: with two values a channel,
    BatchNorm's input gradient cancels to rounding noise in every backend. A GroupNorm with a
    group per channel is not probed on (N, C): each group would hold one element, whose output
    is the bias whatever the formula, and whose exact input gradient is 0 (noise again)."""
    n = _features(module)
    if isinstance(n, tuple):
        return [(2, *n), (2, 3, *n)]
    b, s = [k for k in (3, 4, 5) if k != n][:2]  # a norm's cost grows with n: the rest stays tiny
    shapes = [(b, n), (b, s, n), (b, s, b, n), (b, n, s), (b, n, s, b), (b, n, s, b, b)]
    if isinstance(module, nn.GroupNorm) and module.num_groups == module.num_channels:
        shapes.remove((b, n))
    return shapes


def probe_inputs(module: nn.Module, device: torch.device, dtype: torch.dtype,
                 seed: int = 0) -> list[tuple[str, Tensor]]:
    """Labelled probe inputs for a norm with ``module``'s feature count: every layout of
    :func:`probe_shapes`, each with ordinary values (non-zero mean), outliers of +-50 in the
    first and last rows (one value dominates its row: it normalizes to about sqrt(n)), a
    common offset of 64, and magnitudes of 1e-3 (where ``eps`` matters)."""
    gen = torch.Generator().manual_seed(seed)
    found = []
    for shape in probe_shapes(module):
        base = torch.randn(shape, generator=gen, dtype=torch.float64)
        outliers = base * 2 + 0.5
        rows = outliers.view(shape[0], -1)
        rows[0, 0], rows[-1, -1] = 50.0, -50.0
        for label, x in (("of ordinary values", base * 2 + 0.5), ("with outliers", outliers),
                         ("offset by 64", base + 64), ("of magnitude 1e-3", base * 1e-3)):
            found.append((f"{list(shape)} {label}", x.to(device=device, dtype=dtype)))
    return found


def probe_input(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, seed: int = 0) -> Tensor:
    """Random input with a non-zero mean (a norm that fails to centre shows it)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(device=device, dtype=dtype)


def random_copy(module: nn.Module, seed: int = 0) -> nn.Module:
    """A deep copy of ``module`` with random floating parameters and buffers (variances in
    [0.5, 1.5); every other tensor of two or more values has a negative one), on the CPU if
    ``module`` is on the meta device. Probing the copy tells replacements apart that agree only
    at the initial weights (LLaMA's and torch's cast orders at weight 1, an offset of 1 at
    weight 0, a ``weight.abs()``)."""
    twin = copy.deepcopy(module)
    if any(t.is_meta for t in (*twin.parameters(), *twin.buffers())):
        twin = twin.to_empty(device="cpu")
        for t in twin.buffers():
            if not t.is_floating_point():
                t.zero_()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in (*twin.named_parameters(), *twin.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.rsplit(".", 1)[-1] == "running_var":
                fresh = torch.rand(t.shape, generator=gen) + 0.5
            else:
                fresh = torch.randn(t.shape, generator=gen) * 0.5 + 0.5
                if fresh.numel() > 1:  # at least one negative value: a norm that takes |weight| shows
                    fresh.view(-1)[-1] = -fresh.view(-1)[-1].abs() - 0.25
            t.copy_(fresh)
    return twin


class _Run(NamedTuple):
    out: Tensor
    grads: list[Tensor | None]
    buffers: list[Tensor]


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _run(forward: Callable[[Tensor], Tensor], x: Tensor, params: list[Tensor], buffers: list[Tensor],
         seed: int, gradients: bool) -> _Run:
    before = [b.detach().clone() for b in buffers]
    try:
        with torch.enable_grad():
            grad_mode = gradients and not torch.is_inference_mode_enabled()
            xi = x.detach().clone().requires_grad_(grad_mode)
            out = forward(xi)
            if not isinstance(out, Tensor):
                raise TypeError(f"returned a {type(out).__name__}, not a Tensor")
            wrt = [xi, *(p for p in params if p.requires_grad)]
            if grad_mode and out.requires_grad and out.is_floating_point():
                gen = torch.Generator().manual_seed(seed + 1)
                dy = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
                grads = list(torch.autograd.grad(out, wrt, dy, allow_unused=True))
            else:
                grads = [None] * len(wrt)
            after = [b.detach().clone() for b in buffers]
    finally:
        with torch.no_grad():
            for b, saved in zip(buffers, before, strict=True):
                b.copy_(saved)
    return _Run(out.detach(), grads, after)


def difference(expected: Tensor | None, actual: Tensor | None, what: str) -> Outcome:
    if expected is None or actual is None:
        if expected is None and actual is None:
            return Outcome(0.0, None)
        missing = "the original" if expected is None else "the replacement"
        return Outcome(float("inf"), f"{what}: {missing} gives none")
    if expected.shape != actual.shape or expected.dtype != actual.dtype:
        return Outcome(float("inf"), f"{what}: {list(actual.shape)} {actual.dtype} where the original gives "
                                     f"{list(expected.shape)} {expected.dtype}")
    if not expected.is_floating_point():
        same = torch.equal(expected, actual)
        return Outcome(0.0 if same else float("inf"), None if same else f"{what} differs")
    e, a = expected.double(), actual.double()
    if not torch.equal(e.isnan(), a.isnan()):
        return Outcome(float("inf"), f"{what}: NaN where the original has none, or the reverse")
    finite = e.isfinite() & a.isfinite()
    if not torch.equal(e[~finite], a[~finite]):
        return Outcome(float("inf"), f"{what}: infinities differ")
    e, a = e[finite], a[finite]
    if e.numel() == 0:
        return Outcome(0.0, None)
    scale = e.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    error = ((e - a).abs().max() / scale).item()
    tol = TOLERANCE.get(expected.dtype, 1e-5)
    if error > tol:
        return Outcome(error, f"{what} differs by {error:.3g} of its largest magnitude (tolerance {tol:g})")
    return Outcome(error, None)


def compare(original: Callable[[Tensor], Tensor], replacement: Callable[[Tensor], Tensor], x: Tensor,
            params: dict[str, Tensor], buffers: dict[str, Tensor], seed: int = 0, *,
            gradients: bool = True) -> Outcome:
    """Run both forwards on ``x`` and compare the outputs, the gradients of the input and of
    ``params`` (which both must use) for one random upstream gradient (``gradients=False``:
    not), and the values the calls leave in ``buffers`` (restored afterwards). Both runs start
    from the caller's random state (dropout draws the same mask), which is restored after. An
    exception of the original or of the replacement is a refusal with its message. The first
    quantity that disagrees is the outcome, else the worst agreement."""
    each = _compare_each(original, replacement, x, params, buffers, seed, gradients)
    if isinstance(each, Outcome):
        return each
    worst = Outcome(0.0, None)
    for outcome in each:
        if outcome.reason is not None:
            return outcome
        worst = max(worst, outcome, key=lambda o: o.error)
    return worst


def _compare_each(original: Callable[[Tensor], Tensor], replacement: Callable[[Tensor], Tensor], x: Tensor,
                  params: dict[str, Tensor], buffers: dict[str, Tensor], seed: int,
                  gradients: bool) -> Outcome | list[Outcome]:
    """:func:`compare`'s outcome for each quantity, in a fixed order (output, input gradient,
    parameter gradients, buffers), or the refusal where a call raised."""
    names, tensors = list(params), list(params.values())
    buffer_names, buffer_list = list(buffers), list(buffers.values())
    state = _rng_state(x.device)
    try:
        try:
            ref = _run(original, x, tensors, buffer_list, seed, gradients)
        except Exception as exc:  # noqa: BLE001 - any failure means the probe cannot vouch for it
            return Outcome(float("inf"), f"the original fails on a probe input of shape {list(x.shape)}: "
                                         f"{type(exc).__name__}: {exc}")
        _set_rng_state(x.device, state)
        try:
            new = _run(replacement, x, tensors, buffer_list, seed, gradients)
        except Exception as exc:  # noqa: BLE001
            return Outcome(float("inf"), f"the replacement fails on a probe input of shape {list(x.shape)}: "
                                         f"{type(exc).__name__}: {exc}")
    finally:
        _set_rng_state(x.device, state)
    labels = ["input gradient", *(f"gradient of {n}" for n, t in zip(names, tensors, strict=True) if t.requires_grad)]
    pairs = [(ref.out, new.out, "output"), *zip(ref.grads, new.grads, labels, strict=True),
             *zip(ref.buffers, new.buffers, [f"{n} after the call" for n in buffer_names], strict=True)]
    return [difference(expected, actual, what) for expected, actual, what in pairs]


def nearer_truth(outcome: Outcome, truth: Callable[[Tensor], Tensor] | None, original: Callable[[Tensor], Tensor],
                 replacement: Callable[[Tensor], Tensor], x: Tensor, params: dict[str, Tensor],
                 buffers: dict[str, Tensor], seed: int = 0, *, gradients: bool = True) -> Outcome:
    """``outcome`` (``original`` against ``replacement`` on ``x``), its disagreement forgiven
    where ``truth`` (the original computed in float64, rounded to ``x``'s dtype) finds each
    quantity of the replacement (output, each gradient, each buffer) within tolerance, or within
    twice the original's own error on that quantity (the tests' bound): rounding in another
    order, or a more accurate statistic, differs from the original by more than the tolerance
    where the original itself is that far from exact (a group of two elements: torch's float32
    GroupNorm input gradient is 1.6e-4 off), a wrong formula is O(1) off the truth. ``truth``
    must leave the buffers the probe reads as the original does (a module without buffers)."""
    if outcome.reason is None or truth is None or not x.is_floating_point():
        return outcome
    mine = _compare_each(truth, replacement, x, params, buffers, seed, gradients)
    theirs = _compare_each(truth, original, x, params, buffers, seed, gradients)
    if isinstance(mine, Outcome) or isinstance(theirs, Outcome):
        return outcome
    for m, t in zip(mine, theirs, strict=True):
        if m.reason is not None and not m.error <= 2 * t.error < float("inf"):
            return outcome
    return Outcome(outcome.error, None)


def compare_inputs(original: Callable[[Tensor], Tensor], replacement: Callable[[Tensor], Tensor],
                   inputs: Sequence[tuple[str, Tensor]], params: dict[str, Tensor], buffers: dict[str, Tensor],
                   seed: int = 0, *, gradients: bool = True, truth: Callable[[Tensor], Tensor] | None = None
                   ) -> Outcome:
    """:func:`compare` on each labelled input that ``original`` takes (maps to a tensor of the
    input's shape, as every norm does; an input it refuses, or broadcasts to another shape, is
    not one its model can feed it). The replacement must take every one of those and agree on
    all (or, given ``truth``, be as near it as :func:`nearer_truth` asks); the worst agreement is
    returned, or the first disagreement, naming the input. Warnings the inputs provoke (a rank
    torch only warns about) are the probe's, not the caller's: they are silenced."""
    worst, first_failure = None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, x in inputs:
            state = _rng_state(x.device)
            try:
                accepted = _run(original, x, [], list(buffers.values()), seed, False).out.shape == x.shape
            except Exception as exc:  # noqa: BLE001 - an input the original refuses says nothing
                accepted = False
                first_failure = first_failure or f"{type(exc).__name__}: {exc}"
            finally:
                _set_rng_state(x.device, state)
            if not accepted:
                continue
            outcome = compare(original, replacement, x, params, buffers, seed, gradients=gradients)
            outcome = nearer_truth(outcome, truth, original, replacement, x, params, buffers, seed,
                                   gradients=gradients)
            if outcome.reason is not None:
                return Outcome(outcome.error, f"on probe input {label}: {outcome.reason}")
            worst = outcome if worst is None else max(worst, outcome, key=lambda o: o.error)
    if worst is None:
        return Outcome(float("inf"), "the original takes none of the probe inputs"
                                     + (f" (first error: {first_failure})" if first_failure else ""))
    return worst
