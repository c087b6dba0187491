"""The measurement tools of issue 10 on the CPU: traffic.py's op and byte counts, gpu_profile.py's smoke run."""
import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch.nn as nn

from timm_cabvit.tools.flops import COMPONENTS

BENCHMARKS = Path(__file__).resolve().parents[1] / 'benchmarks'
IMG_SIZE = 64  # 4x4 tokens in stage 3 of CabViT-H, one digest per block
DEPTHS = (1, 1, 2, 2)  # a short CabViT-H-L1: every part, digests included, in a third of the ops
CABVIT_PARTS = set(COMPONENTS)  # the paper's Fig. 5 set: stem, ConvNeXt blocks, downsample, ..., head

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def benchmarks():
    """The scripts import their helpers as siblings (bench_utils, tme), as when run from benchmarks/."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield {name: importlib.import_module(name) for name in ('traffic', 'gpu_profile')}
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope='module')
def traffic(benchmarks):
    return benchmarks['traffic']


def settings(traffic, *argv: str):
    return traffic.parse_args(['--batch-size', '2', '--train-batch-size', '2', *argv])


def cabvit(tme: str = 'torch') -> nn.Module:
    model = timm.create_model('cabvit_h_l1', img_size=IMG_SIZE, depths=DEPTHS)
    model.set_tme_impl(tme)
    return model


def test_linear_exact(traffic):
    """One addmm (the transposed weight is a view): input, weight and bias read, output written, in fp32."""
    args = settings(traffic, '--dtype', 'fp32', '--batch-size', '3')
    counts = traffic.count_inference(nn.Linear(8, 4), (8,), args)
    assert counts['ops'] == 1 and counts['metadata_ops'] == 1
    assert dict(counts['op_names']) == {'aten.addmm.default': 1}
    assert counts['bytes_per_img'] * 3 == 4 * (3 * 8 + 8 * 4 + 4 + 3 * 4)
    assert counts['small_ops'] == 1 and counts['components'] == {
        'other': dict(ops=1, bytes_per_img=counts['bytes_per_img'], small_ops=1)}


def test_linear_autocast_casts_and_training(traffic):
    """bf16 autocast casts input, weight and bias, the parameters once per autocast context (cached for the counted
    inference pass, as in models.py's timing loop); training adds loss, backward and three SGD foreach ops."""
    args = settings(traffic, '--batch-size', '4')
    assert dict(traffic.count_inference(nn.Linear(8, 4), (8,), args)['op_names']) == {
        'aten._to_copy.default': 1, 'aten.addmm.default': 1}
    step = traffic.count_training(nn.Linear(8, 4), (8,), args)
    assert step['forward']['op_names']['aten._to_copy.default'] == 4  # and the logits to fp32 for the loss
    assert step['backward']['op_names']['aten.mm.default'] == 1  # weight gradient; the input needs none
    assert dict(step['optimizer']['op_names']) == {'aten._foreach_mul_.Scalar': 1, 'aten._foreach_add_.List': 2}
    assert step['step']['ops'] == sum(step[k]['ops'] for k in ('forward', 'backward', 'optimizer'))
    assert set(step['step']['components']) == {'other', 'loss', 'optimizer'}


def test_bytes_affine_in_batch(traffic):
    """Same ops at every batch; bytes = weights + batch x activations (an expanded bias counts once from batch 2)."""
    counts = [traffic.count_inference(cabvit(), (3, IMG_SIZE, IMG_SIZE), settings(traffic, '--batch-size', str(b)))
              for b in (2, 4, 6)]
    assert counts[0]['ops'] == counts[1]['ops'] == counts[2]['ops'] > 50
    total = [c['bytes_per_img'] * b for c, b in zip(counts, (2, 4, 6))]
    assert total[2] - total[1] == pytest.approx(total[1] - total[0], rel=1e-9)
    assert total[1] - total[0] > 0 and total[0] > total[1] - total[0]  # weights are read once per pass


@pytest.mark.parametrize('tme', ['torch', 'triton'])
def test_training_step(traffic, tme):
    """Backward adds more ops than the forward has; every op has a component; the fused TME shows as its ops."""
    input_size = (3, IMG_SIZE, IMG_SIZE)
    inference = traffic.count_inference(cabvit(tme), input_size, settings(traffic))
    step = traffic.count_training(cabvit(tme), input_size, settings(traffic))
    forward, backward = step['forward'], step['backward']
    assert 0 < inference['ops'] < forward['ops'] < backward['ops']
    assert backward['bytes_per_img'] > forward['bytes_per_img'] > inference['bytes_per_img'] > 0
    assert CABVIT_PARTS <= set(backward['components'])
    assert 'untraced' not in backward['components']  # every autograd node traced back to its module
    names = step['step']['op_names']
    if tme == 'triton':  # one fused op of each kind per CabViT block
        assert names['timm_cabvit.tme_train.default'] == names['timm_cabvit.tme_backward.default'] == 4
        assert names['timm_cabvit.tme_bn_backward.default'] == 4
        assert inference['op_names']['timm_cabvit.tme_eval.default'] == 4
    else:
        assert not any(name.startswith('timm_cabvit') for name in names)
    assert step['step']['small_ops'] <= step['step']['ops']


def test_tme_grids(traffic):
    """Grids of the fused kernels: one program per tile at most, a few per SM, the channels in whole blocks."""
    launches = traffic.tme_launches((14, 14), 320, 0, batch_size=128, train=True, sm_count=132)
    assert [k.kernel.split()[0] for op in launches.values() for k in op] == [
        '_tme_fwd_kernel', '_bn_stats_kernel', '_bn_apply_kernel', '_bn_bwd_reduce_kernel', '_bn_apply_kernel',
        '_tme_bwd_kernel']
    fwd, stats, _ = launches['tme_train']
    assert fwd.grid[1] == stats.grid[0] == 5  # 320 channels in blocks of 64
    assert fwd.grid[0] == math.ceil(8 * 132 / 5) <= 128 * 16
    assert launches['tme_backward'][0].grid[0] == math.ceil(2 * 132 / 5)
    assert traffic.tme_launches((7, 7), 480, 0, batch_size=1, train=False, sm_count=132)['tme_eval'][0].grid == (4, 15)


def test_gpu_profile_cpu_smoke(benchmarks, tmp_path):
    """The profile runs end to end on the CPU: every component of CabViT-H has time, backward included."""
    rows = benchmarks['gpu_profile'].main([
        '--device', 'cpu', '--models', 'cabvit_h_l1', '--img-size', '32', '--batch-size', '2', '--train-batch-size',
        '2', '--iters', '1', '--warmup', '1', '--results-dir', str(tmp_path)])
    assert [(row['model'], row['tme']) for row in rows] == [('cabvit_h_l1', 'torch')]
    inference, training = rows[0]['passes']['inference'], rows[0]['passes']['training']
    assert CABVIT_PARTS <= set(inference['components_ms']) and CABVIT_PARTS | {'optimizer'} <= set(
        training['components_ms'])
    assert training['total_ms'] > inference['total_ms'] > 0 and training['wall_ms'] > 0
    assert training['components_ms'].get('other', 0) < 0.1 * training['total_ms']
    assert training['kernels'][0]['ms'] >= training['kernels'][-1]['ms']
    written = json.loads(next(tmp_path.glob('profile-*.json')).read_text())
    assert written['rows'][0]['passes']['training']['total_ms'] == pytest.approx(training['total_ms'])
    lines = next(tmp_path.glob('profile-*.md')).read_text().splitlines()
    assert sum(line.startswith('| attention |') for line in lines) == 2  # inference and training tables


@pytest.mark.integration
@pytest.mark.skipif(not (BENCHMARKS.parent / '.git').exists(), reason='ab.py reads a git revision: no git checkout')
def test_ab_against_head_runs_both_versions(tmp_path):
    """ab.py builds the model from HEAD's package and from this checkout's, in one process (run as a script: its
    import of the other version takes over timm's registry), and prints their ratio and output difference."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / 'ab.py'), '--against', 'HEAD', '--models', 'cabvit_h_l1', '--rounds', '2',
         '--img-size', '64', '--threads', '1'], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    table = [line for line in done.stdout.splitlines() if line.startswith('| cabvit_h_l1 |')]
    assert len(table) == 1 and float(table[0].split('|')[4]) > 0
    assert 'HEAD ms' in done.stdout and 'cores kept busy' in done.stdout
    missing = subprocess.run([sys.executable, str(BENCHMARKS / 'ab.py'), '--against', 'no-such-revision'],
                             capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert missing.returncode == 1 and 'git archive no-such-revision' in missing.stderr
    assert 'Traceback' not in missing.stderr


@pytest.mark.slow
@pytest.mark.skipif(not (BENCHMARKS.parent / '.git').exists(), reason='ab.py reads a git revision: no git checkout')
def test_ab_compiles_both_versions(tmp_path):
    """ab.py --compile times both versions under torch.compile: each registers the package's ops under its own
    name, so both compile in one process and give the same outputs."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / 'ab.py'), '--against', 'HEAD', '--models', 'cabvit_h_l1', '--rounds', '1',
         '--img-size', '64', '--threads', '1', '--compile'], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr
    table = [line for line in done.stdout.splitlines() if line.startswith('| cabvit_h_l1 |')]
    assert len(table) == 1 and float(table[0].split('|')[5]) < 1e-4
    assert 'torch.compile, 1 rounds' in done.stdout


