"""The `timm-cabvit` command: its output, its exit codes, one-line errors and a light `--help`."""
import configparser
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import timm_cabvit_cli
from timm_cabvit_cli import main

ROOT = Path(__file__).resolve().parents[1]

HEAVY_MODULES = ('torch', 'timm', 'tqdm', 'matplotlib', 'numpy', 'timm_cabvit')
COMMANDS = ([], ['flops'], ['ablation'], ['attention'], ['recipe'], ['export'], ['export-onnx'], ['push'])


def _run(argv):
    """main's exit code, argparse's SystemExit included."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_table_has_our_and_the_papers_figures(capsys):
    assert main(['--models', 'cabvit_h_l1', 'cabvit_p_l0', '--batch-size', '1', '--iters', '1', '--warmup', '0']) == 0
    out = capsys.readouterr().out.splitlines()
    h_l1 = next(line for line in out if line.startswith('cabvit_h_l1'))
    assert '6,187,560' in h_l1 and '1.385' in h_l1 and '6.2 M' in h_l1 and '80.3' in h_l1
    assert float(h_l1.split('|')[-1].split()[0]) > 0  # measured images/s
    assert '74.3' in next(line for line in out if line.startswith('cabvit_p_l0'))


def test_table_reports_the_spread(capsys):
    assert main(['--models', 'cabvit_p_l0', '--img-size', '64', '--batch-size', '1', '--iters', '3',
                 '--warmup', '1', '--threads', '1']) == 0
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert 'median of 3 timed passes after 1 warm-up' in out[0] and 'cpu (1 thread)' in out[0]
    median, spread = next(line for line in out if line.startswith('cabvit_p_l0')).split('|')[-1].split()
    slowest, fastest = map(float, spread.split('-'))
    assert 0 < slowest <= float(median) <= fastest
    assert 'measuring' in captured.err  # progress


@pytest.mark.integration
def test_table_on_a_shared_machine_measures_again_on_one_thread(capsys):
    """Another process busy on every core: the figures at all threads are not speeds; one thread is tried, and
    the note says so, and that those figures are not speeds either when that process leaves no core free."""
    cores = len(os.sched_getaffinity(0))
    busy = [subprocess.Popen([sys.executable, '-c', 'while True: pass']) for _ in range(cores)]
    try:
        assert main(['--models', 'cabvit_p_l0', '--img-size', '32', '--batch-size', '1', '--iters', '2',
                     '--warmup', '0', '--threads', str(max(2, cores))]) == 0
    finally:
        for process in busy:
            process.kill()
    out = capsys.readouterr().out
    assert 'measured again on 1 thread' in out and 'cpu (1 thread)' in out
    assert 'NOT TRUSTWORTHY: other processes kept' in out


def test_bad_arguments_say_what_was_expected(capsys):
    assert main(['--models', 'cabvit_h_l9']) == 2
    assert 'unknown model(s) cabvit_h_l9' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(['--img-size', '12x'])
    assert "expected a size like 224 or 256x192, got '12x'" in capsys.readouterr().err


@pytest.mark.integration
def test_console_script_is_installed():
    exe = shutil.which('timm-cabvit')
    assert exe, 'timm-cabvit is not on PATH: install the package (pip install -e .)'
    result = subprocess.run([exe, '--help'], capture_output=True, text=True, check=True)
    assert '--img-size' in result.stdout and '--device' in result.stdout


@pytest.mark.integration
def test_help_imports_neither_torch_nor_timm():
    """`--help` of every command from the standard library alone: it answers in a fraction of a second."""
    code = (
        'import sys\n'
        'from timm_cabvit_cli import main\n'
        f'for command in {COMMANDS!r}:\n'
        '    try:\n'
        "        main([*command, '--help'])\n"
        '    except SystemExit as e:\n'
        '        assert e.code == 0, command\n'
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY_MODULES!r}), file=sys.stderr)\n")
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    assert result.stderr.strip() == '[]', f'imported for --help: {result.stderr}'
    assert result.stdout.count('usage: timm-cabvit') == len(COMMANDS)


@pytest.mark.integration
def test_console_script_help_is_light():
    (entry,) = importlib.metadata.entry_points(group='console_scripts', name='timm-cabvit')
    assert entry.value == 'timm_cabvit_cli:main'
    result = subprocess.run([sys.executable, '-X', 'importtime', shutil.which('timm-cabvit'), '--help'],
                            capture_output=True, text=True, check=True)
    imported = {line.split('|')[-1].strip().split('.')[0] for line in result.stderr.splitlines() if '|' in line}
    assert not imported & set(HEAVY_MODULES)


def test_help_texts(capsys):
    assert _run(['ablation', '--help']) == 0
    out = capsys.readouterr().out
    assert 'about 13 % extra compute' in out and '%%' not in out
    assert _run(['export-onnx', '--help']) == 0
    assert 'timm-cabvit[onnx]' in capsys.readouterr().out


@pytest.mark.integration
def test_export_writes_a_folder_timm_loads(tmp_path, capsys):
    import timm
    model = timm.create_model('cabvit_h_l1', num_classes=5).eval()
    torch.save({'state_dict': model.state_dict(), 'epoch': 3}, tmp_path / 'checkpoint.pth.tar')
    out = tmp_path / 'export'
    assert main(['export', str(tmp_path / 'checkpoint.pth.tar'), '--model', 'cabvit_h_l1.in1k', '--out', str(out),
                 '--metric', 'top1=50.5']) == 0
    assert capsys.readouterr().out.strip() == str(out)
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


def test_attention_command_writes_a_png(tmp_path, capsys):
    from PIL import Image
    Image.new('RGB', (64, 48), (10, 120, 200)).save(tmp_path / 'image.png')
    out = tmp_path / 'new' / 'folder' / 'attention.png'  # folders the user obviously wants are created
    assert main(['attention', str(tmp_path / 'image.png'), '--model', 'cabvit_h_l1', '--img-size', '64',
                 '--blocks', 'stages.2.blocks.1', '--out', str(out)]) == 0
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert 'no --checkpoint, so the weights are random and the maps are near uniform' in captured.err


@pytest.mark.integration
def test_export_onnx_command(tmp_path, capsys):
    out = tmp_path / 'onnx' / 'model.onnx'
    assert main(['export-onnx', 'cabvit_h_l1', str(out), '--img-size', '64']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert out.stat().st_size > 1_000_000 and lines[0].startswith(f'{out}: opset 20, input (batch, 3, 64, 64)')
    # a calibrated random model: outputs of order 1, not the ~1e-20 of the initial BatchNorm statistics
    assert 'max abs difference' in lines[1] and 'BatchNorm statistics calibrated' in lines[1]
    assert float(lines[1].rsplit('(', 1)[1].rstrip(')')) > 0.1
    assert main(['export-onnx', 'cabvit_h_l1', str(out), '--opset', '13']) == 2
    assert 'opset must be 17 or newer' in capsys.readouterr().err


def test_export_onnx_without_onnx_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'onnx', None)
    assert main(['export-onnx', 'cabvit_h_l1', str(tmp_path / 'model.onnx'), '--img-size', '64']) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'onnx is not installed: pip install "timm-cabvit[onnx]"' in err
    assert not (tmp_path / 'model.onnx').exists()


# Errors: one line on stderr that names the problem, no traceback, exit code 2 for the command line, 1 for a failure

class _RefusingHub(BaseHTTPRequestHandler):
    """A Hub that refuses every token."""

    def do_POST(self):
        self.send_response(401)
        self.send_header('X-Error-Message', 'Invalid credentials in Authorization header')
        self.send_header('Content-Length', '0')
        self.end_headers()

    do_GET = do_POST

    def log_message(self, *args):
        pass


@pytest.fixture(scope='module')
def refusing_hub():
    server = ThreadingHTTPServer(('127.0.0.1', 0), _RefusingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """A text file, random bytes and a truncated checkpoint given as checkpoints, an image, an export folder."""
    import safetensors.torch
    from PIL import Image

    root = tmp_path_factory.mktemp('files')
    (root / 'notes.txt').write_text('not a checkpoint\n')
    (root / 'random.pth').write_bytes(bytes(range(256)) * 8)
    torch.save({'weight': torch.randn(64, 64)}, root / 'full.pth')
    (root / 'truncated.pth').write_bytes((root / 'full.pth').read_bytes()[:4000])
    Image.new('RGB', (40, 40)).save(root / 'image.png')
    (root / 'folder').mkdir()
    (root / 'export').mkdir()
    (root / 'export' / 'config.json').write_text('{"architecture": "cabvit_h_l1"}')
    safetensors.torch.save_file({'w': torch.zeros(2)}, root / 'export' / 'model.safetensors')
    return root


ERROR_CASES = {
    # checkpoints that are no checkpoints: 1
    'attention, text checkpoint': (1, 'attention IMAGE --model cabvit_h_l1 --checkpoint T/notes.txt',
                                   'not a PyTorch or safetensors checkpoint'),
    'attention, truncated checkpoint': (1, 'attention IMAGE --model cabvit_h_l1 --checkpoint T/truncated.pth',
                                        'truncated or corrupt'),
    'attention, missing image': (1, 'attention T/missing.png --model cabvit_h_l1', 'is not a file'),
    'export, random bytes': (1, 'export T/random.pth --model cabvit_h_l1 --out T/out',
                             'not a PyTorch or safetensors checkpoint'),
    'export, truncated checkpoint': (1, 'export T/truncated.pth --model cabvit_h_l1 --out T/out',
                                     'truncated or corrupt'),
    'export, missing checkpoint': (1, 'export T/missing.pth --model cabvit_h_l1 --out T/out', 'does not exist'),
    'export-onnx, text checkpoint': (1, 'export-onnx cabvit_h_l1 T/m.onnx --checkpoint T/notes.txt',
                                     'not a PyTorch or safetensors checkpoint'),
    'export-onnx, truncated checkpoint': (1, 'export-onnx cabvit_h_l1 T/m.onnx --checkpoint T/truncated.pth',
                                          'truncated or corrupt'),
    # output paths that cannot be written: 2
    'attention --out in /proc': (2, 'attention IMAGE --model cabvit_h_l1 --out /proc/x.png',
                                 'files cannot be created in /proc'),
    'attention --out under a file': (2, 'attention IMAGE --model cabvit_h_l1 --out T/notes.txt/x.png',
                                     'notes.txt is a file, not a folder'),
    'attention --out a folder': (2, 'attention IMAGE --model cabvit_h_l1 --out T/folder', 'is a folder; give a file'),
    'flops --plot in /proc': (2, 'flops cabvit_h_l1 --plot /proc/x.png', 'files cannot be created in /proc'),
    'flops --plot under a file': (2, 'flops cabvit_h_l1 --plot T/notes.txt/sub/x.png',
                                  'notes.txt is a file, not a folder'),
    'export-onnx into /proc': (2, 'export-onnx cabvit_h_l1 /proc/m.onnx', 'files cannot be created in /proc'),
    'export-onnx under a file': (2, 'export-onnx cabvit_h_l1 T/notes.txt/m.onnx', 'is a file, not a folder'),
    'export-onnx to a folder': (2, 'export-onnx cabvit_h_l1 T/folder', 'is a folder; give a file'),
    'export --out a file': (2, 'export T/full.pth --model cabvit_h_l1 --out T/notes.txt', 'is a file; give a folder'),
    'export --out under a file': (2, 'export T/full.pth --model cabvit_h_l1 --out T/notes.txt/out',
                                  'is a file, not a folder'),
    'export --out in /proc': (2, 'export T/full.pth --model cabvit_h_l1 --out /proc/out',
                              'files cannot be created in /proc'),
    # sizes the models cannot be built for, rejected before building them: 2
    'table --img-size 16': (2, '--img-size 16', 'needs images of at least 32x32'),
    'flops --img-size 10000': (2, 'flops --img-size 10000', 'tokens at stride 16'),
    'ablation --img-size 16': (2, 'ablation --img-size 16', 'needs images of at least 32x32'),
    'attention --img-size 10000': (2, 'attention IMAGE --model cabvit_h_l1 --img-size 10000', 'tokens at stride 16'),
    'export-onnx --img-size 16': (2, 'export-onnx cabvit_h_l2 T/m.onnx --img-size 16', 'at least 32x32'),
    'export --img-size 16': (2, 'export T/full.pth --model cabvit_h_l1 --out T/out --img-size 16', 'at least 32x32'),
    # other option values: 2
    '--warmup -1': (2, '--warmup -1', "argument --warmup: expected an integer of at least 0, got '-1'"),
    '--iters -1': (2, '--iters -1', "argument --iters: expected a positive integer, got '-1'"),
    '--iters 0': (2, '--iters 0', "argument --iters: expected a positive integer, got '0'"),
    '--batch-size 0': (2, '--batch-size 0', 'argument --batch-size: expected a positive integer'),
    '--device foo': (2, '--models cabvit_p_l0 --device foo', '--device foo: not a device'),
    '--device meta': (2, '--models cabvit_p_l0 --device meta', 'no speed to measure'),
    '--opset 99': (2, 'export-onnx cabvit_h_l1 T/m.onnx --opset 99', 'at most'),
    'unknown recipe': (2, 'recipe cabvit_h_l9', 'unknown model(s) cabvit_h_l9 (did you mean cabvit_h_l1, '),
    'attention, unknown block': (2, 'attention IMAGE --model cabvit_h_l1 --blocks stages.2.block.1',
                                 '--blocks: unknown block(s) stages.2.block.1 (did you mean stages.2.blocks.1?); '
                                 'cabvit_h_l1 has stages.2.blocks.0'),
    'push --repo-id a path': (2, 'push T/export --repo-id /a/local/path', '--repo-id /a/local/path: not a Hub model '
                                                                           'repo id; give ORG/NAME'),
    'push --repo-id a folder here': (2, 'push T/export --repo-id T/folder',
                                     'not a Hub model repo id but a path here (the folder to upload is DIR)'),
    'export --repo-id a path': (2, 'export T/full.pth --model cabvit_h_l1 --out T/out --repo-id T/folder',
                                'not a Hub model repo id but a path here (the folder to write is --out)'),
    'unknown tag': (2, 'export T/full.pth --model cabvit_h_l1.foo --out T/out', "unknown pretrained tag 'foo'"),
    'bad --metric': (2, 'export T/full.pth --model cabvit_h_l1 --out T/out --metric top1', 'A metric is NAME=VALUE'),
    # uploads that fail: 1
    'push offline': (1, 'push T/export --repo-id me/m', 'HF_HUB_OFFLINE is set'),
    'push, no connection': (1, 'push T/export --repo-id me/m', 'could not reach http://127.0.0.1:9'),
    'push, bad token': (1, 'push T/export --repo-id me/m --token hf_bad', 'the Hub refused the token'),
    'push, not an export': (1, 'push T/folder --repo-id me/m', 'has no config.json'),
}


@pytest.mark.parametrize('case', list(ERROR_CASES))
def test_errors_are_one_line(case, files, refusing_hub, capsys, monkeypatch):
    from huggingface_hub import constants

    expected_code, command, message = ERROR_CASES[case]
    if case == 'push offline':
        monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    elif case.startswith('push'):
        monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
        monkeypatch.setattr(constants, 'ENDPOINT', 'http://127.0.0.1:9' if 'connection' in case else refusing_hub)
        monkeypatch.delenv('HF_TOKEN', raising=False)
    argv = [arg.replace('T/', f'{files}/').replace('IMAGE', str(files / 'image.png')) for arg in command.split()]
    code = _run(argv)
    out, err = capsys.readouterr()
    assert code == expected_code, err
    assert err.count('\n') == 1 and err.startswith('timm-cabvit') and message in err, err
    assert 'Traceback' not in out + err
    assert not (files / 'out').exists() and not (files / 'm.onnx').exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason='CUDA is available here')
def test_cuda_without_cuda_is_a_usage_error(capsys):
    assert main(['--models', 'cabvit_p_l0', '--device', 'cuda']) == 2
    assert capsys.readouterr().err == (
        f'timm-cabvit: --device cuda: no CUDA device is available here (torch {torch.__version__}); use cpu\n')


# First contact: --version, unknown names at once, a torchvision that does not match torch, memory run out

@pytest.mark.integration
def test_version_from_metadata_without_torch():
    result = subprocess.run([sys.executable, '-X', 'importtime', shutil.which('timm-cabvit'), '--version'],
                            capture_output=True, text=True, check=True)
    versions = {name: importlib.metadata.version(name) for name in ('timm-cabvit', 'torch', 'torchvision', 'timm')}
    assert result.stdout == (f"timm-cabvit {versions['timm-cabvit']} (torch {versions['torch']}, torchvision "
                             f"{versions['torchvision']}, timm {versions['timm']}, Python "
                             f"{'.'.join(map(str, sys.version_info[:3]))})\n")
    imported = {line.split('|')[-1].strip().split('.')[0] for line in result.stderr.splitlines() if '|' in line}
    assert not imported & set(HEAVY_MODULES)


def test_model_names_of_the_metadata_are_timms():
    """The names refused without importing timm are those of the package's entry points: timm's registry."""
    import timm
    assert timm_cabvit_cli._cabvit_names() == timm.list_models('cabvit*')


UNKNOWN_NAMES = [
    ['--models', 'cabvit_hl2'], ['flops', 'cabvit_h_l1', 'CabViT_H_L2'], ['ablation', 'cabvit_hl2'],
    ['attention', 'x.png', '--model', 'cabvit_hl2'], ['export', 'x.pth', '--model', 'cabvit_hl2.in1k', '--out', 'x'],
    ['export-onnx', 'cabvit_hl2', 'x.onnx'], ['recipe', 'cabvit_hl2'],
]


@pytest.mark.integration
def test_unknown_models_are_refused_at_once_with_close_matches():
    """Every command that takes a model name refuses a misspelled one in a fraction of a second, naming the close
    match, before torch or timm is imported (it took ~4 s here, ~13 s on a busy machine, to import them first)."""
    code = (
        'import sys, time\n'
        'from timm_cabvit_cli import main\n'
        f'for argv in {UNKNOWN_NAMES!r}:\n'
        '    start = time.perf_counter()\n'
        '    assert main(argv) == 2, argv\n'
        "    print(f'{time.perf_counter() - start:.3f}')\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY_MODULES!r}))\n")
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    *seconds, imported = result.stdout.splitlines()
    assert imported == '[]', f'imported to refuse an unknown name: {imported}'
    assert max(map(float, seconds)) < 1, seconds
    errors = result.stderr.splitlines()
    assert len(errors) == len(UNKNOWN_NAMES), result.stderr
    known = 'choose from cabvit_h_l1, cabvit_h_l2, cabvit_h_l3, cabvit_p_l0'
    assert errors[0] == f'timm-cabvit: unknown model(s) cabvit_hl2 (did you mean cabvit_h_l2?); {known}'
    assert errors[1] == f'timm-cabvit flops: unknown model(s) CabViT_H_L2 (did you mean cabvit_h_l2?); {known}'
    assert 'unknown model(s) cabvit_hl2.in1k (did you mean cabvit_h_l2?)' in errors[4]
    for line, argv in zip(errors, UNKNOWN_NAMES):
        command = '' if argv[0].startswith('-') else f' {argv[0]}'
        assert line.startswith(f'timm-cabvit{command}: unknown model(s) ') and '(did you mean cabvit_h_l2?)' in line


def test_unknown_models_name_every_close_match(capsys):
    assert main(['flops', 'cabvit_h_l9', 'resnet50']) == 2
    assert capsys.readouterr().err.startswith(
        'timm-cabvit flops: unknown model(s) cabvit_h_l9 (did you mean cabvit_h_l1, cabvit_h_l2 or cabvit_h_l3?), '
        'resnet50; choose from')


class _FailingImport:
    """A meta path finder that fails `import timm` as a torchvision built for another torch makes it fail."""

    def __init__(self, error):
        self.error = error

    def find_spec(self, name, path=None, target=None):
        if name == 'timm':
            raise self.error
        return None


TORCHVISION_CASES = {
    # the machine: a CPU torch with PyPI's torchvision, built against the CUDA torch
    'cpu torch, pypi torchvision': (
        '2.14.1+cpu', '0.29.1', 'torchvision 0.29.1 does not match torch 2.14.1+cpu (cpu build), so timm cannot be '
        'imported; install the torchvision built for it: pip install --force-reinstall --no-deps "torchvision==0.29.*" '
        '--index-url https://download.pytorch.org/whl/cpu'),
    'pypi torch, older torchvision': (
        '2.14.1', '0.28.0', 'torchvision 0.28.0 does not match torch 2.14.1, so timm cannot be imported; install the '
        'torchvision built for it: pip install --force-reinstall --no-deps "torchvision==0.29.*"'),
    'cuda torch, cpu torchvision': (
        '2.5.1+cu124', '0.20.1+cpu', '"torchvision==0.20.*" --index-url https://download.pytorch.org/whl/cu124'),
    'no torchvision': (
        '2.14.1+cpu', None, 'timm needs torchvision, which is not installed; install the one for torch 2.14.1+cpu: '
        'pip install --force-reinstall --no-deps "torchvision==0.29.*" --index-url https://download.pytorch.org/whl/cpu'),
}


@pytest.mark.parametrize('error', [RuntimeError('operator torchvision::nms does not exist'),
                                   ImportError('undefined symbol: _ZN3c10')], ids=['RuntimeError', 'ImportError'])
@pytest.mark.parametrize('case', list(TORCHVISION_CASES))
def test_a_torchvision_for_another_torch_is_one_line(case, error, capsys, monkeypatch):
    torch_version, vision_version, message = TORCHVISION_CASES[case]
    versions = {'torch': torch_version, 'torchvision': vision_version}
    monkeypatch.setattr(timm_cabvit_cli, '_dist_version', versions.get)
    monkeypatch.delitem(sys.modules, 'timm')
    monkeypatch.setattr(sys, 'meta_path', [_FailingImport(error), *sys.meta_path])
    assert main(['flops', 'cabvit_h_l1']) == 1
    out, err = capsys.readouterr()
    assert err.count('\n') == 1 and err.startswith('timm-cabvit flops: ') and message in err, err
    assert 'Traceback' not in out + err
    if vision_version is not None:
        assert err.endswith(f'{message}\n')


def test_a_matching_torchvision_is_not_blamed(monkeypatch):
    """When torch and torchvision match, a failed `import timm` is not theirs: its own error goes through."""
    monkeypatch.setattr(timm_cabvit_cli, '_dist_version', {'torch': '2.14.1+cpu', 'torchvision': '0.29.1+cpu'}.get)
    monkeypatch.delitem(sys.modules, 'timm')
    monkeypatch.setattr(sys, 'meta_path', [_FailingImport(RuntimeError('something else')), *sys.meta_path])
    with pytest.raises(RuntimeError, match='something else'):
        main(['flops', 'cabvit_h_l1'])


@pytest.mark.parametrize('torch_version, vision_version', [
    ('2.0.1', '0.15.2'), ('2.4.1+cpu', '0.19.1+cpu'), ('2.14.1', '0.29.1'), ('2.14.1+cu130', '0.29.0+cu130')])
def test_torchvision_pairing_rule(torch_version, vision_version, monkeypatch):
    """torchvision 0.(x + 15) pairs with torch 2.x, of the same build (local version label)."""
    monkeypatch.setattr(timm_cabvit_cli, '_dist_version', {'torch': torch_version, 'torchvision': vision_version}.get)
    assert timm_cabvit_cli._torchvision_mismatch() is None
    minor = int(vision_version.split('.')[1])
    monkeypatch.setattr(timm_cabvit_cli, '_dist_version',
                        {'torch': torch_version, 'torchvision': f'0.{minor + 1}.0'}.get)
    assert f'"torchvision==0.{minor}.*"' in timm_cabvit_cli._torchvision_mismatch()


def test_the_installed_torchvision_matches_torch():
    assert timm_cabvit_cli._torchvision_mismatch() is None


def test_out_of_memory_names_the_setting_to_lower(capsys):
    """A batch no machine holds (1.2 EB, more than any address space): one line, exit code 1."""
    assert main(['--models', 'cabvit_p_l0', '--img-size', '32', '--batch-size', '100000000000000', '--iters', '1',
                 '--warmup', '0']) == 1
    out, err = capsys.readouterr()
    assert err.splitlines()[-1] == ('timm-cabvit: out of memory (tried to allocate 1.23 EB): lower --batch-size (now '
                                    '100000000000000) or --img-size (now 32x32)')
    assert 'Traceback' not in out + err


@pytest.mark.parametrize('error, asked', [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 50331648 bytes. Error code 12 (Cannot allocate memory)"),
     ' (tried to allocate 50.3 MB)'),
    (RuntimeError('DefaultCPUAllocator: not enough memory: you tried to allocate 123 bytes.'),
     ' (tried to allocate 123 bytes)'),
    (torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79 GiB'),
     ' (tried to allocate 20.00 MiB)'),
    (MemoryError(), ''),
], ids=['cpu allocator', 'cpu allocator, newer', 'cuda', 'MemoryError'])
def test_flops_out_of_memory_names_img_size(error, asked, capsys, monkeypatch):
    """`flops --img-size 2048` ran out of memory after a minute of tracing here (the error mocked: it takes a minute
    and most of the memory of the machine)."""
    from timm_cabvit.tools import reports

    def flops_report(*args, **kwargs):
        raise error

    monkeypatch.setattr(reports, 'flops_report', flops_report)
    assert main(['flops', 'cabvit_h_l1', '--img-size', '2048']) == 1
    out, err = capsys.readouterr()
    assert err.splitlines()[-1] == f'timm-cabvit flops: out of memory{asked}: lower --img-size (now 2048x2048)'
    assert 'Traceback' not in out + err


def test_other_runtime_errors_are_not_taken_for_memory(monkeypatch):
    from timm_cabvit.tools import reports

    def flops_report(*args, **kwargs):
        raise RuntimeError('a bug')

    monkeypatch.setattr(reports, 'flops_report', flops_report)
    with pytest.raises(RuntimeError, match='a bug'):
        main(['flops', 'cabvit_h_l1', '--img-size', '64'])


# The README's first commands, and what it says of timm's scripts

def _bash_blocks(text):
    return re.findall(r'```bash\n(.*?)```', text, re.S)


def test_readme_starts_with_the_cpu_torch():
    """The first command of the README installs the CPU build of a torch and a torchvision that pair, before the
    package could pull PyPI's CUDA build; the GPU line follows; the test command is the one .ci/run runs."""
    readme = (ROOT / 'README.md').read_text(encoding='utf-8')
    first, run, tests = _bash_blocks(readme)[:3]
    commands = [line for line in first.splitlines() if not line.startswith('#')]
    assert len(commands) == 1 and commands[0].startswith('python3.11 -m venv .venv && . .venv/bin/activate && ')
    match = re.search(r'pip install torch==2\.(\d+)\.\d+ torchvision==0\.(\d+)\.\d+ '
                      r'--index-url https://download\.pytorch\.org/whl/cpu$', commands[0])
    assert match and int(match.group(2)) == int(match.group(1)) + timm_cabvit_cli.TORCHVISION_MINOR_OFFSET
    assert '# python3.11 -m venv .venv && . .venv/bin/activate && pip install torch==' in first  # the GPU line
    assert run.strip() == 'pip install ".[tools]" && timm-cabvit'
    ci = (ROOT / '.ci' / 'run').read_text(encoding='utf-8')
    assert tests.strip().replace('pip install ', 'pip install -q ') in ci


