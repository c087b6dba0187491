"""Files of the installed timm's source distribution: its model test suite and its train.py.

They are not part of timm's wheel, so they are fetched once from the package index with pip and cached.
"""
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

import timm


def _cache_dir() -> Path:
    return Path(os.environ.get('TIMM_CABVIT_CACHE', Path.home() / '.cache' / 'timm-cabvit'))


def fetch_sdist_file(relative_path: str, version: str = timm.__version__) -> Path:
    """Path of a file of timm's sdist for `version` (e.g. 'tests/test_models.py'), downloading it on first use."""
    target = _cache_dir() / f'timm-{version}' / relative_path
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '--no-binary', ':all:',
               f'timm=={version}', '-d', tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob('timm-*.tar.gz'))
        if not sdists:
            raise RuntimeError(
                f'could not download the source distribution of timm=={version} to get its {relative_path} '
                f'(pip said: {result.stderr.strip()[-500:]}); put the file at {target} to run offline')
        with tarfile.open(sdists[0]) as archive:
            data = archive.extractfile(archive.getmember(f'timm-{version}/{relative_path}')).read()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


def load_test_models() -> ModuleType:
    """Import timm's test_models.py as a module (it parametrizes over the registry, our models included)."""
    path = fetch_sdist_file('tests/test_models.py')
    spec = importlib.util.spec_from_file_location('timm_test_models', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
