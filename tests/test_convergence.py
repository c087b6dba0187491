"""`benchmarks/convergence.py` runs end to end on a tiny generated dataset on the CPU."""
import csv
import importlib.util
import struct
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'convergence.py'


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def convergence():
    spec = importlib.util.spec_from_file_location('convergence', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_csv(path: Path) -> list:
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and data[12:16] == b'IHDR'
    width, height = struct.unpack('>II', data[16:24])
    assert width > 100 and height > 100 and len(data) > 5_000


def test_synthetic_dataset_is_an_image_folder(convergence, tmp_path):
    root = convergence.make_dataset(tmp_path, num_classes=3, train_per_class=2, val_per_class=1, size=32)
    classes = sorted(p.name for p in (root / 'train').iterdir())
    assert classes == ['00_hue0_horizontal', '01_hue0_vertical', '02_hue1_horizontal']
    assert sorted(p.name for p in (root / 'val').iterdir()) == classes
    assert len(list((root / 'train').glob('*/*.png'))) == 6


def test_three_configurations_train_and_write_curves(convergence, tmp_path, capsys):
    data = convergence.make_dataset(tmp_path / 'data', num_classes=4, train_per_class=4, val_per_class=2, size=64)
    out = tmp_path / 'out'
    summaries = convergence.main([str(data), '--img-size', '64', '--epochs', '2', '--batch-size', '8',
                                  '--out', str(out)])
    labels = ['cabvit_h_l1', 'cabvit_h_l1 no_cross_block', 'convnext_pico']
    assert [s['config'] for s in summaries] == labels
    assert summaries[0]['params'] > summaries[1]['params']  # the digest parameters

    steps, epochs = read_csv(out / 'steps.csv'), read_csv(out / 'epochs.csv')
    for label in labels:  # 16 images in batches of 8 for 2 epochs, the same budget for all
        assert [int(r['step']) for r in steps if r['config'] == label] == [1, 2, 3, 4]
        assert [int(r['epoch']) for r in epochs if r['config'] == label] == [0, 1]
    assert all(float(r['loss']) > 0 for r in steps)
    assert all(0 <= float(r['val_top1']) <= 100 for r in epochs)

    assert_png(out / 'curves.png')
    fig = convergence.plot_curves(steps, epochs, tmp_path / 'again.png')
    assert [[line.get_label() for line in ax.get_lines()] for ax in fig.axes] == [labels, labels]
    table = capsys.readouterr().out
    assert all(label in table for label in labels) and 'best top-1' in table


def test_make_dataset_option_and_step_budget(convergence, tmp_path, capsys):
    """As run from the command line: --make-dataset, a step budget, one configuration and no peer."""
    convergence.main(['--make-dataset', str(tmp_path / 'data'), '--steps', '2', '--batch-size', '8', '--img-size', '32',
                      '--variants', 'no_digest_scale', '--peers', '--out', str(tmp_path / 'out')])
    assert 'cabvit_h_l1 no_digest_scale' in capsys.readouterr().out
    assert len(list((tmp_path / 'data' / 'train').glob('*/*.png'))) == 4 * 32
    assert len(read_csv(tmp_path / 'out' / 'steps.csv')) == 2
    assert_png(tmp_path / 'out' / 'curves.png')


def test_too_small_a_dataset_is_an_error(convergence, tmp_path, capsys):
    data = convergence.make_dataset(tmp_path, num_classes=2, train_per_class=2, val_per_class=1, size=32)
    with pytest.raises(SystemExit):
        convergence.main([str(data), '--batch-size', '8', '--out', str(tmp_path / 'out')])
    assert '4 training images make no full batch of --batch-size 8' in capsys.readouterr().err
