"""Test set-up: the models are registered by importing the package, as a user's `import timm_cabvit` does."""
import pytest
import torch

import timm_cabvit  # noqa: F401  (registers the models with timm)

H_MODELS = ['cabvit_h_l1', 'cabvit_h_l2', 'cabvit_h_l3']
ALL_MODELS = ['cabvit_p_l0', *H_MODELS]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope='module')
def one_thread():
    """One torch thread for a test module: on shared CI cores, OpenMP threads waiting on each other make small
    forward passes and training steps 5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
