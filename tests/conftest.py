"""Suite-wide settings."""

import pytest
import torch

import interpreter_share
import numba_warmup

# The suite runs thousands of tiny ops: ATen's thread pool costs more than it saves there, and on
# a loaded 2-core CI machine it turns 0.1 ms calls into 5-30 ms ones.
torch.set_num_threads(1)

interpreter_share.patch_language_once()


def pytest_sessionstart(session) -> None:
    numba_warmup.from_xdist()


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "gpu_schedule: a property only a GPU's parallel schedule can break "
                            "(skipped under TRITON_INTERPRET=1: see interpreter_share.py)")


def pytest_collection_modifyitems(config, items) -> None:
    if interpreter_share.INTERPRETED:
        for item in items:
            if item.get_closest_marker("gpu_schedule"):
                item.add_marker(pytest.mark.skip(reason=interpreter_share.SCHEDULE_REASON))
    dropped = interpreter_share.deselected(items)
    if dropped:
        gone = {id(item) for item in dropped}
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if id(item) not in gone]
