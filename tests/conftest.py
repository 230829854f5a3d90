"""Shared fixtures: seeded RNG per test, float64 default, hypothesis profiles."""

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
