import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import libmoe  # noqa: E402  (the package under test: the build tree's, see run_pytest.py)

SMALL = dict(d_model=16, d_ff=32, num_experts=4, top_k=2, seed=7)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def layer():
    with libmoe.Layer(**SMALL) as lay:
        yield lay


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)
