"""Test set-up: the models are registered by importing the package, as a user's `import timm_cabvit` does.

Under pytest-xdist each worker, and each subprocess a test starts, gets its share of the cores: OpenMP threads of
two workers spinning on the same two cores make small forward passes up to 30x slower.

Fixtures and hooks only: the helpers and constants the test modules share are in support.py.
"""
import os

import pytest
import torch

import timm_cabvit  # noqa: F401  (registers the models with timm)


def _threads_per_worker() -> int:
    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    return max(1, cores // workers)


if 'PYTEST_XDIST_WORKER' in os.environ and 'OMP_NUM_THREADS' not in os.environ:
    torch.set_num_threads(_threads_per_worker())
    os.environ['OMP_NUM_THREADS'] = str(torch.get_num_threads())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _keep_threads():
    """A test that sets torch's thread count (the CLI's `--threads`) leaves it as it found it: logits computed
    later in the same worker on other threads are not bit-identical to those of a subprocess on the worker's."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def one_thread():
    """One torch thread for a test module: on shared CI cores, OpenMP threads waiting on each other make small
    forward passes and training steps 5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

