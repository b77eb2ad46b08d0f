"""torch's own module tests, run against normkit: every ``ModuleInfo`` of ``module_db``
(``torch.testing._internal.common_modules``) whose class has a normkit twin.

For each of torch's samples (constructor arguments, forward input; training and eval; float64 and
float32) torch's module and normkit's twin are built with the same arguments and the same random
parameters and statistics, run on every backend, and compared: output, input and parameter
gradients under a random upstream gradient, and the state after the call (running statistics,
``num_batches_tracked``). The lazy twins (``LazyBatchNorm2d`` ...) take the same samples without
their first constructor argument. torch's error samples must raise torch's exception and
message. None of these inputs were written for normkit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import normkit
from _outside import assert_same_error, assert_same_numbers, clone_tree, module_db, raised
from cases import BACKENDS, MUST_RUN, randomize_, seed_of, skip_if_declined

# torch's own unbatched InstanceNorm samples warn that dim 0 is not num_features (affine=False)
pytestmark = pytest.mark.filterwarnings("ignore:input's size at dim=0 does not match num_features:UserWarning")

FLOATS = (torch.float64, torch.float32)
# A row norm costs the Triton interpreter ~5 ms per row: torch's "large_batch" samples (640 rows)
# would take seconds for nothing the small samples do not already cover.
TRITON_MAX_BATCH = 16


def _twin(cls: type) -> type | None:
    twin = getattr(normkit, cls.__name__, None)
    return twin if isinstance(twin, type) and issubclass(twin, cls) else None


INFOS = [info for info in module_db() if _twin(info.module_cls) is not None]


@dataclass(frozen=True)
class Sample:
    name: str  # the torch.nn class
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]
    forward_args: tuple[Any, ...]
    training: bool
    desc: str

    @property
    def batch(self) -> int:
        x = self.forward_args[0]
        return x.shape[0] if x.dim() else 1


def _samples() -> list[Sample]:
    torch.manual_seed(0)  # module_inputs_func draws with the global generator
    out = []
    for info in INFOS:
        # Stateless modules compute the same in train and eval (train_and_eval_differ): once.
        for training in (True, False) if info.train_and_eval_differ else (True,):
            for s in info.module_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=True,
                                             training=training):
                ctor, fwd = s.constructor_input, s.forward_input
                assert not fwd.kwargs, "no module_db norm sample passes forward keywords"
                name = info.module_cls.__name__
                sample = Sample(name, tuple(ctor.args), tuple(ctor.kwargs.items()), tuple(fwd.args), training,
                                s.desc or "default")
                out.append(sample)
                if name.startswith(("BatchNorm", "InstanceNorm")):  # the lazy twin infers num_features
                    out.append(Sample("Lazy" + name, sample.args[1:], sample.kwargs, sample.forward_args,
                                      training, sample.desc))
    return out


def _params() -> list[Any]:
    params = []
    for s in _samples():
        for backend in BACKENDS:
            if s.name.startswith("Lazy") and backend not in MUST_RUN:
                continue  # materializing is the module's, not the backend's: the CPU backends show it
            if backend == "triton" and (s.batch > TRITON_MAX_BATCH or (not s.training and "BatchNorm" not in s.name)):
                # InstanceNorm in eval runs the same kernel as in training (no running
                # statistics) or is declined (with them): only BatchNorm has a separate eval path
                continue
            sid = f"{s.name}-{s.desc}-{'train' if s.training else 'eval'}-{backend}"
            params.append(pytest.param(s, backend, id=sid))
    return params


def _build(lib: Any, s: Sample, dtype: torch.dtype, **extra: Any) -> nn.Module:
    cls = getattr(lib, s.name)
    if s.name.startswith("Lazy"):
        return cls(*s.args, **dict(s.kwargs), dtype=dtype, **extra)
    return cls(*s.args, **dict(s.kwargs), **extra).to(dtype)


def _state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize(("sample", "backend"), _params())
@skip_if_declined
def test_module_db_sample_matches_torch(sample: Sample, backend: str) -> None:
    # triton declines float64 (its kernels compute in fp32 at most)
    for dtype in FLOATS if backend in MUST_RUN else (torch.float32,):
        _check_sample(sample, dtype, backend)


def _check_sample(sample: Sample, dtype: torch.dtype, backend: str) -> None:
    theirs = _build(nn, sample, dtype).train(sample.training)
    ours = _build(normkit, sample, dtype, backend=backend).train(sample.training)
    if not sample.name.startswith("Lazy"):  # random parameters and statistics, the same in both
        randomize_(theirs, seed_of("module_db", sample.name, sample.desc))
        ours.load_state_dict(theirs.state_dict())
    x_theirs = clone_tree(sample.forward_args, dtype)
    x_ours = clone_tree(sample.forward_args, dtype)
    try:
        expected = theirs(*x_theirs)
    except Exception as e:  # noqa: BLE001 - torch refuses this sample: normkit must say the same
        assert_same_error(e, raised(lambda: ours(*x_ours)), f"{sample.name} on {tuple(x_ours[0].shape)}")
        return
    actual = ours(*x_ours)
    assert_same_numbers(actual, expected, None, dtype, "output")
    gen = torch.Generator().manual_seed(seed_of("module_db dy", sample.desc))
    dy = torch.randn(expected.shape, generator=gen, dtype=torch.float64).to(dtype)
    if expected.requires_grad:
        expected.backward(dy)
        actual.backward(dy)
        assert_same_numbers(x_ours[0].grad, x_theirs[0].grad, None, dtype, "input gradient")
        theirs_params = dict(theirs.named_parameters())
        for name, p in ours.named_parameters():
            assert_same_numbers(p.grad, theirs_params[name].grad, None, dtype, f"gradient of {name}")
    ours_state, theirs_state = _state(ours), _state(theirs)
    assert ours_state.keys() == theirs_state.keys()
    for key, value in theirs_state.items():
        assert_same_numbers(ours_state[key], value, None, dtype, f"{key} after the call")


# ---- torch's error samples ---------------------------------------------------------------------


def _error_params() -> list[Any]:
    params = []
    for info in INFOS:
        if info.module_error_inputs_func is None:
            continue
        for i, e in enumerate(info.module_error_inputs_func(info, device="cpu", dtype=torch.float32,
                                                            requires_grad=False, training=True)):
            for backend in BACKENDS:
                params.append(pytest.param(info.module_cls.__name__, e, backend,
                                           id=f"{info.module_cls.__name__}-{i}-{backend}"))
    return params


@pytest.mark.parametrize(("name", "error", "backend"), _error_params())
def test_module_db_error_sample_raises_torchs_error(name: str, error: Any, backend: str) -> None:
    mi = error.module_error_input
    ctor, fwd = mi.constructor_input, mi.forward_input

    def build(lib: Any, **extra: Any) -> nn.Module:
        return getattr(lib, name)(*ctor.args, **ctor.kwargs, **extra)

    theirs_build = raised(lambda: build(nn))
    ours_build = raised(lambda: build(normkit, backend=backend))
    if theirs_build is not None:
        assert_same_error(theirs_build, ours_build, f"{name}{ctor.args}{ctor.kwargs}: construction")
        return
    assert ours_build is None, f"normkit raises {ours_build!r} at construction; torch does not"
    theirs, ours = build(nn), build(normkit, backend=backend)
    theirs_error = raised(lambda: theirs(*clone_tree(fwd.args)))
    assert theirs_error is not None and isinstance(theirs_error, error.error_type)
    assert_same_error(theirs_error, raised(lambda: ours(*clone_tree(fwd.args))), f"{name}: forward")
