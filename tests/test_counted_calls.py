"""Every module of the BatchNorm family counts a training call in ``num_batches_tracked`` only
when the call succeeds, and a call whose counter cannot be written fails before any write.

torch's own BatchNorm increments first, so a counter that refuses the write (a module built
under ``torch.inference_mode()`` used outside it, buffers captured by ``torch.func.grad``)
fails it before any work. normkit increments last; it must raise the same error just as early,
for the variants (BatchRenorm, GhostBatchNorm, BatchNormAct2d) as for plain BatchNorm, while
a counter that can be written is never probed (the probe costs a kernel launch per call).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normkit
from cases import seed_of

# The modules that increment num_batches_tracked in training, with their extra arguments.
FAMILY = {
    "BatchNorm2d": (), "BatchRenorm2d": (), "GhostBatchNorm2d": (2,), "BatchNormAct2d": (),
}
# The refusals torch raises at the increment, with the message each starts with.
REFUSALS = {
    "inference_mode": "^Inplace update to inference tensor outside InferenceMode",
    "func.grad": "^During a grad .* mutate a captured Tensor",
}


def _input() -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed_of("counted calls"))
    return torch.randn(4, 3, 2, 2, generator=generator)


def _build(name: str) -> nn.Module:
    return getattr(normkit, name)(3, *FAMILY[name])


@pytest.mark.parametrize("refusal", list(REFUSALS))
@pytest.mark.parametrize("name", list(FAMILY))
def test_a_counter_that_refuses_the_write_fails_the_call_before_any_write(name: str, refusal: str) -> None:
    x = _input()
    if refusal == "inference_mode":
        with torch.inference_mode():
            module = _build(name)
        call = lambda: module(x)  # noqa: E731
    else:
        module = _build(name)
        call = lambda: torch.func.grad(lambda t: module(t).square().sum())(x)  # noqa: E731
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(RuntimeError, match=REFUSALS[refusal]):
        call()
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("name", list(FAMILY))
def test_a_writable_counter_is_counted_once_per_batch_and_not_probed(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    probes: list[torch.Tensor] = []
    monkeypatch.setattr(normkit._checks, "check_counter_writable", probes.append)
    module, x = _build(name), _input()
    version = module.num_batches_tracked._version
    module(x)
    chunks = 2 if name.startswith("Ghost") else 1  # Ghost counts virtual batches
    assert module.num_batches_tracked.item() == chunks
    assert module.num_batches_tracked._version == version + chunks  # one write per count
    assert not probes
