"""What `pip install .` installs and what the models import: the core needs torch and timm, the tools their extras."""
import configparser
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from timm_cabvit_cli import main

ROOT = Path(__file__).resolve().parents[1]
TOOL_DEPENDENCIES = ('fvcore', 'matplotlib', 'onnx', 'onnxruntime', 'pandas')


def _requirements(text: str) -> list:
    return [line.split('#')[0].strip() for line in text.splitlines() if line.split('#')[0].strip()]


def test_the_core_install_has_no_tool_dependencies():
    config = configparser.ConfigParser()
    config.read(ROOT / 'setup.cfg')
    core = _requirements(config['options']['install_requires'])
    assert not [r for r in core if r.startswith(TOOL_DEPENDENCIES)], core
    tools = _requirements(config['options.extras_require']['tools'])
    assert {r.split('>')[0] for r in tools} == {'fvcore', 'matplotlib'}


@pytest.mark.integration
def test_a_cabvit_model_imports_nothing_a_convnext_does_not():
    """`import timm_cabvit` and `timm.create_model('cabvit_h_l2')`, after a convnext_tiny: no new third-party
    module (no fvcore, matplotlib, onnx), only the package's own core modules."""
    script = (
        'import json, sys, timm\n'
        "timm.create_model('convnext_tiny')\n"
        'before = set(sys.modules)\n'
        'import timm_cabvit\n'
        "timm.create_model('cabvit_h_l2')\n"
        'ours = sorted(m for m in sys.modules if m.startswith("timm_cabvit"))\n'
        'print(json.dumps([sorted(set(sys.modules) - before), ours]))\n')
    done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    new, ours = json.loads(done.stdout)
    assert [m for m in new if not m.startswith('timm_cabvit')] == []
    assert ours == ['timm_cabvit', 'timm_cabvit.cabvit', 'timm_cabvit.layers', 'timm_cabvit.tme',
                    'timm_cabvit.weights', 'timm_cabvit_autoload']


@pytest.mark.parametrize('missing, argv', [
    ('fvcore', ['--models', 'cabvit_p_l0', '--img-size', '32', '--batch-size', '1', '--iters', '1', '--warmup', '0']),
    ('fvcore', ['flops', 'cabvit_p_l0', '--img-size', '32']),
    ('matplotlib', ['flops', 'cabvit_p_l0', '--img-size', '32', '--plot', '{tmp}/flops.png']),
    ('matplotlib', ['attention', '{tmp}/image.png', '--model', 'cabvit_h_l1', '--img-size', '64', '--out',
                    '{tmp}/maps.png']),
])
def test_commands_name_the_extra_they_need(missing, argv, tmp_path, monkeypatch, capsys):
    Image.new('RGB', (64, 48), (10, 120, 200)).save(tmp_path / 'image.png')
    for name in [m for m in sys.modules if m == missing or m.startswith(missing + '.')] + [missing]:
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    assert main([a.format(tmp=tmp_path) for a in argv]) == 1
    err = capsys.readouterr().err
    assert f'needs {missing}, which is not installed: pip install "timm-cabvit[tools]"' in err
    assert 'Traceback' not in err and len(err.strip().splitlines()) == 1
