"""Helpers and constants shared by the test modules, imported as `from support import ...` (pytest puts tests/ on
sys.path, as for the other sibling modules fresh_env.py and timm_suite.py). Fixtures and hooks stay in conftest.py.
"""
import importlib.util
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[1] / 'examples'
H_MODELS = ['cabvit_h_l1', 'cabvit_h_l2', 'cabvit_h_l3']
ALL_MODELS = ['cabvit_p_l0', *H_MODELS]


def load_example(name: str) -> ModuleType:
    """examples/<name>.py as a module: the examples are scripts, not part of the package."""
    spec = importlib.util.spec_from_file_location(f'cabvit_{name}_example', EXAMPLES / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
