"""Checkpoints never load silently wrong: tables resampled by grid shape, one rule on every path, clear refusals."""
import argparse
import copy
import os
import re
from pathlib import Path
from unittest import mock

import pytest
import safetensors.torch
import timm
import torch

from timm_cabvit.cabvit import checkpoint_filter_fn
from timm_cabvit.tools import hub
from timm_cabvit.weights import CheckpointError, check_checkpoint_file, checkpoint_metadata

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
    with pytest.raises(RuntimeError, match=re.escape(f'{key}: checkpoint (6, 25), model (6, 16)')) as refused:
        timm.create_model('cabvit_h_l1', img_size=64, checkpoint_path=str(tmp_path / 'odd.pth'))
    assert 'another input size' not in str(refused.value)  # the other tables fit: not a checkpoint of another size


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


def _train_checkpoint(trained: torch.nn.Module, file, **args) -> None:
    """A checkpoint as timm's train.py saves it: the state dict, EMA weights, and its argparse args."""
    defaults = dict(model='cabvit_h_l1', input_size=None, img_size=None, model_kwargs={}, gp=None, in_chans=None)
    state = trained.state_dict()
    torch.save({'epoch': 3, 'arch': defaults['model'], 'args': argparse.Namespace(**dict(defaults, **args)),
                'state_dict': state, 'state_dict_ema': state}, file)


def test_timm_checkpoint_paths_resample_a_checkpoint_of_another_size(tmp_path):
    """timm's checkpoint_path= / load_checkpoint / load_state_dict (validate.py, inference.py, train.py --resume)
    resample tables of a square size as the pretrained path does, instead of raw size mismatches."""
    trained = _randomized('cabvit_h_l1', img_size=64, num_classes=10)
    file = tmp_path / 'model_best.pth.tar'
    _train_checkpoint(trained, file, model_kwargs={'img_size': 64})
    x = torch.randn(1, 3, 96, 96)
    expected = _logits(hub.create_model('cabvit_h_l1', checkpoint=file, img_size=96), x)
    by_path = timm.create_model('cabvit_h_l1', img_size=96, num_classes=10, checkpoint_path=str(file))
    torch.testing.assert_close(_logits(by_path, x), expected, rtol=0, atol=0)
    as_validate_py = timm.create_model('cabvit_h_l1', num_classes=10, **{'img_size': 96})  # --model-kwargs img_size=96
    timm.models.load_checkpoint(as_validate_py, str(file), use_ema=True)  # --checkpoint FILE
    torch.testing.assert_close(_logits(as_validate_py, x), expected, rtol=0, atol=0)
    model = timm.create_model('cabvit_h_l1', img_size=96, num_classes=10)
    model.load_state_dict(trained.state_dict())
    torch.testing.assert_close(_logits(model, x), expected, rtol=0, atol=0)
    as_trained = timm.create_model('cabvit_h_l1', img_size=64, num_classes=10, checkpoint_path=str(file))
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(_logits(as_trained, x), _logits(trained, x), rtol=0, atol=0)


def test_timm_checkpoint_paths_refuse_with_one_error(trained_non_square, tmp_path):
    """Another class count, NaN, or non-square tables of an unrecorded size: one error with the way out, raised
    before any weight is copied."""
    ten = _randomized('cabvit_h_l1', img_size=64, num_classes=10).state_dict()
    model = timm.create_model('cabvit_h_l1', img_size=64)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match=r'classifier has 10 classes, the model 1000: create the model with '
                                           r'num_classes=10') as refused:
        model.load_state_dict(ten)
    assert str(refused.value).count('\n') < 12
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing copied
    nan = dict(before, **{'stages.3.blocks.1.mlp.fc2.weight': torch.full_like(
        before['stages.3.blocks.1.mlp.fc2.weight'], float('nan'))})
    torch.save(nan, tmp_path / 'nan.pth')
    with pytest.raises(RuntimeError, match=r'(?s)NaN or infinite values.*stages\.3\.blocks\.1\.mlp\.fc2\.weight'):
        timm.create_model('cabvit_h_l1', img_size=64, checkpoint_path=str(tmp_path / 'nan.pth'))
    with pytest.raises(RuntimeError, match='NaN or infinite'):
        model.load_state_dict(nan, strict=False)
    trained, _ = trained_non_square
    with pytest.raises(RuntimeError, match=r'bias tables are laid out for another input size.*img_size=\(H, W\)'):
        timm.create_model('cabvit_h_l1', img_size=(80, 80)).load_state_dict(trained.state_dict())


