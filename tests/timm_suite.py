"""timm's own model test suite (`tests/test_models.py` of timm's source distribution), for the installed timm.

The file is not part of timm's wheel, so it is fetched once from the package index with pip and cached.
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


def fetch_test_models(version: str = timm.__version__) -> Path:
    """Path of timm's tests/test_models.py for `version`, downloading timm's sdist on first use."""
    target = _cache_dir() / f'timm-{version}' / 'test_models.py'
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '--no-binary', ':all:',
               f'timm=={version}', '-d', tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob('timm-*.tar.gz'))
        if not sdists:
            raise RuntimeError(
                f'could not download the source distribution of timm=={version} to get its tests/test_models.py '
                f'(pip said: {result.stderr.strip()[-500:]}); put the file at {target} to run offline')
        with tarfile.open(sdists[0]) as archive:
            member = archive.getmember(f'timm-{version}/tests/test_models.py')
            data = archive.extractfile(member).read()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


def load_test_models() -> ModuleType:
    """Import timm's test_models.py as a module (it parametrizes over the registry, our models included)."""
    path = fetch_test_models()
    spec = importlib.util.spec_from_file_location('timm_test_models', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
