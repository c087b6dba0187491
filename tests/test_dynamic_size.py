"""dynamic_img_size=True: any input size per forward, the tables resampled to its grids, as set_input_size does."""
import copy

import pytest
import timm
import torch
from support import ALL_MODELS

SIZES = [(224, 224), (256, 320), (512, 512), (800, 1216)]


def _randomized(model_name: str, **kwargs) -> torch.nn.Module:
    model = timm.create_model(model_name, **kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(('attention_biases', 'relative_position_bias_table', 'depth_bias.bias', '.scale',
                              'gamma')):
                p.normal_()
    return model.eval()


@pytest.fixture(scope='module', params=['cabvit_h_l1', 'cabvit_p_l0'])
def fixed_and_dynamic(request):
    fixed = _randomized(request.param)
    dynamic = timm.create_model(request.param, dynamic_img_size=True).eval()
    dynamic.load_state_dict(fixed.state_dict())
    return fixed, dynamic


def test_own_size_equals_fixed_model_bit_for_bit(fixed_and_dynamic):
    fixed, dynamic = fixed_and_dynamic
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(dynamic(x), fixed(x), rtol=0, atol=0)


def test_other_size_equals_the_resampled_fixed_model(fixed_and_dynamic):
    fixed, dynamic = fixed_and_dynamic
    resampled = copy.deepcopy(fixed)
    resampled.set_input_size((320, 256))
    x = torch.randn(1, 3, 320, 256)
    with torch.no_grad():
        torch.testing.assert_close(dynamic(x), resampled(x), rtol=0, atol=0)


@pytest.mark.parametrize('model_name', ['cabvit_h_l1', 'cabvit_p_l0'])
@pytest.mark.parametrize('size', [(40, 40), (36, 52)])
def test_sizes_not_multiples_of_16_take_one_patch_rule(model_name, size):
    """Fixed and dynamic models agree at the fixed model's size, and a dynamic model built for another size equals
    the fixed model resampled to it: cabvit_p_l0 drops what lies past whole patches in both (as timm's ViT built for
    such a size), CabViT-H's strided convolutions cover it in both."""
    fixed = _randomized(model_name, img_size=size)
    dynamic = timm.create_model(model_name, img_size=size, dynamic_img_size=True).eval()
    dynamic.load_state_dict(fixed.state_dict())
    other = _randomized(model_name, img_size=64, dynamic_img_size=True)
    resampled = _randomized(model_name, img_size=64)
    resampled.load_state_dict(other.state_dict())
    resampled.set_input_size(size)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(dynamic(x), fixed(x), rtol=0, atol=0)
        torch.testing.assert_close(other(x), resampled(x), rtol=0, atol=0)


def test_scripted_dynamic_model_says_the_size_it_takes():
    """TorchScript cannot resample the tables: a scripted dynamic model runs at its img_size and refuses others."""
    model = _randomized('cabvit_h_l1', img_size=(64, 96), dynamic_img_size=True)
    scripted = torch.jit.script(model)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))
        with pytest.raises(torch.jit.Error, match=r'takes 64x96 images only, the size it was built for.* got 96x64; '
                                                  r'call set_input_size\(\(96, 64\)\) before torch.jit.script'):
            scripted(torch.randn(1, 3, 96, 64))


@pytest.mark.parametrize('model_name', ['cabvit_h_l1', pytest.param('cabvit_p_l0', marks=pytest.mark.slow)])
def test_one_instance_runs_every_size(model_name):
    dynamic = timm.create_model(model_name, dynamic_img_size=True).eval()
    with torch.no_grad():
        for size in SIZES:
            out = dynamic(torch.randn(1, 3, *size))
            assert out.shape == (1, 1000) and torch.isfinite(out).all(), size


@pytest.mark.parametrize('model_name', ALL_MODELS)
def test_features_grad_checkpointing_and_training_at_two_sizes(model_name):
    """Training recomputes the resampled tables, so they get gradients; grad checkpointing re-enters each block."""
    backbone = timm.create_model(model_name, features_only=True, dynamic_img_size=True)
    backbone.model.set_grad_checkpointing(True)
    tables = [p for n, p in backbone.named_parameters() if n.endswith(('attention_biases', 'depth_bias.bias'))
              or n.endswith('relative_position_bias_table')]
    for size in [(96, 64), (64, 128)]:
        backbone.zero_grad()
        features = backbone(torch.randn(2, 3, *size))
        stride = 32 if model_name != 'cabvit_p_l0' else 16
        assert features[-1].shape[-2:] == (-(-size[0] // stride), -(-size[1] // stride))
        sum(f.square().mean() for f in features).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tables)


def test_eval_cache_follows_the_grid():
    """The eval-mode bias cache is per grid: a new size gives that size's bias, the old size its own again."""
    model = _randomized('cabvit_h_l1', dynamic_img_size=True)
    a, b = torch.randn(1, 3, 96, 64), torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        first = model(a)
        model(b)
        torch.testing.assert_close(model(a), first, rtol=0, atol=0)
    fresh = copy.deepcopy(model)
    fresh.train().eval()  # drops the caches
    with torch.no_grad():
        torch.testing.assert_close(fresh(b), model(b), rtol=0, atol=0)


@pytest.mark.parametrize('bad, message', [
    (torch.randn(1, 3, 16, 64), 'from 32x32'),
    (torch.randn(1, 1, 64, 64), r'shape \(B, 3, H, W\)'),
    (torch.randn(1, 3, 64, 64, dtype=torch.float64), 'expects torch.float32 images'),
])
def test_bad_input_still_gets_a_clear_error(bad, message):
    model = timm.create_model('cabvit_h_l1', dynamic_img_size=True)
    with pytest.raises(ValueError, match=message):
        model(bad)


@pytest.mark.slow
def test_compile_recompiles_per_size():
    """torch.compile (aot_eager here: no C compiler is needed) runs both sizes; one recompile per new size."""
    model = timm.create_model('cabvit_h_l1', dynamic_img_size=True).eval()
    compiled = torch.compile(model, backend='aot_eager', dynamic=False)
    with torch.no_grad():
        for size in [(64, 64), (96, 64)]:
            x = torch.randn(1, 3, *size)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.integration
@pytest.mark.parametrize('model_name', ['cabvit_h_l1', 'cabvit_p_l0'])
def test_onnx_export_at_a_fixed_size_of_ones_choice(model_name, tmp_path):
    """A dynamic model exports at any fixed size: ONNX Runtime gives what the dynamic model gives at that size."""
    onnxruntime = pytest.importorskip('onnxruntime')
    from timm_cabvit.tools.deploy import calibrate_batchnorm, export_onnx

    model = calibrate_batchnorm(_randomized(model_name, img_size=64, dynamic_img_size=True), img_size=(64, 64))
    path = tmp_path / 'model.onnx'
    report = export_onnx(model, path, img_size=(96, 64))
    assert report['img_size'] == (96, 64) and report['max_rel_diff'] < 1e-4
    assert model.img_size == (64, 64)  # the copy was resampled, not the model
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        ref = model(x)
    out = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider']).run(None, {'input': x.numpy()})[0]
    assert ref.abs().max() > 0.1 and (torch.from_numpy(out) - ref).abs().max() < 1e-4 * ref.abs().max()