@pytest.mark.parametrize('args, expected', [
    (dict(input_size=[3, *SIZE]), {'img_size': SIZE}),
    (dict(img_size=96), {'img_size': (96, 96)}),
    (dict(model_kwargs={'img_size': SIZE}, input_size=[3, 224, 224]), {'img_size': SIZE}),
    (dict(model_kwargs={'img_size': 96}), {'img_size': (96, 96)}),
    (dict(model_kwargs={'dynamic_img_size': True}, input_size=[3, 96, 96]), {}),
    (dict(gp='max', img_size=64), {'img_size': (64, 64), 'global_pool': 'max'}),
    (dict(model_kwargs={'global_pool': 'avg'}), {'global_pool': 'avg'}),
])
def test_train_args_of_every_form_are_read(args, expected, tmp_path):
    _train_checkpoint(torch.nn.Linear(1, 1), tmp_path / 'c.pth.tar', **args)
    assert checkpoint_metadata(tmp_path / 'c.pth.tar') == {'architecture': 'cabvit_h_l1', **expected}
    as_dict = torch.load(tmp_path / 'c.pth.tar', weights_only=False)
    as_dict['args'] = vars(as_dict['args'])
    assert checkpoint_metadata(as_dict) == {'architecture': 'cabvit_h_l1', **expected}


@pytest.mark.parametrize('model_name, pool', [('cabvit_h_l1', 'max'), ('cabvit_p_l0', 'avg')])
def test_pooling_travels_with_the_checkpoint(model_name, pool, tmp_path):
    trained = _randomized(model_name, img_size=64, num_classes=10, global_pool=pool)
    _train_checkpoint(trained, tmp_path / 'last.pth.tar', model=model_name, gp=pool, model_kwargs={'img_size': 64})
    x = torch.randn(1, 3, 64, 64)
    loaded = hub.create_model(model_name, checkpoint=tmp_path / 'last.pth.tar')
    assert loaded.global_pool == pool
    torch.testing.assert_close(_logits(loaded, x), _logits(trained, x), rtol=0, atol=0)
    out = hub.export_checkpoint(tmp_path / 'last.pth.tar', model_name, tmp_path / 'export')
    exported = timm.create_model(model_name, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(out / 'model.safetensors'), num_classes=10),
                                 **checkpoint_metadata_model_args(out))
    torch.testing.assert_close(_logits(exported, x), _logits(trained, x), rtol=0, atol=0)


def checkpoint_metadata_model_args(folder) -> dict:
    """What timm builds a Hub export with: its config.json's model_args and input size."""
    import json
    config = json.loads((folder / 'config.json').read_text())
    return dict(config.get('model_args', {}), img_size=tuple(config['pretrained_cfg']['input_size'][-2:]))


def test_metadata_only_from_the_checkpoints_own_files(tmp_path):
    """A config.json of another export in the same folder says nothing about a file it was not written with."""
    out = hub.export_checkpoint(timm.create_model('cabvit_p_l0', img_size=64).state_dict(), 'cabvit_p_l0',
                                tmp_path, img_size=64)
    assert checkpoint_metadata(out / 'model.safetensors')['img_size'] == (64, 64)
    (out / 'model.safetensors').rename(tmp_path / 'copied.safetensors')  # the weights alone keep their size
    assert checkpoint_metadata(tmp_path / 'copied.safetensors') == {'img_size': (64, 64)}
    torch.save(timm.create_model('cabvit_p_l0', img_size=32).state_dict(), tmp_path / 'other.pth')
    assert checkpoint_metadata(tmp_path / 'other.pth') == {}
    safetensors.torch.save_file(timm.create_model('cabvit_p_l0', img_size=32).state_dict(),
                                tmp_path / 'other.safetensors')
    assert checkpoint_metadata(tmp_path / 'other.safetensors') == {}


@pytest.mark.parametrize('text, size', [('96X64', (96, 64)), ('96,64', (96, 64)), ('(96, 64)', (96, 64)),
                                        ('96', (96, 96)), ('96x64', (96, 64))])
