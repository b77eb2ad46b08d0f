"""One environment variable, read cheaply on every call and still exact.

``os.environ.get`` of an unset variable costs about a microsecond (``os.environ`` raises and
catches two KeyErrors), a large share of a small normalization call. :class:`EnvWatch` keeps the
value it last read and reads ``os.environ`` again only after the variable may have changed. It
learns of changes from Python's audit events ``os.putenv`` and ``os.unsetenv``: every assignment
to or deletion from ``os.environ`` (and ``os.environb``, ``os.putenv``, ``os.unsetenv``) raises
one, with the variable's name, before the change is written into ``os.environ``.

Because the event comes before the write, an event alone does not say when the new value can be
read. The watch therefore trusts a value only when the variable's last event from every thread
that changed it has been seen written:

* a thread's earlier change is written once that thread goes on to anything else, so a read in
  the changing thread itself, or a later event from it, settles it (a finished thread too);
* a change by another thread still running is settled only where its value is the value read
  (its pending write then writes what is cached).

Anything else (a change whose thread is still running and which wrote another value, or a change
made outside ``os.environ``: ``os.putenv`` alone, which ``os.environ`` does not see) means reading
``os.environ`` on every call, as without the watch. Where the hook cannot be installed (an audit
hook already installed refuses new ones), every call reads ``os.environ``.

The price: once normkit is imported, every audit event of the process (``sys._getframe``,
``open``, ``import``, ...) calls one more Python function, about 0.18 µs each (CPython's cost of
any Python audit hook), against about a microsecond saved on every normalization call.

Under ``torch.compile`` read ``os.environ`` directly instead: dynamo reads it once per graph.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

__all__ = ["EnvWatch"]

_CHECK = "normkit.env_watch"  # an event of our own: proves the hook runs
_EVENTS = frozenset({"os.putenv", "os.unsetenv", _CHECK})


class EnvWatch:
    """``os.environ.get(name)``, cached between changes of ``name`` (see the module)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        # per thread that changed the variable and is not yet known to have written it:
        # thread -> the value its last event set (None: deleted)
        self._pending: dict[threading.Thread, str | None] = {}
        self._token = object()  # replaced by every change event
        self._cache: tuple[object, Any, str | None] = (None, None, None)
        self._environ = os.environ  # a mapping put in its place is read, never cached
        for key in (name, os.fsencode(name)):
            _WATCHES.setdefault(key, []).append(self)
        _install()

    @property
    def _hooked(self) -> bool:
        return _hook_runs

    def _changed(self, value: str | None) -> None:
        with self._lock:
            self._pending[threading.current_thread()] = value
            self._token = object()

    def _forked(self) -> None:
        # a lock another thread held at the fork stays held in the child: a new one, and a new read
        self._lock = threading.Lock()
        self._token = object()

    def get(self) -> str | None:
        """``os.environ.get(name)``."""
        token, mapping, value = self._cache
        if token is self._token and mapping is os.environ:
            return value
        return self._read()

    def _read(self) -> str | None:
        mapping = os.environ
        if not self._hooked or mapping is not self._environ:
            return mapping.get(self.name)
        with self._lock:
            token = self._token
            # this thread's own changes are written by now; so are a finished thread's
            self._pending.pop(threading.current_thread(), None)
            for thread in [t for t in self._pending if not t.is_alive()]:
                del self._pending[thread]
            pending = list(self._pending.values())
        value = mapping.get(self.name)
        if all(p == value for p in pending):
            with self._lock:
                if token is self._token:  # no change began while reading
                    self._cache = (token, mapping, value)
        return value


# One audit hook for every watch (a hook cannot be removed, and each costs every audit event).
_WATCHES: dict[str | bytes, list[EnvWatch]] = {}  # a variable's name, str and bytes -> its watches
_install_lock = threading.Lock()
_installed = False
_hook_runs = False


def _hook(event: str, args: tuple[Any, ...]) -> None:
    # runs on every audit event of the process (sys._getframe, open, import, ...): a plain
    # function and one set lookup, about 25 ns over CPython's own cost of a Python hook
    if event in _EVENTS:
        _on_event(event, args)


def _on_event(event: str, args: tuple[Any, ...]) -> None:
    global _hook_runs
    if event == _CHECK:
        _hook_runs = True
        return
    key = args[0] if args else None
    watches = _WATCHES.get(key) if isinstance(key, (str, bytes)) else None
    if watches:
        value = args[1] if event == "os.putenv" else None
        if isinstance(value, bytes):
            value = os.fsdecode(value)
        for watch in watches:
            watch._changed(value)


def _install() -> None:
    global _installed
    with _install_lock:
        if _installed:
            return
        _installed = True
        sys.addaudithook(_hook)  # (silently not added where an installed hook refuses it)
        sys.audit(_CHECK)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_forked)


def _forked() -> None:
    for watches in list(_WATCHES.values()):
        for watch in watches:
            watch._forked()
