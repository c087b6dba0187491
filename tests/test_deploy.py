"""Inference-ready models: BatchNorm folding, ONNX Runtime parity, torch.export and TorchScript round trips, and
finite outputs in reduced precision, for all four models at a small image size.

The two larger models' exports and training steps, cabvit_p_l0's torch.export round trip and the torch.export-based
ONNX exporter (4-30 s each on two shared cores, through the code paths cabvit_h_l1 and the fast tests take) are
marked slow; every test that exports (ONNX, torch.export, TorchScript) is marked integration.
"""
import copy
import functools
import sys
from unittest import mock

import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch
from support import ALL_MODELS
from timm.layers import LayerScale
from timm.models.convnext import ConvNeXtBlock
from timm.utils import reparameterize_model

from timm_cabvit.tools.deploy import (
    ExportCheckError,
    calibrate_batchnorm,
    convnext_mlps_as_convolutions,
    export_onnx,
    export_program,
    export_torchscript,
    onnx_opset_range,
    require_onnx,
)
from timm_cabvit.tools.flops import num_params

IMG_SIZE = 96  # 6x6 tokens in stage 3 and 2x2 digests per block: every bias table has more than one entry
SLOW_MODELS = ('cabvit_h_l2', 'cabvit_h_l3')
LARGE = 100.  # images x 100: activations far outside the range of normalised images

pytestmark = [
    pytest.mark.filterwarnings('ignore:`torch.jit.(save|load)` is deprecated:FutureWarning'),
    pytest.mark.usefixtures('one_thread'),
]


def _params(model_names, slow=SLOW_MODELS):
    return [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in model_names]


@torch.no_grad()
def _like_trained(model: torch.nn.Module) -> torch.nn.Module:
    """Random BatchNorm statistics and affine, layer scales near 1 and random bias tables.

    At init the BatchNorms are identities, every block's branch is scaled by 1e-6 and the biases are 0: folding
    and the attention path would hardly change the output, and no comparison would see their errors.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0., .5)
            module.running_var.uniform_(.5, 2.)
            module.weight.uniform_(.5, 1.5)
            module.bias.normal_(0., .2)
        elif isinstance(module, LayerScale):
            module.gamma.uniform_(.5, 1.)
        elif isinstance(module, ConvNeXtBlock) and module.gamma is not None:
            module.gamma.uniform_(.5, 1.)
    for name, param in model.named_parameters():
        if name.endswith(('attention_biases', 'depth_bias.bias', 'relative_position_bias_table')):
            param.normal_(0., 1.)
        elif name.endswith('digest_calib.scale'):
            param.uniform_(.5, 1.5)
    return model


@functools.cache
def _model(model_name: str, img_size: int = IMG_SIZE) -> torch.nn.Module:
    """One eval-mode model per name and size for the whole module; the exports work on copies."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _like_trained(timm.create_model(model_name, img_size=img_size)).eval()


def _images(batch_size: int, img_size: int = IMG_SIZE, scale: float = 1.) -> torch.Tensor:
    return torch.randn(batch_size, 3, img_size, img_size) * scale


def _batchnorms(model: torch.nn.Module, fusable_only: bool = False) -> list:
    """The BatchNorms of the model or, with `fusable_only`, those inside modules with a `fuse()`."""
    parents = [m for m in model.modules() if hasattr(m, 'fuse')] if fusable_only else [model]
    return list({
        id(m): m for parent in parents for m in parent.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}.values())


