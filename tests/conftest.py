import os

import pytest
import torch

# Tests are CPU-only and must be reproducible; keep the thread count fixed so timings and results are stable.
# Under pytest-xdist (pyproject's addopts: two worker processes) each worker gets one thread, and so do the kernels
# and subprocesses it starts: two workers with two OpenMP threads each on a 2-core machine spin against each other.
if os.environ.get("PYTEST_XDIST_WORKER") and "MINIDIFF_TEST_THREADS" not in os.environ:
    os.environ["MINIDIFF_TEST_THREADS"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ.get("MINIDIFF_TEST_THREADS", "2")))


@pytest.fixture
def gen():
    """A seeded CPU generator: every stochastic call in a test takes randomness from here."""
    return torch.Generator().manual_seed(0)


# The longest files first (measured in CI: seconds of one file on one worker), so that pytest-xdist does not start
# them last and leave the other worker idle at the end. Order within a file (a notebook's cells) is kept.
SLOW_FIRST = ["tests/test_grade.py", "tests/test_explorers_browser.py", "notebooks/02_ddpm_from_scratch.ipynb",
              "tests/test_benchmarks_scripts.py", "tests/test_editing.py", "tests/test_training.py",
              "tests/test_distributed.py", "tests/test_validation.py"]


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(SLOW_FIRST)))
