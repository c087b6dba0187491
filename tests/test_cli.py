"""The `timm-cabvit` command."""
import shutil
import subprocess

import pytest

from timm_cabvit.cli import main


def test_table_has_our_and_the_papers_figures(capsys):
    assert main(['--models', 'cabvit_h_l1', 'cabvit_p_l0', '--batch-size', '1', '--iters', '1', '--warmup', '0']) == 0
    out = capsys.readouterr().out.splitlines()
    h_l1 = next(line for line in out if line.startswith('cabvit_h_l1'))
    assert '6,187,560' in h_l1 and '1.385' in h_l1 and '6.2 M' in h_l1 and '80.3' in h_l1
    assert float(h_l1.split('|')[-1]) > 0  # measured images/s
    assert '74.3' in next(line for line in out if line.startswith('cabvit_p_l0'))


def test_bad_arguments_say_what_was_expected(capsys):
    assert main(['--models', 'cabvit_h_l9']) == 2
    assert 'unknown model(s) cabvit_h_l9' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(['--img-size', '12x'])
    assert "expected a size like 224 or 256x192, got '12x'" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = shutil.which('timm-cabvit')
    assert exe, 'timm-cabvit is not on PATH: install the package (pip install -e .)'
    result = subprocess.run([exe, '--help'], capture_output=True, text=True, check=True)
    assert '--img-size' in result.stdout and '--device' in result.stdout


def test_export_writes_a_folder_timm_loads(tmp_path, capsys):
    import timm
    import torch
    model = timm.create_model('cabvit_h_l1', num_classes=5).eval()
    torch.save({'state_dict': model.state_dict(), 'epoch': 3}, tmp_path / 'checkpoint.pth.tar')
    out = tmp_path / 'export'
    assert main(['export', str(tmp_path / 'checkpoint.pth.tar'), '--model', 'cabvit_h_l1.in1k', '--out', str(out),
                 '--metric', 'top1=50.5']) == 0
    assert '50.5' in (out / 'README.md').read_text()
    loaded = timm.create_model('cabvit_h_l1', pretrained=True, num_classes=5,
                               pretrained_cfg_overlay=dict(file=str(out / 'model.safetensors'), num_classes=5)).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert main(['export', str(tmp_path / 'checkpoint.pth.tar'), '--model', 'cabvit_h_l2', '--out',
                 str(tmp_path / 'wrong')]) == 1
    assert 'does not fit cabvit_h_l2' in capsys.readouterr().err


@pytest.mark.parametrize('command', [['ablation', 'cabvit_h_l9'], ['flops', 'cabvit_h_l9'],
                                     ['attention', 'x.png', '--model', 'cabvit_h_l9']])
def test_subcommands_reject_unknown_models(command, capsys):
    assert main(command) == 2
    assert 'unknown model(s) cabvit_h_l9' in capsys.readouterr().err


def test_attention_command_writes_a_png(tmp_path):
    from PIL import Image
    Image.new('RGB', (64, 48), (10, 120, 200)).save(tmp_path / 'image.png')
    out = tmp_path / 'attention.png'
    assert main(['attention', str(tmp_path / 'image.png'), '--model', 'cabvit_h_l1', '--img-size', '64',
                 '--blocks', 'stages.2.blocks.1', '--out', str(out)]) == 0
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_export_onnx_command(tmp_path, capsys):
    out = tmp_path / 'model.onnx'
    assert main(['export-onnx', 'cabvit_h_l1', str(out), '--img-size', '64']) == 0
    assert out.stat().st_size > 1_000_000 and 'max abs difference' in capsys.readouterr().out
    assert main(['export-onnx', 'cabvit_h_l1', str(out), '--opset', '13']) == 1
    assert 'opset must be 17 or newer' in capsys.readouterr().err
