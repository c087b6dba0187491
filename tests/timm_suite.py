"""Files of the installed timm's source distribution (its model test suite, its train.py), and other timm releases.

Neither is part of the installed timm, so each is fetched once from the package index with pip and cached under
TIMM_CABVIT_CACHE (default ~/.cache/timm-cabvit).
"""
import importlib.util
import os
import shutil
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


def install_timm(version: str) -> Path:
    """A directory holding timm `version` alone (`pip install --no-deps --target`), to put first on sys.path."""
    target = _cache_dir() / f'timm-{version}' / 'site'
    if (target / 'timm').is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix='site-', dir=target.parent))
    cmd = [sys.executable, '-m', 'pip', 'install', '--quiet', '--no-deps', '--target', str(partial),
           f'timm=={version}']
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode or not (partial / 'timm').is_dir():
        shutil.rmtree(partial, ignore_errors=True)
        raise RuntimeError(f'could not install timm=={version} (pip said: {result.stderr.strip()[-500:]}); run '
                           f'`{" ".join(cmd[:-3])} {target} timm=={version}` once with network access')
    try:
        partial.rename(target)
    except OSError:  # another run installed it meanwhile
        shutil.rmtree(partial)
    return target