def test_cpu_profile_splits_time_and_sets_the_floor(benchmarks, tmp_path, capsys):
    """cpu_profile.py profiles both runtimes: the matrix ops, GELUs and the rest of each model add up to its time,
    fvcore's multiply-adds of the matrix work, and the floor rows against the peer; written as .md and .json."""
    cpu_profile = importlib.import_module('cpu_profile')
    result = cpu_profile.main(['--models', 'cabvit_h_l1', 'convnext_pico', '--iters', '1', '--rounds', '1',
                               '--warmup', '1', '--threads', '1', '--out-dir', str(tmp_path)])
    for runtime, matrix_op in (('pytorch', 'mkldnn::_linear_pointwise'), ('onnxruntime', 'MatMul')):
        ours, peer = result['results'][runtime]['cabvit_h_l1'], result['results'][runtime]['convnext_pico']
        assert ours['ops_ms'][matrix_op] > 0 and ours['matrix_ms'] > ours['other_ms'] > 0
        assert peer['gelu_ms'] > 0 and peer['matrix_ms'] > 0
        for summary in (ours, peer):
            parts = summary['matrix_ms'] + summary['gelu_ms'] + summary['other_ms']
            assert parts == pytest.approx(summary['total_ms']) == pytest.approx(sum(summary['ops_ms'].values()))
    assert result['results']['pytorch']['cabvit_h_l1']['matrix_macs'] == pytest.approx(1.374e9, rel=1e-3)
    assert result['results']['onnxruntime']['convnext_pico']['matrix_macs'] == pytest.approx(1.367e9, rel=1e-3)
    assert [(r['runtime'], r['model'], r['peer']) for r in result['floors']] == [
        ('pytorch', 'cabvit_h_l1', 'convnext_pico'), ('onnxruntime', 'cabvit_h_l1', 'convnext_pico')]
    for row in result['floors']:
        assert 0 < row['matrix_only'] < row['matrix_and_gelu_only'] <= row['ratio']
    printed = capsys.readouterr().out
    assert printed.count('| cabvit_h_l1 / convnext_pico |') == 2
    assert json.loads(next(tmp_path.glob('cpu-profile-*.json')).read_text())['floors'] == result['floors']
    assert next(tmp_path.glob('cpu-profile-*.md')).read_text().count('| convnext_pico |') == 2