def test_readme_names_the_flags_and_the_extra_of_timms_scripts():
    readme = (ROOT / 'README.md').read_text(encoding='utf-8')
    scripts = readme.split("## Training and evaluating with timm's scripts")[1].split('\n## ')[0]
    commands = [line for block in _bash_blocks(scripts) for line in block.splitlines()]
    for script in ('train.py', 'validate.py', 'inference.py'):
        assert any(line.startswith(f'python {script}') and '--model-kwargs img_size=96 --img-size 96' in line
                   for line in commands), script
    assert 'inference.py` imports pandas' in scripts and 'pip install "timm-cabvit[scripts]"' in scripts
    setup = configparser.ConfigParser()
    setup.read(ROOT / 'setup.cfg', encoding='utf-8')
    assert setup['options.extras_require']['scripts'].split() == ['pandas']


def test_both_size_flags_size_model_and_images_alike():
    """`--model-kwargs img_size=96 --img-size 96`, as the README gives them: scripts resolving the input with
    resolve_model_input_args and older ones (create_model(**model_kwargs), resolve_data_config) both build the
    model for 96x96 and size the images to it."""
    import timm
    from timm.data import resolve_data_config

    args = dict(img_size=96, input_size=None, in_chans=None, model_kwargs={'img_size': 96})
    older = timm.create_model('cabvit_h_l1', device='meta', **args['model_kwargs'])
    assert older.img_size == (96, 96) and resolve_data_config(args, model=older)['input_size'] == (3, 96, 96)
    from timm.data import resolve_input_data_config
    from timm.models import resolve_model_input_args

    newer = timm.create_model(**resolve_model_input_args('cabvit_h_l1', args, device='meta', **args['model_kwargs']))
    assert newer.img_size == (96, 96) and resolve_input_data_config(newer, args)['input_size'] == (3, 96, 96)
