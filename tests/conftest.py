"""Shared fixtures: seeded RNG per test, float64 default, hypothesis profiles, a counter of host reads."""

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=15, derandomize=True, deadline=None)
settings.register_profile("dev", max_examples=40, deadline=None)
settings.load_profile("dev")

# Tests use tiny tensors: one intra-op thread per pytest worker avoids oversubscribing the cores
# (``make test`` runs two workers).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded_rng():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


@pytest.fixture
def host_reads(monkeypatch):
    """A list that records every read of a tensor's value by Python (``item``, ``tolist``, ``bool``, ``float``,
    ``int``: on a GPU each waits for the device) until the test calls ``monkeypatch.undo()`` or ends."""
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name):
            reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads
