"""The models against ARCHITECTURE.md: figures, the block's function, and the timm API at our fixed sizes."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from support import ALL_MODELS, H_MODELS

from timm_cabvit.cabvit import CabViTBlock
from timm_cabvit.tools.flops import count_flops, num_params

EXACT_PARAMS = {'cabvit_h_l1': 6_187_560, 'cabvit_h_l2': 16_275_870, 'cabvit_h_l3': 27_894_484}
FLOPS_G = {'cabvit_h_l1': 1.385, 'cabvit_h_l2': 3.620, 'cabvit_h_l3': 6.680}


def test_registry_lists_the_four_models():
    assert timm.list_models('cabvit*') == sorted(ALL_MODELS)


@pytest.mark.parametrize('model_name', H_MODELS)
def test_exact_parameter_count(model_name):
    assert num_params(timm.create_model(model_name, device='meta')) == EXACT_PARAMS[model_name]


def test_plain_parameter_count_within_paper_tolerance():
    assert abs(num_params(timm.create_model('cabvit_p_l0', device='meta')) / 5.9e6 - 1) < 0.015


@pytest.mark.parametrize('model_name', H_MODELS)
def test_fvcore_flops_within_one_percent(model_name):
    flops = count_flops(timm.create_model(model_name))
    assert abs(flops / (FLOPS_G[model_name] * 1e9) - 1) < 0.01


@pytest.mark.parametrize('model_name', ALL_MODELS)
def test_logits_shape_and_finite(model_name):
    model = timm.create_model(model_name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


def _spec_block(block: CabViTBlock, x: torch.Tensor, digests, grid):
    """One CabViT-H block written out from ARCHITECTURE.md with explicit loops over the bias tables."""
    B, N, C = x.shape
    heads, hd = block.attn.num_heads, C // block.attn.num_heads
    ln = lambda t, m: F.layer_norm(t, (C,), m.weight, m.bias, m.eps)  # noqa: E731
    w, b = block.attn.qkv.weight, block.attn.qkv.bias
    qkv = F.linear(ln(x, block.norm1), w, b)
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    table = block.attn.pos_bias.attention_biases
    bias = torch.empty(heads, N, N)
    for p in range(N):
        for r in range(N):
            dy, dx = abs(p // grid[1] - r // grid[1]), abs(p % grid[1] - r % grid[1])
            bias[:, p, r] = table[:, dy * grid[1] + dx]
    if digests is not None:
        depth, num_digest = block.digest_calib.scale.shape
        scaled = digests * block.digest_calib.scale.reshape(1, -1, 1)
        kv_d = F.linear(ln(scaled, block.digest_calib.norm), w, b)
        k = torch.cat([k, kv_d[..., C:2 * C]], 1)
        v = torch.cat([v, kv_d[..., 2 * C:]], 1)
        depth_bias = torch.empty(heads, depth * num_digest)
        for m in range(depth * num_digest):
            source_block, s = divmod(m, num_digest)
            depth_bias[:, m] = block.attn.depth_bias.bias[:, depth - source_block - 1, s]  # relative depth i - j
        bias = torch.cat([bias, depth_bias[:, None].expand(heads, N, -1)], -1)
    split = lambda t: t.reshape(B, -1, heads, hd).transpose(1, 2)  # noqa: E731
    attn = (split(q) @ split(k).transpose(-1, -2) / math.sqrt(hd) + bias).softmax(-1)
    out = (attn @ split(v)).transpose(1, 2).reshape(B, N, C)
    y = x + block.ls1.gamma * block.attn.proj(out)
    y_map = y.transpose(1, 2).reshape(B, C, *grid)
    digest = None
    if block.tme.merge is not None:
        digest = F.conv2d(y_map, block.tme.merge.weight, stride=4, padding=3, groups=C).flatten(2).transpose(1, 2)
    bn = block.tme.enhance.bn
    z = F.conv2d(y_map, block.tme.enhance.conv.weight, padding=1, groups=C)
    z = F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0., bn.eps)
    z = z.flatten(2).transpose(1, 2)
    mlp = block.mlp
    hidden = F.gelu(mlp.fc1(ln(ln(z, block.norm2), mlp.pre_norm)))
    return z + block.ls2.gamma * mlp.fc2(hidden), digest


@pytest.mark.parametrize('grid, block_idx, merge', [((7, 7), 0, True), ((7, 7), 2, True), ((5, 6), 1, False)])
def test_block_is_the_specified_function(grid, block_idx, merge):
    dim, heads = 64, 2
    block = CabViTBlock(dim, heads, grid, block_idx=block_idx, merge=merge, ls_init_value=0.5).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # non-trivial biases, scales and norms
        bn = block.tme.enhance.bn
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    num_digest = math.ceil(grid[0] / 4) * math.ceil(grid[1] / 4)
    x = torch.randn(2, grid[0] * grid[1], dim)
    digests = torch.randn(2, block_idx * num_digest, dim) if block_idx else None
    with torch.no_grad():
        out, digest = block(x, digests, grid)
        expected, expected_digest = _spec_block(block, x, digests, grid)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    if merge:
        assert digest.shape == (2, num_digest, dim)
        torch.testing.assert_close(digest, expected_digest, rtol=1e-4, atol=1e-5)
    else:
        assert digest is None


def test_digests_of_earlier_blocks_change_the_output():
    model = timm.create_model('cabvit_h_l1', ls_init_value=1.).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        before = model.forward_features(x)
        model.stages[2].blocks[0].tme.merge.weight.mul_(3)  # used only as digest keys of blocks 1-5
        after = model.forward_features(x)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize('img_size', [224, 512, (200, 256)])
def test_features_only_maps_at_strides_4_to_32(img_size):
    model = timm.create_model('cabvit_h_l1', features_only=True, img_size=img_size).eval()
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        features = model(torch.randn(1, 3, height, width))
    for feature, channels, stride in zip(features, (64, 128, 192, 320), (4, 8, 16, 32)):
        assert feature.shape == (1, channels, math.ceil(height / stride), math.ceil(width / stride))
        assert torch.isfinite(feature).all()


def test_forward_intermediates_at_512_match_features_only():
    torch.manual_seed(0)
    model = timm.create_model('cabvit_h_l1', img_size=512, ls_init_value=1.).eval()
    torch.manual_seed(0)
    backbone = timm.create_model('cabvit_h_l1', img_size=512, ls_init_value=1., features_only=True).eval()
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        for a, b in zip(intermediates, backbone(x)):
            torch.testing.assert_close(a, b)
    assert [t.shape[-1] for t in intermediates] == [128, 64, 32, 16]


def test_plain_model_intermediates_are_patch_maps():
    model = timm.create_model('cabvit_p_l0').eval()
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(torch.randn(1, 3, 224, 224), indices=[3, 11])
    assert final.shape == (1, 197, 192)
    assert [t.shape for t in intermediates] == [(1, 192, 14, 14)] * 2


@pytest.mark.parametrize('model_name', ['cabvit_h_l1', 'cabvit_p_l0'])
def test_wrong_input_gives_clear_value_errors(model_name):
    model = timm.create_model(model_name).eval()
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\), got \[1, 1, 224, 224\]'):
        model(torch.randn(1, 1, 224, 224))
    with pytest.raises(ValueError, match=r'built for 224x224 images .* got 256x224'):
        model(torch.randn(1, 3, 256, 224))
    with pytest.raises(ValueError, match='at least'):
        timm.create_model(model_name, img_size=8)


@pytest.mark.filterwarnings('ignore::torch.jit.TracerWarning', 'ignore:`torch.jit.trace_method` is deprecated')
@pytest.mark.parametrize('dynamic_img_size', [False, True])
def test_trace_refuses_an_input_of_another_size(dynamic_img_size):
    """torch.jit.trace records no Python comparison of sizes: the size check is a TorchScript call in the trace.
    Without it a non-square model's trace ran on the transposed input and returned wrong logits."""
    model = timm.create_model('cabvit_h_l1', img_size=(64, 96), dynamic_img_size=dynamic_img_size).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)  # its index constants differ from trace to trace
        torch.testing.assert_close(traced(x), model(x))
        with pytest.raises(torch.jit.Error, match=r'trace of a CabViT model takes 64x96 images only, got 96x64'):
            traced(torch.randn(2, 3, 96, 64))