@pytest.mark.parametrize('model_name', ALL_MODELS)
def test_reparameterized_equals_plain(model_name):
    model = _model(model_name)
    fused = reparameterize_model(model)
    x = _images(2)
    with torch.no_grad():
        ref, out = model(x), fused(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    # every BatchNorm under a fuse() is gone, and each took at least its scale vector with it (its shift may
    # stay as the conv's new bias)
    folded = _batchnorms(model, fusable_only=True)
    assert len(_batchnorms(fused)) == len(_batchnorms(model)) - len(folded)
    assert folded and num_params(fused) <= num_params(model) - sum(bn.num_features for bn in folded)


@pytest.mark.integration
@pytest.mark.parametrize('model_name', _params(ALL_MODELS))
def test_onnx_runtime_parity_dynamic_batch(model_name, tmp_path):
    model = _model(model_name)
    path = tmp_path / f'{model_name}.onnx'
    report = export_onnx(model, path, batch_size=1)
    assert report['max_abs_diff'] < 1e-4 and report['batch_sizes'] == (1, 3) and report['opset'] >= 17

    graph_input = onnx.load(path).graph.input[0].type.tensor_type.shape.dim
    assert graph_input[0].dim_param and [d.dim_value for d in graph_input[1:]] == [3, IMG_SIZE, IMG_SIZE]
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    for batch_size in (1, 3):  # one file, two batch sizes, against the unfused model
        x = _images(batch_size)
        with torch.no_grad():
            ref = model(x).numpy()
        out = session.run(None, {'input': x.numpy()})[0]
        assert out.shape == ref.shape and np.abs(out - ref).max() < 1e-4


@pytest.mark.integration
@pytest.mark.slow
def test_onnx_dynamo_exporter(tmp_path):
    report = export_onnx(_model('cabvit_h_l1'), tmp_path / 'cabvit_h_l1.onnx', dynamo=True)
    assert report['exporter'] == 'dynamo' and report['max_abs_diff'] < 1e-4 and report['batch_sizes'] == (1, 3)


@pytest.mark.integration
def test_onnx_static_batch_unfused_and_argument_checks(tmp_path):
    report = export_onnx(
        'cabvit_h_l1', tmp_path / 'static.onnx', img_size=64, batch_size=2, dynamic_batch=False, reparameterize=False)
    assert report['batch_sizes'] == (2,) and report['max_abs_diff'] < 1e-4
    assert not report['reparameterized'] and report['params'] == report['params_before']
    assert onnx.load(tmp_path / 'static.onnx').graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert report['max_rel_diff'] == report['max_abs_diff'] / report['max_abs_output']
    with pytest.raises(ValueError, match='opset'):
        export_onnx('cabvit_h_l1', tmp_path / 'old.onnx', img_size=64, opset=13)
    lowest, highest = onnx_opset_range()
    assert lowest == 17 and highest >= 18
    with pytest.raises(ValueError, match=f'at most {highest}'):  # before exporting anything
        export_onnx('cabvit_h_l1', tmp_path / 'new.onnx', img_size=64, opset=highest + 1)
    assert not (tmp_path / 'new.onnx').exists()
    with pytest.raises(ValueError, match='built for'):
        export_onnx(_model('cabvit_h_l1'), tmp_path / 'other.onnx', img_size=128)


@pytest.mark.integration
def test_onnx_graph_runs_convnext_mlps_as_convolutions(tmp_path):
    """The exported graph has 1x1 convolutions for the ConvNeXt MLPs (ONNX Runtime's NCHWc kernels), and is checked
    against the model as it was."""
    model = _model('cabvit_h_l1')
    converted = convnext_mlps_as_convolutions(copy.deepcopy(model))
    blocks = [m for m in converted.modules() if isinstance(m, ConvNeXtBlock)]
    assert blocks and all(b.use_conv_mlp for b in blocks)
    assert num_params(converted) == num_params(model)
    x = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x))
    path = tmp_path / 'cabvit_h_l1.onnx'
    report = export_onnx(model, path)
    assert report['opset'] == 20 and report['max_abs_diff'] < 1e-4
    # the CabViT blocks' matrix products only (qkv, q k^T, attention v, proj, two MLP layers in each of 8 blocks)
    assert sum(n.op_type == 'MatMul' for n in onnx.load(path).graph.node) == 8 * 6


@pytest.mark.integration
def test_export_check_refuses_vanishing_outputs(tmp_path):
    """A random CabViT-H model's outputs are ~1e-20 at its initial BatchNorm statistics: a check on them says
    nothing. By name without a checkpoint the statistics are calibrated first."""
    model = timm.create_model('cabvit_h_l1', img_size=64).eval()
    with pytest.raises(ExportCheckError, match='calibrate_batchnorm'):
        export_onnx(model, tmp_path / 'random.onnx')
    report = export_torchscript('cabvit_h_l1', img_size=64)
    assert report['max_abs_output'] > 0.1


@pytest.mark.integration
def test_onnx_export_by_name_with_checkpoint(tmp_path):
    """What `timm-cabvit export-onnx cabvit_h_l1 out.onnx --img-size 96 --checkpoint FILE` does."""
    model = _model('cabvit_h_l1')
    torch.save(model.state_dict(), tmp_path / 'weights.pth')
    path = tmp_path / 'cabvit_h_l1.onnx'
    report = export_onnx('cabvit_h_l1', path, img_size=IMG_SIZE, checkpoint=tmp_path / 'weights.pth')
    assert report['img_size'] == (IMG_SIZE, IMG_SIZE) and report['max_abs_diff'] < 1e-4
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    x = _images(2)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(session.run(None, {'input': x.numpy()})[0] - ref).max() < 1e-4


