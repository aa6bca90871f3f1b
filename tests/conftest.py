"""Fixtures shared by the test files.

The suite plans without ORT latency rounding (``$FXPRUNE_ROUND_TO=none``): a CI machine starts with
an empty latency cache, and the default ``round_to="fast"`` would time ORT kernels for every new
model. The tests of that default unset it (``monkeypatch.delenv``) and use a fixed fake table.
"""
import os

import pytest
import torch

os.environ["FXPRUNE_ROUND_TO"] = "none"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # the workers share the cores: each takes its share of intra-op threads, not all of them
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of many small forwards: on a shared 2-core machine it is
    about twice as fast as two. Restores the thread count afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