@pytest.mark.parametrize('model_name', ['cabvit_h_l1', 'cabvit_p_l0'])
def test_empty_batch_and_input_types(model_name):
    """An empty batch gives empty logits, as timm's other models; other dtypes and non-tensors a clear error."""
    model = timm.create_model(model_name, img_size=64).eval()
    with torch.no_grad():
        assert model(torch.zeros(0, 3, 64, 64)).shape == (0, 1000)
    for bad in (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), torch.zeros(1, 3, 64, 64, dtype=torch.int64),
                torch.zeros(1, 3, 64, 64, dtype=torch.float64), torch.zeros(1, 3, 64, 64, dtype=torch.bool)):
        with pytest.raises(ValueError, match=f'expects torch.float32 images, as its weights, got {bad.dtype}'):
            model(bad)
    with pytest.raises(ValueError, match='expects a torch.Tensor of images'):
        model(torch.zeros(1, 3, 64, 64).numpy())
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)  # autocast casts the float32 images itself


@pytest.mark.parametrize('img_size, message', [
    ('224', r"img_size must be an int or a pair of ints \(H, W\), got '224'"),
    ((224,), r'got \(224,\)'),
    ((224, 224, 3), r'got \(224, 224, 3\)'),
    (10000, r'gives 390,625 tokens at stride 16.*up to 16,384 tokens'),
    (16, r'at least 32x32'),
])
def test_bad_img_size_fails_fast_with_what_is_allowed(img_size, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model('cabvit_h_l1', img_size=img_size, device='meta')


def test_too_small_input_suggests_no_size_creation_rejects():
    model = timm.create_model('cabvit_h_l1', img_size=64)
    with pytest.raises(ValueError) as e:
        model(torch.zeros(1, 3, 16, 16))
    assert 'img_size=(16, 16)' not in str(e.value) and 'from 32x32' in str(e.value)


def test_in_chans_num_classes_and_pooling():
    model = timm.create_model('cabvit_h_l1', in_chans=1, num_classes=7, global_pool='max').eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 224, 224)).shape == (2, 7)
        model.reset_classifier(0, '')
        assert model(torch.randn(2, 1, 224, 224)).shape == (2, 320, 7, 7)


