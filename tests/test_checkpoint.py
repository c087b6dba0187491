"""Checkpoints never load silently wrong: tables resampled by grid shape, one rule on every path, clear refusals."""
import argparse
import copy
import re

import pytest
import safetensors.torch
import timm
import torch

from timm_cabvit import hub
from timm_cabvit.cabvit import checkpoint_filter_fn
from timm_cabvit.checkpoint import CheckpointError, check_checkpoint_file, checkpoint_metadata

SIZE = (96, 64)  # non-square: stage-3 grid 6x4, stage-4 grid 3x2
SWAPPED = (64, 96)  # as many tokens, other grids


def _randomized(model_name: str, **kwargs) -> torch.nn.Module:
    model = timm.create_model(model_name, **kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(('attention_biases', 'depth_bias.bias', '.scale', 'gamma')):
                p.normal_()
    return model.eval()


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope='module')
def trained_non_square():
    """A cabvit_h_l1 trained at 96x64, and the same weights resampled by set_input_size to 64x96."""
    model = _randomized('cabvit_h_l1', img_size=SIZE)
    swapped = copy.deepcopy(model)
    swapped.set_input_size(SWAPPED)
    return model, swapped


def test_train_checkpoint_records_its_size_and_tables_follow_the_grid(trained_non_square, tmp_path):
    """A train.py checkpoint saved at 96x64 into a 64x96 model: resampled by grid shape, equal to set_input_size."""
    model, swapped = trained_non_square
    args = argparse.Namespace(model='cabvit_h_l1', input_size=[3, *SIZE], img_size=None)
    file = tmp_path / 'last.pth.tar'
    torch.save({'epoch': 1, 'arch': 'cabvit_h_l1', 'args': args, 'state_dict': model.state_dict()}, file)
    assert checkpoint_metadata(file) == {'architecture': 'cabvit_h_l1', 'img_size': SIZE}
    x = torch.randn(1, 3, *SWAPPED)
    expected = _logits(swapped, x)
    by_overlay = timm.create_model(
        'cabvit_h_l1', img_size=SWAPPED, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)))
    by_hub = hub.create_model('cabvit_h_l1', checkpoint=file, img_size=SWAPPED)
    for loaded in (by_overlay, by_hub):
        torch.testing.assert_close(_logits(loaded, x), expected, rtol=0, atol=0)
    # the same state dict taken as if trained at the model's own size gives other logits: the test can fail
    as_is = timm.create_model('cabvit_h_l1', img_size=SWAPPED)
    as_is.load_state_dict(model.state_dict())
    assert not torch.allclose(_logits(as_is, x), expected, atol=1e-3)


def test_exported_folder_records_its_size(trained_non_square, tmp_path):
    model, swapped = trained_non_square
    torch.save(model.state_dict(), tmp_path / 'weights.pth')
    out = hub.export_checkpoint(tmp_path / 'weights.pth', 'cabvit_h_l1', tmp_path / 'out', img_size=SIZE)
    assert checkpoint_metadata(out / 'model.safetensors')['img_size'] == SIZE
    x = torch.randn(1, 3, *SWAPPED)
    loaded = timm.create_model('cabvit_h_l1', img_size=SWAPPED, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(out / 'model.safetensors')))
    torch.testing.assert_close(_logits(loaded, x), _logits(swapped, x), rtol=0, atol=0)


def test_unrecorded_non_square_size_warns(trained_non_square, tmp_path):
    """A bare state dict cannot tell 96x64 from 64x96: loading it into a non-square model says so."""
    model, swapped = trained_non_square
    torch.save(model.state_dict(), tmp_path / 'bare.pth')
    with pytest.warns(UserWarning, match=r'does not record the input size.*input_size=\(3, H, W\)'):
        timm.create_model('cabvit_h_l1', img_size=SWAPPED, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'bare.pth')))
    told = timm.create_model('cabvit_h_l1', img_size=SWAPPED, pretrained=True, pretrained_cfg_overlay=dict(
        file=str(tmp_path / 'bare.pth'), input_size=(3, *SIZE)))
    x = torch.randn(1, 3, *SWAPPED)
    torch.testing.assert_close(_logits(told, x), _logits(swapped, x), rtol=0, atol=0)


