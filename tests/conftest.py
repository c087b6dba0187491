"""Test set-up: the models are registered by importing the package, as a user's `import timm_cabvit` does.

Under pytest-xdist each worker, and each subprocess a test starts, gets its share of the cores: OpenMP threads of
two workers spinning on the same two cores make small forward passes up to 30x slower.
"""
import importlib.util
import os
from pathlib import Path
from types import ModuleType

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

EXAMPLES = Path(__file__).resolve().parents[1] / 'examples'
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


def load_example(name: str) -> ModuleType:
    """examples/<name>.py as a module: the examples are scripts, not part of the package."""
    spec = importlib.util.spec_from_file_location(f'cabvit_{name}_example', EXAMPLES / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