def test_calibrated_batchnorm_gives_a_random_model_outputs_to_compare():
    """At the initial BatchNorm statistics every eval-mode TME shrinks the activations: the outputs of a random
    CabViT-H model vanish, and an export check would compare zeros. Calibrated on random images, they do not."""
    model = timm.create_model('cabvit_h_l1', img_size=64).eval()
    x = _images(2, 64)
    with torch.no_grad():
        assert model(x).abs().max() < 1e-10
        assert calibrate_batchnorm(model, 2, batch_size=4) is model and not model.training
        assert model(x).abs().max() > 0.1
        calibrated = {k: v.clone() for k, v in model.state_dict().items() if 'running' in k}
        momenta = {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
        # given batches instead of a count: the same statistics from the same images
        torch.manual_seed(0)
        batches = [_images(4, 64) for _ in range(2)]
        calibrate_batchnorm(model, batches)
        again = {k: v.clone() for k, v in model.state_dict().items() if 'running' in k}
        calibrate_batchnorm(model, iter(batches))
        calibrate_batchnorm(model, 0)  # no batch: nothing to average, the statistics stay
    assert momenta == {0.1}  # each BatchNorm's momentum is restored
    assert all(torch.allclose(v, model.state_dict()[k]) for k, v in again.items())
    assert any(not torch.allclose(v, calibrated[k]) for k, v in again.items())


def _dynamic_p_l0() -> torch.nn.Module:
    """A dynamic cabvit_p_l0 built at 64 whose tables matter: at another size they are resampled in its forward."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _like_trained(timm.create_model('cabvit_p_l0', img_size=64, dynamic_img_size=True))
    return model.eval()


@pytest.mark.integration
@pytest.mark.parametrize('export', ['onnx', 'torch.export', 'torchscript'])
def test_dynamic_model_exported_at_a_size_not_a_multiple_of_16_equals_it(export, tmp_path):
    """Exported at 36x52 (2x3 patches, the rest dropped), each export gives what the eager dynamic model gives at
    36x52, and its check reports that difference."""
    model = _dynamic_p_l0()
    x = torch.randn(3, 3, 36, 52)
    if export == 'onnx':
        report = export_onnx(model, tmp_path / 'p_l0.onnx', img_size=(36, 52))
        session = onnxruntime.InferenceSession(tmp_path / 'p_l0.onnx', providers=['CPUExecutionProvider'])
        out = torch.from_numpy(session.run(None, {'input': x.numpy()})[0])
    elif export == 'torch.export':
        report = export_program(model, img_size=(36, 52))
        out = report['program'].module()(x)
    else:
        report = export_torchscript(model, img_size=(36, 52))
        out = report['module'](x)
    with torch.no_grad():
        ref = model(x)
    assert report['img_size'] == (36, 52) and model.img_size == (64, 64)
    assert ref.abs().max() > 0.1 and (out - ref).abs().max() < 1e-5 * ref.abs().max()
    assert report['max_rel_diff'] < 1e-5


@pytest.mark.integration
def test_export_check_compares_with_the_model_as_given(tmp_path):
    """A dynamic model is exported at another size from a copy whose tables were resampled once; the check compares
    the export with the model as given, which resamples them in its forward pass. Tables resampled wrongly for the
    export are caught."""
    model = _dynamic_p_l0()
    set_input_size = type(model).set_input_size

    def wrong_set_input_size(self, img_size):
        set_input_size(self, img_size)
        with torch.no_grad():
            self.blocks[0].attn.pos_bias.relative_position_bias_table[0].add_(1.)

    with mock.patch.object(type(model), 'set_input_size', wrong_set_input_size):
        with pytest.raises(ExportCheckError, match='differs from PyTorch'):
            export_program(model, img_size=(36, 52))
        with pytest.raises(ExportCheckError, match='differs from PyTorch'):
            export_onnx(model, tmp_path / 'p_l0.onnx', img_size=(36, 52))


@pytest.mark.integration
def test_onnx_export_of_a_features_only_backbone_at_its_own_size(tmp_path):
    """A backbone built at 64 exports at 64 by default: one graph output per feature map, each with a dynamic
    batch and checked."""
    backbone = calibrate_batchnorm(timm.create_model('cabvit_h_l1', features_only=True, img_size=64), 2)
    path = tmp_path / 'backbone.onnx'
    report = export_onnx(backbone, path)
    assert report['img_size'] == (64, 64) and report['max_abs_diff'] < 1e-4 and report['batch_sizes'] == (1, 3)
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    assert session.get_inputs()[0].shape == ['batch', 3, 64, 64]
    x = _images(2, 64)
    with torch.no_grad():
        ref = backbone(x)
    outs = session.run(None, {'input': x.numpy()})
    assert [o.shape for o in outs] == [tuple(r.shape) for r in ref] == [
        (2, 64, 16, 16), (2, 128, 8, 8), (2, 192, 4, 4), (2, 320, 2, 2)]
    assert all(np.abs(o - r.numpy()).max() < 1e-4 for o, r in zip(outs, ref))


def test_onnx_missing_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)
    with pytest.raises(ImportError, match=r'onnxruntime is not installed: pip install "timm-cabvit\[onnx\]"'):
        require_onnx()
    with pytest.raises(ImportError, match='onnxruntime is not installed'):  # before exporting anything
        export_onnx('cabvit_h_l1', tmp_path / 'm.onnx', img_size=64)
    assert not (tmp_path / 'm.onnx').exists()


@pytest.mark.integration
@pytest.mark.parametrize('model_name', _params(ALL_MODELS, slow=('cabvit_p_l0', *SLOW_MODELS)))
def test_torch_export_round_trip(model_name, tmp_path):
    """Exported with a dynamic batch, saved, loaded (by export_program) and run at batch 1 and 3."""
    model = _model(model_name)
    path = tmp_path / f'{model_name}.pt2'
    report = export_program(model, path=path)
    assert report['path'] == str(path) and report['max_abs_diff'] < 1e-4
    loaded = report['program'].module()
    for batch_size in (1, 3):
        x = _images(batch_size)
        with torch.no_grad():
            ref = model(x)
            assert (loaded(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.integration
@pytest.mark.parametrize('model_name', _params(ALL_MODELS))
def test_torchscript_round_trip(model_name, tmp_path):
    model = _model(model_name)
    path = tmp_path / f'{model_name}.pt'
    report = export_torchscript(model, path=path)
    assert report['path'] == str(path) and report['max_abs_diff'] < 1e-4
    assert isinstance(report['module'], torch.jit.ScriptModule)
    x = _images(3)
    with torch.no_grad():
        ref = model(x)
        assert (report['module'](x) - ref).abs().max() <= 1e-5 * ref.abs().max()


def _set_fused_attn(model: torch.nn.Module, fused: bool) -> None:
    for module in model.modules():
        if hasattr(module, 'fused_attn'):
            module.fused_attn = fused


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('model_name', ALL_MODELS)
def test_reduced_precision_inference_finite(model_name, dtype):
    """Weights and activations in bf16 / fp16 (both attention paths), and autocast, on images x 100."""
    model = _model(model_name, 32)
    x = _images(2, 32, LARGE)
    with torch.no_grad():
        ref = model(x)
        half = reparameterize_model(model).to(dtype)
        for fused in (True, False):
            _set_fused_attn(half, fused)
            out = half(x.to(dtype))
            assert torch.isfinite(out).all()
            assert (out.float() - ref).abs().max() < .05 * ref.abs().max()
        with torch.autocast('cpu', dtype=dtype):
            assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('model_name', _params(ALL_MODELS))
def test_amp_training_steps_finite(model_name, dtype):
    """Autocast training steps on images x 100, fp16 with a GradScaler as timm's train.py --amp: all finite.

    64x64 images in batches of 4: with fewer values per channel (2x2 maps in batches of 2) the training-mode
    BatchNorms of the TME amplify gradients 30-fold. The scaler starts at 2**10: from its default 2**16 it
    would back off over the first, skipped, steps, as it is meant to, and two steps would show nothing.
    """
    model = _like_trained(timm.create_model(model_name, img_size=64, num_classes=10)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler('cpu', init_scale=2. ** 10, enabled=dtype == torch.float16)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        with torch.autocast('cpu', dtype=dtype):
            loss = torch.nn.functional.cross_entropy(model(_images(4, 64, LARGE)), torch.randint(0, 10, (4,)))
        assert torch.isfinite(loss)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))  # not every step skipped
