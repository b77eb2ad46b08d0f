"""``use_backend()`` blocks belong to one thread and one asyncio task.

A block in one thread (or task) never changes what another thread (or task) runs, also while
both are inside their blocks at the same moment; blocks nest; an exception leaves the outer
block in force. Under ``torch.compile`` the block is guarded per thread; where asyncio tasks'
blocks overlap in one thread, compiled code raises instead of guessing.

Which backend ran shows in the numbers: the ``negated`` backend's layer_norm is torch's negated.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import normkit
from cases import make_input, randomize_, seed_of
from normkit.backends import _REGISTRY, _THREAD, ENV_VAR, Backend, BackendError, OpImpl

TIMEOUT = 60.0  # seconds for a barrier or a join: a deadlock fails instead of hanging CI


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setitem(_REGISTRY, "negated", Backend("negated", {"layer_norm": OpImpl(lambda *a: -F.layer_norm(*a))}))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    assert normkit.current_backend() == "auto", "a block leaked out of its test"


@pytest.fixture
def layer_norm() -> normkit.LayerNorm:
    return randomize_(normkit.LayerNorm(5), seed_of("threads"))


X = make_input((3, 5), torch.float32, seed_of("threads x"), requires_grad=False)


def _which(run: Callable[[Tensor], Tensor], plain: Tensor) -> str:
    """"negated" or "auto", from the numbers ``run`` gives."""
    y = run(X)
    if torch.allclose(y, -plain):
        return "negated"
    assert torch.allclose(y, plain), "neither backend's numbers"
    return "auto"


def _in_threads(*bodies: Callable[[threading.Barrier], str]) -> list[str]:
    """Run each body in its own thread, all started together; their results, in order."""
    barrier = threading.Barrier(len(bodies), timeout=TIMEOUT)
    results: list[str | BaseException] = [""] * len(bodies)

    def run(i: int) -> None:
        try:
            results[i] = bodies[i](barrier)
        except BaseException as e:  # re-raised in the main thread
            results[i] = e
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive(), "a thread hung"
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]


def _blocked(name: str | None, run: Callable[[Tensor], Tensor], plain: Tensor) -> Callable[[threading.Barrier], str]:
    """A thread body: inside ``use_backend(name)`` (none for None) while every other thread is
    inside its own, report the current backend and the backend that ran."""

    def body(barrier: threading.Barrier) -> str:
        block = normkit.use_backend(name) if name else _nothing()
        with block:
            barrier.wait()  # every thread is inside its block now
            seen = f"{normkit.current_backend()}/{_which(run, plain)}"
            barrier.wait()  # and stays there until every thread has run
        return seen

    return body


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_concurrent_threads_each_run_their_own_block(layer_norm: normkit.LayerNorm) -> None:
    plain = layer_norm(X)
    seen = _in_threads(*(_blocked(name, layer_norm, plain) for name in ("negated", None, "torch", "negated")))
    assert seen == ["negated/negated", "auto/auto", "torch/auto", "negated/negated"]


def test_a_thread_starts_outside_the_blocks_of_the_thread_that_started_it(layer_norm: normkit.LayerNorm) -> None:
    plain = layer_norm(X)
    with normkit.use_backend("negated"):
        (seen,) = _in_threads(_blocked(None, layer_norm, plain))
        assert _which(layer_norm, plain) == "negated"
    assert seen == "auto/auto"


def test_nested_blocks_and_exceptions_restore_the_outer_block_in_each_thread(layer_norm: normkit.LayerNorm) -> None:
    plain = layer_norm(X)

    def body(outer: str, inner: str) -> Callable[[threading.Barrier], str]:
        def run(barrier: threading.Barrier) -> str:
            seen = []
            with normkit.use_backend(outer):
                barrier.wait()
                with pytest.raises(KeyError):
                    with normkit.use_backend(inner):
                        seen.append(normkit.current_backend())
                        barrier.wait()  # both threads inside their inner block
                        raise KeyError("leave the block by an exception")
                seen.append(normkit.current_backend())
                seen.append(_which(layer_norm, plain))
                barrier.wait()
            seen.append(normkit.current_backend())
            return " ".join(seen)

        return run

    assert _in_threads(body("negated", "torch"), body("torch", "negated")) == [
        "torch negated negated auto",
        "negated torch auto auto",
    ]


def test_asyncio_tasks_each_run_their_own_block(layer_norm: normkit.LayerNorm) -> None:
    plain = layer_norm(X)

    async def task(name: str | None, entered: asyncio.Event, other: asyncio.Event) -> str:
        with normkit.use_backend(name) if name else _nothing():
            entered.set()
            await asyncio.wait_for(other.wait(), TIMEOUT)  # the other task is inside its block now
            seen = f"{normkit.current_backend()}/{_which(layer_norm, plain)}"
            with pytest.raises(ValueError):
                with normkit.use_backend("torch"):
                    await asyncio.sleep(0)  # let the other task run inside this nested block
                    raise ValueError
            assert normkit.current_backend() == (name or "auto")
            return seen

    async def main() -> list[str]:
        a, b = asyncio.Event(), asyncio.Event()
        with normkit.use_backend("negated"):  # a task starts in the blocks it was created in
            inherited = asyncio.create_task(asyncio.sleep(0, normkit.current_backend()))
        return [*await asyncio.gather(task("negated", a, b), task(None, b, a)), await inherited]

    assert asyncio.run(main()) == ["negated/negated", "auto/auto", "negated"]


# ---- under torch.compile -----------------------------------------------------------------------


def test_compiled_model_follows_each_threads_own_block(layer_norm: normkit.LayerNorm) -> None:
    compiled = torch.compile(layer_norm, fullgraph=True, backend="aot_eager")
    plain = layer_norm(X)
    with normkit.use_backend("negated"):  # compile both variants first: the threads only run them
        assert _which(compiled, plain) == "negated"
    assert _which(compiled, plain) == "auto"
    seen = _in_threads(_blocked("negated", compiled, plain), _blocked(None, compiled, plain))
    assert seen == ["negated/negated", "auto/auto"]


def test_compiled_model_in_asyncio_tasks(layer_norm: normkit.LayerNorm) -> None:
    """Tasks whose blocks do not overlap are exact under compile; overlapping blocks in one
    thread make compiled code raise with ``fullgraph=True`` (dynamo wraps normkit's
    BackendError) and fall back to exact eager code without it, never run another task's
    backend."""
    compiled = torch.compile(layer_norm, fullgraph=True, backend="aot_eager")
    with_breaks = torch.compile(layer_norm, backend="aot_eager")
    plain = layer_norm(X)

    async def one_after_another() -> list[str]:
        async def task(name: str | None) -> str:
            with normkit.use_backend(name) if name else _nothing():
                return _which(compiled, plain)

        return [await asyncio.create_task(task("negated")), await asyncio.create_task(task(None))]

    assert asyncio.run(one_after_another()) == ["negated", "auto"]

    async def overlapping() -> None:
        entered = asyncio.Event()

        async def holder() -> None:
            with normkit.use_backend("negated"):
                entered.set()
                await asyncio.sleep(0.05)

        async def caller() -> None:
            await asyncio.wait_for(entered.wait(), TIMEOUT)
            with normkit.use_backend("torch"):
                with pytest.raises((BackendError, torch._dynamo.exc.Unsupported), match="asyncio tasks overlap"):
                    compiled(X)
                assert _which(with_breaks, plain) == "auto"
                assert _which(layer_norm, plain) == "auto"

        await asyncio.gather(holder(), caller())

    asyncio.run(overlapping())
    assert _which(compiled, plain) == "auto"  # every block closed: unambiguous again


def test_block_closed_from_another_context_is_released() -> None:
    """A generator holding a block, advanced in a copied context and closed from this one:
    ContextVar.reset refuses the foreign token, but the block is still released for this
    thread (compiled code reads the thread's copy, which must not stay on the closed block)."""
    def hold() -> Iterator[int]:
        with normkit.use_backend("reference"):
            yield 1

    gen = hold()
    contextvars.copy_context().run(next, gen)
    gen.close()
    assert _THREAD.open == 0 and _THREAD.stack == ()
    assert normkit.current_backend() == "auto"
