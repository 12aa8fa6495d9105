"""Shared by every test file: one torch thread.

On the 2-core CI box torch's default intra-op threads made tiny models ~50x slower (0.45 s against 0.006 s
per forward+backward), and test_real.py took 227 s with two threads against 66 s with one, another job beside
it (measured); results agree up to float rounding."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
