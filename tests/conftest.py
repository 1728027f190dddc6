"""Shared test set-up."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _fixed_global_generators():
    """Seed torch's and numpy's global generators before every test.

    Some library calls (BoTorch's optimize_acqf, torch.randn without a generator) draw from the global
    generators. Without this, a test's draws depend on every test that ran before it, and on how many
    iterations a time-budgeted fit managed: a pass on one machine could fail on another.
    """
    torch.manual_seed(0)
    np.random.seed(0)
    yield
