"""Test fixtures around the global random generators, for test modules that run code which
seeds them (the training CLI)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def keep_global_rng():
    """The CLI seeds the global RNGs; restore them so later tests keep fresh random inputs.

    Autouse in every module that imports it."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])
