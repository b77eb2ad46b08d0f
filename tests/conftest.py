"""Suite-wide settings."""

import torch

import numba_warmup

# The suite runs thousands of tiny ops: ATen's thread pool costs more than it saves there, and on
# a loaded 2-core CI machine it turns 0.1 ms calls into 5-30 ms ones.
torch.set_num_threads(1)


def pytest_sessionstart(session) -> None:
    numba_warmup.from_xdist()
