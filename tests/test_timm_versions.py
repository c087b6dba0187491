"""The timm versions the package supports: the oldest one runs the smoke test, an older one is refused clearly.

Each timm is installed once with `pip install --no-deps --target` into the tests' cache (TIMM_CABVIT_CACHE, see
timm_suite.py) and put first on sys.path of a subprocess; torch and everything else come from this environment.
"""
import configparser
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
from fresh_env import FreshEnv
from timm_suite import install_timm

from timm_cabvit import TIMM_MINIMUM

REPO = Path(__file__).resolve().parents[1]
TIMM_TOO_OLD = '0.9.16'  # the last 0.9 release, which many projects still pin
WARNING = 'could not register its timm models'


def test_setup_cfg_requires_the_minimum():
    config = configparser.ConfigParser()
    config.read(REPO / 'setup.cfg')
    requirements = config['options']['install_requires'].split()
    assert [r for r in requirements if r.startswith('timm')] == [f'timm>={TIMM_MINIMUM}']


@pytest.mark.integration
def test_oldest_supported_timm_runs_the_smoke_test():
    """Every model: forward, features_only, intermediates, reset_classifier, a training step, a checkpoint."""
    site = install_timm(TIMM_MINIMUM)
    path = os.pathsep.join([str(site), str(REPO), *filter(None, [os.environ.get('PYTHONPATH')])])
    result = subprocess.run(
        [sys.executable, str(REPO / 'tests' / 'timm_version_smoke.py')], capture_output=True, text=True,
        env={**os.environ, 'PYTHONPATH': path, 'OMP_NUM_THREADS': '1'}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report['timm'] == TIMM_MINIMUM and Path(report['timm_file']).is_relative_to(site), report
    assert len(report['checks']) == 6, report


@pytest.fixture(scope='module')
def old_timm():
    return install_timm(TIMM_TOO_OLD)


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    return FreshEnv(tmp_path_factory.mktemp('installed'), editable=False)


def _check_message(text: str, shadowed: bool = False) -> None:
    assert f'needs timm>={TIMM_MINIMUM}, but the timm imported is {TIMM_TOO_OLD}' in text, text
    assert (f'shadows the installed timm {timm.__version__}' in text) == shadowed, text


@pytest.mark.integration
def test_import_with_a_too_old_timm_names_both_versions(installed, old_timm):
    result = installed.run('import timm_cabvit', env={'PYTHONPATH': str(old_timm)}, check=False)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('ImportError: timm-cabvit'), result.stderr[-3000:]
    _check_message(last)
    assert WARNING not in result.stderr  # the start-up hook stays quiet: the error says it all


@pytest.mark.integration
def test_start_up_hook_gives_one_warning_with_a_too_old_timm(installed, old_timm):
    result = installed.run('import timm; print(timm.__version__, timm.list_models("cabvit*"))',
                           env={'PYTHONPATH': str(old_timm)}, args=['-W', 'default'])
    assert result.stdout.split() == [TIMM_TOO_OLD, '[]']
    warnings = [line for line in result.stderr.splitlines() if WARNING in line]
    assert len(warnings) == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    _check_message(warnings[0])


@pytest.mark.integration
def test_scripts_in_an_old_timm_checkout_give_one_warning(installed, old_timm, tmp_path):
    """`python train.py` inside a checkout of timm's repository: its `timm/` shadows the installed timm."""
    checkout = tmp_path / 'pytorch-image-models'
    checkout.mkdir()
    (checkout / 'timm').symlink_to(old_timm / 'timm', target_is_directory=True)
    (checkout / 'train.py').write_text('import timm\nprint(timm.__version__, timm.list_models("cabvit*"))\n')
    result = installed.run_argv(['-W', 'default', 'train.py'], cwd=checkout)
    assert result.stdout.split() == [TIMM_TOO_OLD, '[]']
    warnings = [line for line in result.stderr.splitlines() if WARNING in line]
    assert len(warnings) == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    _check_message(warnings[0], shadowed=True)
