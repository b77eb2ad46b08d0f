"""(being written)"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

REFERENCE: dict[str, Callable[..., Any]] = {}
COMPOSITION: dict[str, Callable[..., Any]] = {}