@pytest.mark.parametrize('num_heads', [(2, None, 6, 10), (2, 4, 6, 10)])
def test_cabvit_stage_first_builds_runs_and_folds(num_heads):
    """A CabViT stage where the reference has ConvNeXt stages: no downsample before it, input checked by the stem."""
    from timm.utils import reparameterize_model
    model = timm.create_model('cabvit_h_l1', img_size=(64, 96), num_heads=num_heads).eval()
    x = torch.randn(1, 3, 64, 96)
    features = model.forward_intermediates(x, intermediates_only=True)
    assert [f.shape[-2:] for f in features] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    with torch.no_grad():
        torch.testing.assert_close(reparameterize_model(model)(x), model(x))
    model.train()(x).sum().backward()


def test_drop_path_rates_linear_over_all_blocks():
    model = timm.create_model('cabvit_h_l1', drop_path_rate=0.1)
    rates = []
    for stage in model.stages:
        for block in stage.blocks:
            drop_path = getattr(block, 'drop_path', None) or block.drop_path1
            rates.append(getattr(drop_path, 'drop_prob', 0.))
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.1, 12))


@pytest.mark.parametrize('model_name', ['cabvit_h_l1', 'cabvit_p_l0'])
def test_grad_checkpointing_recomputes_blocks_with_the_same_gradients(model_name):
    x = torch.randn(2, 3, 224, 224)
    grads, calls, stats = [], [], []
    for enable in (False, True):
        torch.manual_seed(0)
        model = timm.create_model(model_name, num_classes=10, ls_init_value=1.).train()
        model.set_grad_checkpointing(enable)
        blocks = [m for m in model.modules() if isinstance(m, CabViTBlock)]
        block_calls = []
        for block in blocks:
            block.register_forward_pre_hook(lambda *_, calls=block_calls: calls.append(1))
        model(x).logsumexp(-1).sum().backward()
        grads.append([p.grad for p in model.parameters()])
        calls.append(len(block_calls) / len(blocks))
        stats.append(blocks[-1].tme.enhance.bn.running_mean.clone())
    assert calls == [1, 2]  # every CabViT block (digests included) is re-entered in backward
    torch.testing.assert_close(stats[1], stats[0])  # the recomputation left the BatchNorm statistics alone
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)