def test_one_rule_for_a_table_of_another_length(tmp_path):
    """One table of another length is no checkpoint of this model: refused by the pretrained and checkpoint_path
    paths alike, never resampled alone."""
    state_dict = timm.create_model('cabvit_h_l1', img_size=64).state_dict()
    key = 'stages.2.blocks.0.attn.pos_bias.attention_biases'
    state_dict[key] = torch.zeros(6, 25)
    torch.save(state_dict, tmp_path / 'odd.pth')
    with pytest.raises(ValueError, match=re.escape(f'{key}: checkpoint (6, 25), model (6, 16)')):
        timm.create_model('cabvit_h_l1', img_size=64, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'odd.pth')))
    with pytest.raises(RuntimeError, match='size mismatch'):
        timm.create_model('cabvit_h_l1', img_size=64, checkpoint_path=str(tmp_path / 'odd.pth'))


@pytest.mark.parametrize('corrupt, message', [
    (lambda v: v.fill_(float('nan')), 'NaN or infinite values'),
    (lambda v: v.to(torch.int64), 'integer where the model has floating point'),
])
def test_non_finite_and_integer_values_are_refused(corrupt, message):
    model = timm.create_model('cabvit_h_l1', img_size=64)
    state_dict = model.state_dict()
    state_dict['stages.3.blocks.1.mlp.fc2.weight'] = corrupt(state_dict['stages.3.blocks.1.mlp.fc2.weight'].clone())
    with pytest.raises(ValueError, match=rf'(?s){message}.*stages\.3\.blocks\.1\.mlp\.fc2\.weight'):
        checkpoint_filter_fn(state_dict, model)


def test_trained_head_is_kept_or_its_loss_announced(tmp_path):
    model = _randomized('cabvit_h_l1', img_size=64, num_classes=10)
    torch.save(model.state_dict(), tmp_path / 'ten.pth')
    x = torch.randn(1, 3, 64, 64)
    for kwargs in ({}, {'num_classes': 10}):
        loaded = hub.create_model('cabvit_h_l1', checkpoint=tmp_path / 'ten.pth', **kwargs)
        assert loaded.num_classes == 10 and loaded.img_size == (64, 64)
        torch.testing.assert_close(_logits(loaded, x), _logits(model, x), rtol=0, atol=0)
    with pytest.warns(UserWarning, match=r"classifier 'head.fc' \(10 classes\) is not loaded: the model has 5"):
        hub.create_model('cabvit_h_l1', checkpoint=tmp_path / 'ten.pth', num_classes=5)
    with pytest.warns(UserWarning, match=r'timm drops it.*pretrained_cfg_overlay=dict\(num_classes=10'):
        timm.create_model('cabvit_h_l1', img_size=64, num_classes=10, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'ten.pth')))


@pytest.mark.parametrize('content', [b'epoch,loss\n1,0.5\n', bytes(range(256)) * 4])
def test_text_or_random_bytes_are_not_a_checkpoint(content, tmp_path):
    file = tmp_path / 'weights.pth'
    file.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"'{re.escape(str(file))}' is not a PyTorch or safetensors checkpoint"):
        check_checkpoint_file(file)
    with pytest.raises(CheckpointError, match='is not a PyTorch or safetensors checkpoint'):
        hub.create_model('cabvit_h_l1', checkpoint=file)


def test_safetensors_header_records_size(tmp_path):
    model = timm.create_model('cabvit_p_l0', img_size=64)
    safetensors.torch.save_file(model.state_dict(), tmp_path / 'w.safetensors', metadata={'img_size': '64x48'})
    assert checkpoint_metadata(tmp_path / 'w.safetensors') == {'img_size': (64, 48)}