@pytest.mark.slow
def test_cpu_profile_compiled(benchmarks, tmp_path):
    """Compiled, the self time of the compiled graph's call is one row (kernels and wrapper), the package's oneDNN
    linears matrix time; the GELUs are in the kernels."""
    cpu_profile = importlib.import_module('cpu_profile')
    result = cpu_profile.main(['--models', 'cabvit_h_l1', 'convnext_pico', '--runtimes', 'compiled', '--iters', '1',
                               '--rounds', '1', '--warmup', '1', '--threads', '1', '--out-dir', str(tmp_path)])
    ours, peer = result['results']['compiled']['cabvit_h_l1'], result['results']['compiled']['convnext_pico']
    graph = cpu_profile.COMPILED_GRAPH
    assert ours['ops_ms'][graph] > 0 and peer['ops_ms'][graph] > 0
    assert ours['ops_ms']['mkldnn::_linear_pointwise'] > 0 and ours['gelu_ms'] == peer['gelu_ms'] == 0
    assert not any(op.startswith(cpu_profile.COMPILED_GRAPH_CALL) for op in {*ours['ops_ms'], *peer['ops_ms']})
    assert [(r['runtime'], r['model']) for r in result['floors']] == [('compiled', 'cabvit_h_l1')]
    assert 0 < result['floors'][0]['matrix_only'] < result['floors'][0]['ratio']


def test_cpu_profile_refuses_unknown_models(tmp_path):
    done = subprocess.run([sys.executable, str(BENCHMARKS / 'cpu_profile.py'), '--models', 'cabvit_h_l9'],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and 'no timm model named cabvit_h_l9' in done.stderr
    assert 'Traceback' not in done.stderr
