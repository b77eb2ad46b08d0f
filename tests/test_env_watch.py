"""NORMKIT_BACKEND is cached between changes (normkit._environ.EnvWatch) and still read exactly:
after every way of changing the environment, from this thread or another, the watch answers what
``os.environ.get`` answers, and a backend set at runtime takes effect on the next call."""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
from unittest import mock

import pytest
import torch

import normkit.functional as NF
from normkit._environ import EnvWatch
from normkit.backends import ENV_VAR, auto_choice

backends_module = sys.modules["normkit.backends"]
NAME = f"NORMKIT_TEST_ENV_WATCH_{os.getpid()}"
_WATCH = EnvWatch(NAME)  # one for the module: an audit hook stays installed for the process


@pytest.fixture
def watch(monkeypatch: pytest.MonkeyPatch) -> EnvWatch:
    monkeypatch.delenv(NAME, raising=False)
    assert _WATCH._hooked
    return _WATCH


def _cached(w: EnvWatch) -> bool:
    return w._cache[0] is w._token


def test_every_route_of_change_is_seen(watch: EnvWatch, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = [
        lambda: os.environ.__setitem__(NAME, "reference"),
        lambda: os.environ.__setitem__(NAME, "torch"),
        lambda: os.environ.__delitem__(NAME),
        lambda: os.environb.__setitem__(os.fsencode(NAME), b"numba"),
        lambda: os.environ.update({NAME: "x\udcff"}),  # undecodable bytes round-trip
        lambda: os.environ.pop(NAME),
        lambda: monkeypatch.setenv(NAME, "reference"),
        lambda: os.environ.setdefault(NAME, "ignored"),
        lambda: monkeypatch.delenv(NAME),
    ]
    for step in steps:
        assert watch.get() == os.environ.get(NAME)
        step()
        assert watch.get() == os.environ.get(NAME)
        assert _cached(watch)  # a change made through os.environ in this thread is settled at once
        assert watch.get() == os.environ.get(NAME)


def test_patch_dict_and_its_restore(watch: EnvWatch) -> None:
    os.environ[NAME] = "before"
    assert watch.get() == "before"
    with mock.patch.dict(os.environ, {NAME: "inside"}):
        assert watch.get() == "inside"
        with mock.patch.dict(os.environ, clear=True):
            assert watch.get() is None
    assert watch.get() == "before"
    del os.environ[NAME]


def test_random_changes_interleaved_with_reads(watch: EnvWatch) -> None:
    rng = random.Random(12)
    for _ in range(300):
        if rng.random() < 0.5:
            if rng.random() < 0.3:
                os.environ.pop(NAME, None)
            else:
                os.environ[NAME] = rng.choice(["auto", "torch", "reference", ""])
        assert watch.get() == os.environ.get(NAME)
    os.environ.pop(NAME, None)


def test_putenv_alone_is_not_os_environ(watch: EnvWatch) -> None:
    os.environ[NAME] = "torch"
    assert watch.get() == "torch"
    os.putenv(NAME, "reference")  # os.environ does not see it, nor does os.environ.get
    assert watch.get() == os.environ.get(NAME) == "torch"
    del os.environ[NAME]
    assert watch.get() is None


def test_a_change_another_thread_has_not_written_yet_is_not_cached(watch: EnvWatch) -> None:
    # The event comes before the write: a thread stopped between the two (here: an event with
    # no write) must keep the other threads reading os.environ until its change is settled.
    announced, finish = threading.Event(), threading.Event()

    def changer() -> None:
        sys.audit("os.putenv", os.fsencode(NAME), b"reference")
        announced.set()
        finish.wait()

    t = threading.Thread(target=changer)
    t.start()
    announced.wait()
    for _ in range(3):
        assert watch.get() is None
        assert not _cached(watch)
    os.environ[NAME] = "torch"  # this thread's change, with the other still pending
    assert watch.get() == "torch"
    assert not _cached(watch)
    os.environ[NAME] = "reference"  # what the pending change would write: consistent either way
    assert watch.get() == "reference"
    assert _cached(watch)
    finish.set()
    t.join()
    del os.environ[NAME]
    assert watch.get() is None
    assert _cached(watch)  # the finished thread's change is settled


def test_a_change_in_another_thread_is_seen(watch: EnvWatch) -> None:
    os.environ[NAME] = "torch"
    assert watch.get() == "torch"
    t = threading.Thread(target=os.environ.__setitem__, args=(NAME, "reference"))
    t.start()
    t.join()
    assert watch.get() == "reference"
    assert _cached(watch)  # this thread's own earlier change, and the finished thread's, are settled
    del os.environ[NAME]
    assert watch.get() is None


def test_a_replaced_os_environ_is_read_every_time(watch: EnvWatch, monkeypatch: pytest.MonkeyPatch) -> None:
    fake: dict[str, str] = {}
    monkeypatch.setattr(os, "environ", fake)
    assert watch.get() is None
    fake[NAME] = "reference"  # no audit event: a plain dict
    assert watch.get() == "reference"


def test_normkit_backend_set_at_runtime_takes_effect_next_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    x = torch.randn(4, 16)
    assert auto_choice("layer_norm", x) is not None
    seen = []
    reference = backends_module.get_backend("reference")
    entry = reference.ops["layer_norm"]

    def spy(*args):
        seen.append(1)
        return entry.fn(*args)

    spied = backends_module.Backend("reference", {"layer_norm": entry._replace(fn=spy)})
    monkeypatch.setitem(backends_module._REGISTRY, "reference", spied)
    NF.layer_norm(x, (16,))
    assert not seen
    os.environ[ENV_VAR] = "reference"
    try:
        assert auto_choice("layer_norm", x) is None
        NF.layer_norm(x, (16,))
        assert seen == [1]
    finally:
        del os.environ[ENV_VAR]
    NF.layer_norm(x, (16,))
    assert seen == [1]
    assert auto_choice("layer_norm", x) is not None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_reads_its_own_environment(watch: EnvWatch) -> None:
    os.environ[NAME] = "torch"
    assert watch.get() == "torch"
    with watch._lock:  # held at the fork (as by another thread): the child must not wait on it
        pid = os.fork()
        if pid == 0:  # the child: exit code 0 only if the watch works there
            ok = False
            signal.alarm(10)  # a deadlock on the inherited lock ends the child (SIGALRM)
            try:
                os.environ[NAME] = "reference"
                ok = watch.get() == "reference" and _cached(watch)
            finally:
                os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert watch.get() == "torch"
    del os.environ[NAME]
