"""The paper's accounting: FLOPs and parameters by component, and what cross-block attention costs."""
import json
import math

import pytest
import timm

from timm_cabvit.tools.flops import COMPONENTS, component_fn, count_flops, flops_by_component, num_params
from timm_cabvit.tools.reports import flops_report
from timm_cabvit_cli import main


def _digest_parameters(dim: int, heads: int, depth: int, grid: tuple) -> int:
    """Merge convs, digest norms, digest scales and depth biases of one CabViT stage, by ARCHITECTURE.md."""
    digests = math.ceil(grid[0] / 4) * math.ceil(grid[1] / 4)
    earlier = sum(range(depth))  # block i reads the digests of i earlier blocks
    return (depth - 1) * (dim * 49 + 2 * dim) + earlier * digests * (1 + heads)


@pytest.mark.parametrize('model_name, stages', [
    ('cabvit_h_l1', [(192, 6, 6, (14, 14)), (320, 10, 2, (7, 7))]),
    ('cabvit_p_l0', [(192, 3, 12, (14, 14))]),
])
def test_cross_block_off_removes_exactly_the_digest_parameters(model_name, stages):
    full = timm.create_model(model_name, device='meta')
    plain = timm.create_model(model_name, device='meta', cross_block=False)
    removed = num_params(full) - num_params(plain)
    assert removed == sum(_digest_parameters(*stage) for stage in stages)
    assert count_flops(timm.create_model(model_name, cross_block=False)) < count_flops(timm.create_model(model_name))


@pytest.mark.parametrize('model_name', ['cabvit_h_l1', 'cabvit_p_l0'])
def test_components_sum_to_the_totals(model_name):
    model = timm.create_model(model_name)
    components = flops_by_component(model)
    assert sum(c['params'] for c in components.values()) == num_params(model)
    assert sum(c['flops'] for c in components.values()) == count_flops(model)
    assert components['other'] == dict(params=0, flops=0)
    assert components['attention']['flops'] > 0 and components['FFN']['flops'] > 0


@pytest.mark.parametrize('model_name, expected', [
    ('cabvit_p_l0', {'cls_token': 'stem', 'blocks.3.norm1': 'attention', 'blocks.3.digest_calib.norm': 'attention',
                     'blocks.3.tme.merge.weight': 'TME', 'blocks.3.ls2': 'FFN', 'blocks.3': 'other', 'norm': 'head'}),
    ('efficientformer_l1', {'stages.0.blocks.0.token_mixer.pool': 'attention', 'stages.0.blocks.0.ls1': 'attention',
                            'stages.0.blocks.0.mlp.norm1': 'FFN', 'stages.3.blocks.3': 'other',
                            'stages.3.blocks.4.norm2': 'FFN', 'stages.1.downsample.conv': 'downsample'}),
    ('nextvit_small', {'stages.2.blocks.4.e_mhsa.q': 'attention', 'stages.2.blocks.4.mhca': 'attention',
                       'stages.2.blocks.4.projection': 'other', 'stages.2.blocks.4.mlp.fc1': 'FFN', '': 'other'}),
])
def test_one_taxonomy_for_cabvit_and_peers(model_name, expected):
    """Module (and parameter) paths of CabViT and of timm peers map to the paper's Fig. 5 components or 'other'."""
    component = component_fn(timm.create_model(model_name, device='meta'))
    assert {path: component(path) for path in expected} == expected


def test_digest_scales_add_parameters_but_no_flops():
    with_scales = timm.create_model('cabvit_h_l1')
    without = timm.create_model('cabvit_h_l1', digest_scale=False)
    assert num_params(with_scales) - num_params(without) == 244
    assert count_flops(with_scales) == count_flops(without)


def test_flops_command_json_and_plot(tmp_path, capsys):
    plot = tmp_path / 'flops.png'
    assert main(['flops', 'cabvit_h_l1', '--img-size', '160', '--json', '--plot', str(plot)]) == 0
    captured = capsys.readouterr()
    (report,) = json.loads(captured.out)
    assert 'counting FLOPs' in captured.err and f'wrote {plot} (GFLOPs by component)' in captured.err
    assert report['img_size'] == [160, 160] and set(report['with_cross_block']['components']) == {*COMPONENTS, 'other'}
    assert report['with_cross_block']['flops'] > report['without_cross_block']['flops']
    assert plot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and plot.stat().st_size > 10_000


def test_flops_table_reports_the_extra_cost():
    report = flops_report('cabvit_h_l1', (224, 224))
    assert report['with_cross_block']['params'] == 6_187_560
    assert report['with_cross_block']['flops'] - report['without_cross_block']['flops'] == pytest.approx(
        0.047e9, rel=0.02)


def test_ablation_ladder_ends_at_the_model_and_prints_the_papers_increments(capsys):
    assert main(['ablation', 'cabvit_h_l1']) == 0
    out, err = capsys.readouterr()
    assert 'counting FLOPs' in err and '4/4' in err  # progress, one step per model of the ladder
    last = next(line for line in out.splitlines() if line.startswith('+ TME enhance branch'))
    assert '6,187,560' in last and '1.385' in last
    assert '+3.4 %' in out and '13%' in out  # the paper's Table 4 step and Sec. 3.3 claim, printed beside ours
