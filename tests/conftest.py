"""Shared test set-up."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _seeded_module():
    """Seed torch's global generator before a module's fixtures (autouse runs first in its scope)."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _seeded_test():
    """Seed torch's global generator before every test.

    Some library calls draw from it (BoTorch's optimize_acqf, the random restarts of ``fit()``).
    Without this, a test's draws depend on every test that ran before it, and on how many
    iterations a time-budgeted fit managed: a pass on one machine could fail on another.
    """
    torch.manual_seed(0)
