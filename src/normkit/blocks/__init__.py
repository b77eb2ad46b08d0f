"""The from-scratch math and the torch compositions of the norms of today's blocks
(:mod:`normkit.functional_blocks`), one file per family:

* :mod:`.modulated`: ``modulated_layer_norm``, ``modulated_rms_norm``;
* :mod:`.gated`: ``gated_rms_norm``;
* :mod:`.qk_sandwich`: ``qk_rms_norm``, ``sandwich_rms_norm``;
* :mod:`.norm_free`: ``dyt``, ``derf``.

Each family module has ``REFERENCE`` (op -> the reference implementation: float64-exact
formulas with a hand-derived backward, re-exported by :mod:`normkit.reference`) and
``COMPOSITION`` (op -> the composition of torch ops users write today: what the ``"torch"``
backend runs, and the oracle of the kernel backends), both taking the op's arguments as
:data:`normkit.backends.OPS` lists them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import gated, modulated, norm_free, qk_sandwich

__all__ = ["COMPOSITION", "REFERENCE"]

_FAMILIES = (modulated, gated, qk_sandwich, norm_free)

REFERENCE: dict[str, Callable[..., Any]] = {op: fn for f in _FAMILIES for op, fn in f.REFERENCE.items()}
COMPOSITION: dict[str, Callable[..., Any]] = {op: fn for f in _FAMILIES for op, fn in f.COMPOSITION.items()}