def test_safetensors_header_size_spellings(text, size, tmp_path):
    safetensors.torch.save_file({'w': torch.zeros(1)}, tmp_path / 'w.safetensors', metadata={'img_size': text})
    assert checkpoint_metadata(tmp_path / 'w.safetensors') == {'img_size': size}


def test_safetensors_header_size_that_is_no_size_is_refused(tmp_path):
    safetensors.torch.save_file({'w': torch.zeros(1)}, tmp_path / 'w.safetensors', metadata={'img_size': 'large'})
    with pytest.raises(CheckpointError, match=r"img_size entry of '.*w\.safetensors'.*header is not an input size"):
        checkpoint_metadata(tmp_path / 'w.safetensors')


def test_refused_pickle_names_the_file_and_the_objects(tmp_path):
    file = tmp_path / 'unsafe.pth'
    torch.save({'state_dict': {}, 'sampler': argparse.ArgumentParser}, file)
    with pytest.raises(CheckpointError, match=rf"'{re.escape(str(file))}' was refused as unsafe.*"
                                              r"argparse\.ArgumentParser.*torch\.save\(torch\.load"):
        hub.create_model('cabvit_h_l1', checkpoint=file)


def test_export_refuses_a_size_the_checkpoint_contradicts(tmp_path):
    trained = timm.create_model('cabvit_h_l1', img_size=64)
    _train_checkpoint(trained, tmp_path / 'c.pth.tar', model_kwargs={'img_size': 64})
    with pytest.raises(CheckpointError, match='records the input size 64x64, not the given 96x96'):
        hub.export_checkpoint(tmp_path / 'c.pth.tar', 'cabvit_h_l1', tmp_path / 'out', img_size=96)
    torch.save(trained.state_dict(), tmp_path / 'bare.pth')
    with pytest.raises(CheckpointError, match=r'not trained at the given input size 96x80 \(they fit 64x64\)'):
        hub.export_checkpoint(tmp_path / 'bare.pth', 'cabvit_h_l1', tmp_path / 'out', img_size=(96, 80))


class _OpenCounter:
    """Counts how often a file is opened, by every way the package, timm, torch and safetensors open files."""

    def __init__(self, path):
        self.path, self.count = Path(path).resolve(), 0

    def _wrap(self, function):
        def counted(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and Path(file).resolve() == self.path:
                self.count += 1
            return function(file, *args, **kwargs)
        return counted

    def __enter__(self):
        import builtins
        import io
        self.patches = [mock.patch.object(builtins, 'open', self._wrap(builtins.open)),
                        mock.patch.object(io, 'open', self._wrap(io.open)),
                        mock.patch.object(torch, 'load', self._wrap(torch.load)),
                        mock.patch.object(safetensors, 'safe_open', self._wrap(safetensors.safe_open)),
                        mock.patch.object(safetensors.torch, 'load_file', self._wrap(safetensors.torch.load_file))]
        for patch in self.patches:
            patch.start()
        return self

    def __exit__(self, *exc):
        for patch in self.patches:
            patch.stop()


def test_a_checkpoint_file_is_opened_once_per_load(tmp_path):
    """hub.create_model and export read a file once: checked, loaded and its metadata taken from the same bytes,
    and the filter does not read it again."""
    trained = timm.create_model('cabvit_p_l0', img_size=32, num_classes=3)
    _train_checkpoint(trained, tmp_path / 'last.pth.tar', model='cabvit_p_l0', model_kwargs={'img_size': 32})
    with _OpenCounter(tmp_path / 'last.pth.tar') as opened:
        hub.create_model('cabvit_p_l0', checkpoint=tmp_path / 'last.pth.tar')
    assert opened.count == 1
    with _OpenCounter(tmp_path / 'last.pth.tar') as opened:
        out = hub.export_checkpoint(tmp_path / 'last.pth.tar', 'cabvit_p_l0', tmp_path / 'export')
    assert opened.count == 1
    with _OpenCounter(out / 'model.safetensors') as opened:
        hub.create_model('cabvit_p_l0', checkpoint=out / 'model.safetensors')
    assert opened.count == 1
    with _OpenCounter(tmp_path / 'last.pth.tar') as opened:  # the counter sees what a second read would do
        checkpoint_metadata(tmp_path / 'last.pth.tar')
    assert opened.count >= 1
