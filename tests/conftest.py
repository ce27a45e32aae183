import os

import pytest
import torch

# Tests are CPU-only and must be reproducible; keep the thread count fixed so timings and results are stable.
torch.set_num_threads(int(os.environ.get("MINIDIFF_TEST_THREADS", "2")))


@pytest.fixture
def gen():
    """A seeded CPU generator: every stochastic call in a test takes randomness from here."""
    return torch.Generator().manual_seed(0)