def test_features_only_backbone_trains_with_grad_checkpointing():
    model = timm.create_model('cabvit_h_l1', features_only=True).train()
    model.model.set_grad_checkpointing(True)  # timm's FeatureGetterNet has no set_grad_checkpointing of its own
    sum(f.pow(2).mean() for f in model(torch.randn(2, 3, 224, 224))).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_set_input_size_resamples_tables_and_keeps_frozen_weights():
    model = timm.create_model('cabvit_h_l1').eval()
    model.requires_grad_(False)
    model.set_input_size((256, 192))
    assert not any(p.requires_grad for p in model.parameters())
    assert model.stages[2].blocks[0].attn.pos_bias.attention_biases.shape == (6, 16 * 12)
    assert model.stages[2].blocks[1].digest_calib.scale.shape == (1, 4 * 3)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 256, 192))).all()


@pytest.mark.parametrize('model_name', ['cabvit_h_l1', 'cabvit_p_l0'])
def test_each_table_keeps_its_grid_and_no_other_module_stores_one(model_name):
    """A grid lives with the table laid out on it; resizing walks those tables, the walk table_grids takes too."""
    from timm.layers import PatchEmbed

    from timm_cabvit.cabvit import GRID_TABLES

    model = timm.create_model(model_name, img_size=(96, 64))
    holders = {type(m) for m in model.modules()
               if isinstance(getattr(m, 'grid_size', None), tuple) and not isinstance(m, PatchEmbed)}
    assert holders and holders <= set(GRID_TABLES)
    model.set_input_size((128, 96))
    assert all(owner.grid_size == grid for _, owner, grid in model.table_owners((128, 96)))
    built = timm.create_model(model_name, img_size=(128, 96))
    assert model.table_grids() == built.table_grids()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in built.state_dict().items()}
    for attn_resized, attn_built in zip(*(
            [m for m in mod.modules() if hasattr(m, 'bias_positions')] for mod in (model, built))):
        assert torch.equal(attn_resized.bias_positions, attn_built.bias_positions)


def test_only_the_model_file_spells_the_tables_state_dict_names():
    """Renaming a submodule that holds a table is a change to cabvit.py alone."""
    import re
    from pathlib import Path

    import timm_cabvit

    models = [timm.create_model(name, device='meta') for name in ('cabvit_h_l1', 'cabvit_p_l0')]
    members = {re.sub(r'^(stages\.\d+\.)?blocks\.\d+\.', '', key) for m in models for key in m.table_grids()}
    assert members == {'attn.pos_bias.attention_biases', 'attn.pos_bias.relative_position_bias_table',
                       'attn.depth_bias.bias', 'digest_calib.scale'}
    package = Path(timm_cabvit.__file__).parent
    for path in package.rglob('*.py'):
        if path.name != 'cabvit.py':
            assert not [m for m in members if m in path.read_text()], path


def test_checkpoint_at_224_loads_at_384():
    source = timm.create_model('cabvit_h_l1')
    target = timm.create_model('cabvit_h_l1', img_size=384).eval()
    from timm_cabvit.cabvit import checkpoint_filter_fn
    target.load_state_dict(checkpoint_filter_fn({'state_dict': source.state_dict()}, target))
    with torch.no_grad():
        assert torch.isfinite(target(torch.randn(1, 3, 384, 384))).all()


@pytest.mark.parametrize('model_name', ['cabvit_h_l1', 'cabvit_p_l0'])
def test_no_weight_decay_and_layer_groups(model_name):
    from timm.optim import param_groups_layer_decay
    model = timm.create_model(model_name, device='meta')
    no_decay = model.no_weight_decay()
    names = dict(model.named_parameters())
    assert no_decay and no_decay <= names.keys()
    assert any(n.endswith('depth_bias.bias') for n in no_decay) and any(n.endswith('.scale') for n in no_decay)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    assert len({g['lr_scale'] for g in groups}) > 4


def test_factory_device_and_dtype():
    model = timm.create_model('cabvit_h_l1', device='meta', dtype=torch.float64)
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.device.type == 'meta' for t in tensors)
    assert all(t.dtype == torch.float64 for t in model.parameters())
