""" Pretrained weights: checkpoint layouts, export to the Hub layout, and loading through a Hub on loopback

The Hub is a small HTTP server on 127.0.0.1 speaking the part of the Hub file API that `huggingface_hub` uses to
download a model repo file (HEAD and GET /{repo_id}/resolve/{revision}/{filename}, with the X-Repo-Commit, ETag
and X-Error-Code headers it checks). huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when it is
imported, so the tests set both the variables and `huggingface_hub.constants`; one test loads in a fresh Python
process configured by the variables alone.
"""
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional
from urllib.parse import unquote, urlsplit

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import constants

from timm_cabvit.cabvit import checkpoint_filter_fn
from timm_cabvit.layers import resize_token_grid
from timm_cabvit.tools import hub

REFERENCE_DIR = Path(__file__).resolve().parent / 'data' / 'reference'  # the authors' checkpoint layouts
REPO_ID = 'local-org/cabvit_h_l1.test'
COMMIT = hashlib.sha1(b'cabvit').hexdigest()


class LoopbackHub:
    """Model repos served on 127.0.0.1 as the Hub serves /{repo_id}/resolve/{revision}/{filename}."""

    def __init__(self):
        self.repos: Dict[str, Dict[str, bytes]] = {}
        self.requests: List[str] = []
        hub_ = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                hub_.serve(self, body=False)

            def do_GET(self):
                hub_.serve(self, body=True)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.server.server_address[1]}'
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add_folder(self, repo_id: str, folder: Path, replace: Optional[Dict[str, bytes]] = None) -> None:
        self.repos[repo_id] = dict({p.name: p.read_bytes() for p in folder.iterdir()}, **(replace or {}))

    def serve(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append(f'{handler.command} {handler.path}')
        parts = urlsplit(handler.path).path.lstrip('/').split('/')
        if len(parts) < 5 or parts[2] != 'resolve':
            return self.reply(handler, 404, {'X-Error-Code': 'EntryNotFound'})
        repo_id, revision, filename = '/'.join(parts[:2]), unquote(parts[3]), unquote('/'.join(parts[4:]))
        files = self.repos.get(repo_id)
        if files is None:  # what the Hub answers for a missing repo to a caller without a token
            return self.reply(handler, 401, {'X-Error-Code': 'RepoNotFound', 'X-Error-Message': 'Repository not found'})
        if revision not in ('main', COMMIT):
            return self.reply(handler, 404, {'X-Error-Code': 'RevisionNotFound'})
        data = files.get(filename)
        if data is None:
            return self.reply(handler, 404, {'X-Error-Code': 'EntryNotFound', 'X-Repo-Commit': COMMIT})
        headers = {
            'X-Repo-Commit': COMMIT,
            'ETag': f'"{hashlib.sha256(data).hexdigest()}"',
            'Content-Type': 'application/octet-stream',
            'Accept-Ranges': 'bytes',
        }
        self.reply(handler, 200, headers, data, body)

    @staticmethod
    def reply(handler, status: int, headers: Dict[str, str], data: bytes = b'', body: bool = True) -> None:
        handler.send_response(status)
        for k, v in headers.items():
            handler.send_header(k, v)
        handler.send_header('Content-Length', str(len(data)))
        handler.end_headers()
        if body and data:
            handler.wfile.write(data)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope='module')
def loopback_hub():
    server = LoopbackHub()
    yield server
    server.close()


@pytest.fixture
def hf_env(loopback_hub, tmp_path, monkeypatch):
    """huggingface_hub on the loopback Hub with an empty cache, as HF_ENDPOINT and HF_HOME would set it up."""
    hf_home = tmp_path / 'hf_home'
    settings = dict(
        ENDPOINT=loopback_hub.url,
        HUGGINGFACE_CO_URL_TEMPLATE=loopback_hub.url + '/{repo_id}/resolve/{revision}/{filename}',
        HF_HOME=str(hf_home),
        HF_HUB_CACHE=str(hf_home / 'hub'),
        HF_TOKEN_PATH=str(hf_home / 'token'),
        HF_STORED_TOKENS_PATH=str(hf_home / 'stored_tokens'),
        HF_HUB_OFFLINE=False,
    )
    for name, value in settings.items():
        monkeypatch.setattr(constants, name, value)
    for name, value in dict(HF_ENDPOINT=loopback_hub.url, HF_HOME=str(hf_home), HF_HUB_OFFLINE='0',
                            HF_HUB_DISABLE_TELEMETRY='1', NO_PROXY='127.0.0.1,localhost').items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv('HF_HUB_CACHE', raising=False)
    monkeypatch.delenv('HF_TOKEN', raising=False)
    return hf_home


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights where every mapping mistake shows: layer scales near 1, signed digest scales, non-zero biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if not p.is_floating_point():
                continue
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith('running_var'):
                p.copy_(noise.abs() * 0.5 + 0.5)
            elif name.endswith(('gamma', '.scale', 'attention_biases', 'depth_bias.bias')):
                p.copy_(noise * 0.5)
            else:
                p.add_(noise * 0.05)
    return model.eval()


@pytest.fixture(scope='module')
def trained():
    """A cabvit_h_l1 with random weights standing in for a trained one, and its logits on a fixed input."""
    model = _randomize(timm.create_model('cabvit_h_l1'))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
    return model, x, logits


@pytest.fixture(scope='module')
def exported(trained, tmp_path_factory):
    """The trained model saved as a timm train.py checkpoint and exported with `export_checkpoint`."""
    model, _, _ = trained
    tmp = tmp_path_factory.mktemp('export')
    state_dict = model.state_dict()
    torch.save(
        {'epoch': 3, 'state_dict': {f'module.{k}': torch.zeros_like(v) for k, v in state_dict.items()},
         'state_dict_ema': {f'module.{k}': v for k, v in state_dict.items()}},
        tmp / 'checkpoint.pth.tar')
    out = hub.export_checkpoint(
        tmp / 'checkpoint.pth.tar', 'cabvit_h_l1.in1k', tmp / 'out', metrics={'top1': 80.3, 'top5': 95.1})
    return out


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# Reference layout: the inverse of checkpoint_filter_fn's conversion, written from the reference key names.
_TO_REFERENCE = [
    (r'^stem\.(\d)\.conv\.', lambda m: f'patch_embed.seq.{2 * int(m[1])}.c.'),
    (r'^stem\.(\d)\.bn\.', lambda m: f'patch_embed.seq.{2 * int(m[1])}.bn.'),
    (r'^stages\.(\d)\.downsample\.(conv\d)\.conv\.', lambda m: f'layer_{int(m[1]) - 1}.downsample.{m[2]}.c.'),
    (r'^stages\.(\d)\.downsample\.(conv\d)\.bn\.', lambda m: f'layer_{int(m[1]) - 1}.downsample.{m[2]}.bn.'),
    (r'^stages\.(\d)\.blocks\.', lambda m: f'layer_{m[1]}.blocks.'),
    (r'\.conv_dw\.', '.dwconv.'),
    (r'\.ls1\.gamma$', '.gamma_1'),
    (r'\.ls2\.gamma$', '.gamma_2'),
    (r'\.attn\.pos_bias\.attention_biases$', '.attention_biases'),
    (r'\.attn\.depth_bias\.bias$', '.s_token_bias'),
    (r'\.digest_calib\.scale$', '.s_scale_factors'),
    (r'\.digest_calib\.norm\.', '.s_norm.'),
    (r'\.attn\.(qkv|proj)\.', r'.\1.'),
    (r'\.tme\.merge\.', '.dw_conv.'),
    (r'\.tme\.enhance\.conv\.', '.local_conv.c.'),
    (r'\.tme\.enhance\.bn\.', '.local_conv.bn.'),
    (r'\.mlp\.pre_norm\.', '.mlp.norm.'),
    (r'^head\.norm\.', 'norm_head.'),
    (r'^head\.fc\.', 'head.'),
]


def to_reference(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Our model's weights in the reference layout, digest tables in its key order (oldest block first)."""
    out = {}
    for k, v in model.state_dict().items():
        ref = k
        for pattern, repl in _TO_REFERENCE:
            ref = re.sub(pattern, repl, ref)
        if ref.startswith(('layer_0.', 'layer_1.')):
            ref = ref.replace('.mlp.fc1.', '.pwconv1.').replace('.mlp.fc2.', '.pwconv2.')
        if k.endswith('depth_bias.bias'):
            v = v.flip(1).reshape(1, v.shape[0], 1, -1)  # key order, oldest block first, as the reference adds them
        elif k.endswith('digest_calib.scale'):
            v = v.reshape(1, -1, 1)
        out[ref] = v.clone()
    return out


def _reference_layout(name: str) -> Dict[str, List[int]]:
    return json.loads((REFERENCE_DIR / f'{name}_state_dict_layout.json').read_text())['state_dict']


@pytest.mark.parametrize('name', ['cabvit_h_l1', 'cabvit_h_l2', 'cabvit_h_l3'])
def test_reference_layout_loads_completely(name):
    layout = _reference_layout(name)
    state_dict = {k: torch.ones(shape) for k, shape in layout.items()}
    model = timm.create_model(name, device='meta')
    converted = checkpoint_filter_fn(state_dict, model)
    result = model.load_state_dict(converted, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert sum(v.numel() for v in converted.values()) == sum(v.numel() for v in state_dict.values())


def test_reference_weights_give_our_logits(trained):
    model, x, logits = trained
    reference = to_reference(model)
    layout = _reference_layout('cabvit_h_l1')
    assert {k: list(v.shape) for k, v in reference.items()} == layout
    # the key-order depth bias is not our table reshaped: the conversion has to flip the relative depths
    naive = model.stages[2].blocks[3].attn.depth_bias.bias.reshape(1, 6, 1, -1)
    assert not torch.equal(reference['layer_2.blocks.3.s_token_bias'], naive)

    converted = checkpoint_filter_fn(reference, model)
    for k, v in model.state_dict().items():
        assert torch.equal(converted[k], v), k
    loaded = timm.create_model('cabvit_h_l1', pretrained=True, pretrained_cfg_overlay=dict(state_dict=reference))
    assert torch.equal(_logits(loaded, x), logits)
    by_load_state_dict = timm.create_model('cabvit_h_l1')  # timm's checkpoint_path= and load_checkpoint
    by_load_state_dict.load_state_dict(reference)
    assert torch.equal(_logits(by_load_state_dict, x), logits)


def test_train_checkpoint_wrappers_and_prefixes(trained):
    model, _, _ = trained
    state_dict = model.state_dict()
    compiled = {'model': {f'_orig_mod.module.{k}': v for k, v in state_dict.items()}, 'optimizer': {}}
    with_ema = {'state_dict': {k: torch.zeros_like(v) for k, v in state_dict.items()}, 'state_dict_ema': state_dict}
    for checkpoint in (compiled, with_ema, {'state_dict': {f'module.{k}': v for k, v in state_dict.items()}}):
        converted = checkpoint_filter_fn(checkpoint, model)
        assert converted.keys() == state_dict.keys()
        assert all(torch.equal(converted[k], v) for k, v in state_dict.items())


def test_export_layout_and_bit_exact_round_trip(trained, exported):
    model, x, logits = trained
    assert sorted(p.name for p in exported.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((exported / 'config.json').read_text())
    assert config['architecture'] == 'cabvit_h_l1' and config['num_classes'] == 1000
    assert config['pretrained_cfg']['tag'] == 'in1k' and config['pretrained_cfg']['input_size'] == [3, 224, 224]
    assert config['pretrained_cfg']['license'] == 'apache-2.0' and 'hf_hub_id' not in config['pretrained_cfg']
    readme = (exported / 'README.md').read_text()
    assert '| top1 | 80.3 |' in readme and '| top5 | 95.1 |' in readme and 'arXiv:2211.07198' in readme
    # the EMA weights were exported, bit for bit
    weights = safetensors.torch.load_file(exported / 'model.safetensors')
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    loaded = timm.create_model('cabvit_h_l1', pretrained=True, pretrained_cfg_overlay=dict(
        file=str(exported / 'model.safetensors')))
    assert torch.equal(_logits(loaded, x), logits)


@pytest.mark.integration
def test_hub_download_cache_and_offline(trained, exported, loopback_hub, hf_env, monkeypatch):
    _, x, logits = trained
    loopback_hub.add_folder(REPO_ID, exported)
    by_name = timm.create_model(f'hf-hub:{REPO_ID}', pretrained=True)
    assert torch.equal(_logits(by_name, x), logits)
    by_cfg = timm.create_model('cabvit_h_l1', pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=REPO_ID))
    assert torch.equal(_logits(by_cfg, x), logits)
    cached = hf_env / 'hub' / f"models--{REPO_ID.replace('/', '--')}" / 'snapshots' / COMMIT
    assert {p.name for p in cached.iterdir()} == {'config.json', 'model.safetensors'}

    # second load: offline, and the Hub unreachable
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    served = len(loopback_hub.requests)
    assert torch.equal(_logits(timm.create_model(f'hf-hub:{REPO_ID}', pretrained=True), x), logits)
    assert torch.equal(_logits(timm.create_model(
        'cabvit_h_l1', pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=REPO_ID)), x), logits)
    assert len(loopback_hub.requests) == served

    # and in a fresh process that knows the cache only from HF_HOME and HF_HUB_OFFLINE=1
    torch.save(x, hf_env / 'x.pt')
    script = (
        'import sys, torch, timm, timm_cabvit\n'
        f"model = timm.create_model('hf-hub:{REPO_ID}', pretrained=True).eval()\n"
        'with torch.no_grad():\n'
        "    torch.save(model(torch.load(sys.argv[1])), sys.argv[2])\n")
    env = dict(os.environ, HF_HOME=str(hf_env), HF_HUB_OFFLINE='1', HF_ENDPOINT='http://127.0.0.1:9')
    done = subprocess.run(
        [sys.executable, '-c', script, str(hf_env / 'x.pt'), str(hf_env / 'y.pt')],
        env=env, timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert torch.equal(torch.load(hf_env / 'y.pt'), logits)


def test_weights_not_published(hf_env, loopback_hub):
    """No weights are published: nothing is listed, and pretrained=True says so at once, without a request."""
    assert timm.list_pretrained('cabvit*') == []
    served = len(loopback_hub.requests)
    for create in (timm.create_model, hub.create_model):
        with pytest.raises(RuntimeError) as e:
            create('cabvit_h_l1', pretrained=True)
        message = str(e.value)
        assert 'No pretrained weights are published for cabvit_h_l1' in message
        assert "pretrained_cfg_overlay=dict(file='/path/to/weights')" in message and 'TIMM_CABVIT_HUB_ORG' in message
    assert len(loopback_hub.requests) == served


@pytest.mark.integration
def test_organisation_weights_load_with_pretrained_true(trained, exported, loopback_hub, hf_env):
    """TIMM_CABVIT_HUB_ORG=ORG makes pretrained=True (and so train.py --pretrained) load ORG/<model>.<tag>."""
    _, x, logits = trained
    loopback_hub.add_folder('my-org/cabvit_h_l1.in1k', exported)
    torch.save(x, hf_env.parent / 'x.pt')
    script = (
        'import sys, torch, timm\n'
        "assert timm.list_pretrained('cabvit*') == ['cabvit_h_l1.in1k', 'cabvit_h_l2.in1k', 'cabvit_h_l3.in1k', "
        "'cabvit_p_l0.in1k'], timm.list_pretrained('cabvit*')\n"
        "model = timm.create_model('cabvit_h_l1', pretrained=True).eval()\n"
        'with torch.no_grad():\n'
        '    torch.save(model(torch.load(sys.argv[1])), sys.argv[2])\n')
    env = dict(os.environ, TIMM_CABVIT_HUB_ORG='my-org')
    done = subprocess.run([sys.executable, '-c', script, str(hf_env.parent / 'x.pt'), str(hf_env.parent / 'y.pt')],
                          env=env, timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert torch.equal(torch.load(hf_env.parent / 'y.pt'), logits)
    assert any('/my-org/cabvit_h_l1.in1k/resolve/' in r for r in loopback_hub.requests)


def test_no_network_and_no_cache(hf_env, monkeypatch):
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(hub.CheckpointError, match=r"(?s)Could not download .*'local-org/absent'.*not in the cache.*"
                                                  r"HF_HUB_OFFLINE is set.*pretrained_cfg_overlay=dict\(file="):
        hub.create_model('hf-hub:local-org/absent', pretrained=True)


def test_corrupt_files(exported, loopback_hub, hf_env, tmp_path):
    weights = (exported / 'model.safetensors').read_bytes()
    truncated = tmp_path / 'truncated.safetensors'
    truncated.write_bytes(weights[:len(weights) // 2])
    with pytest.raises(hub.CheckpointError, match=f"'{re.escape(str(truncated))}' is truncated or corrupt"):
        hub.create_model('cabvit_h_l1', checkpoint=truncated)
    with pytest.raises(hub.CheckpointError, match='truncated or corrupt'):
        hub.export_checkpoint(truncated, 'cabvit_h_l1', tmp_path / 'out')
    broken_zip = tmp_path / 'broken.pth'
    torch.save({'w': torch.ones(1000)}, broken_zip)
    broken_zip.write_bytes(broken_zip.read_bytes()[:-200])
    with pytest.raises(hub.CheckpointError, match='broken.pth.* is truncated or corrupt: its zip archive'):
        hub.create_model('cabvit_h_l1', checkpoint=broken_zip)

    loopback_hub.add_folder('local-org/broken', exported, {'model.safetensors': weights[:-1000]})
    with pytest.raises(hub.CheckpointError, match=r"(?s)cached download of Hugging Face Hub repo 'local-org/broken'"
                                                  r".*truncated or corrupt.*models--local-org--broken"):
        hub.create_model('hf-hub:local-org/broken', pretrained=True)


def test_checkpoint_of_another_model_lists_keys_and_shapes(trained):
    model, _, _ = trained
    other = {k: torch.zeros(shape) for k, shape in _reference_layout('cabvit_h_l2').items()}
    with pytest.raises(ValueError) as e:
        timm.create_model(
            'cabvit_h_l1', pretrained=True, device='meta', pretrained_cfg_overlay=dict(state_dict=other))
    message = str(e.value)
    assert 'does not fit cabvit_h_l1' in message and 'pretrained_cfg state_dict' in message
    assert 'stem.0.conv.weight: checkpoint (48, 3, 3, 3), model (32, 3, 3, 3)' in message
    assert 'not in the model (28)' in message and 'stages.2.blocks.6.ls1.gamma' in message

    # never partial: timm turns strict loading off for a new classifier, a missing block still fails
    partial = {k: v for k, v in model.state_dict().items() if not k.startswith('stages.3.blocks.1.')}
    with pytest.raises(ValueError, match=r'missing from the checkpoint \(\d+\):\n    stages\.3\.blocks\.1\.'):
        timm.create_model('cabvit_h_l1', pretrained=True, num_classes=10, device='meta',
                          pretrained_cfg_overlay=dict(state_dict=partial))


def test_unknown_tag_and_model():
    with pytest.raises(hub.CheckpointError, match=r"Unknown pretrained tag 'in22k' for cabvit_h_l2; its tags are "
                                                  r"cabvit_h_l2\.in1k"):
        hub.create_model('cabvit_h_l2.in22k', pretrained=True)
    with pytest.raises(hub.CheckpointError, match="Unknown model 'cabvit_h_l9'"):
        hub.export_checkpoint({}, 'cabvit_h_l9', 'unused')


def test_other_size_classes_and_channels(trained, exported):
    model, _, _ = trained
    file = str(exported / 'model.safetensors')
    big = timm.create_model('cabvit_h_l1', pretrained=True, img_size=384, pretrained_cfg_overlay=dict(file=file))
    table = model.stages[2].blocks[0].attn.pos_bias.attention_biases
    assert torch.equal(big.stages[2].blocks[0].attn.pos_bias.attention_biases,
                       resize_token_grid(table, (14, 14), (24, 24)))
    assert big.stages[2].blocks[4].attn.depth_bias.bias.shape == (6, 4, 36)
    out = _logits(big, torch.randn(1, 3, 384, 384))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()

    adapted = timm.create_model(
        'cabvit_h_l1', pretrained=True, in_chans=1, num_classes=10, pretrained_cfg_overlay=dict(file=file))
    assert torch.allclose(adapted.stem[0].conv.weight, model.stem[0].conv.weight.sum(1, keepdim=True))
    assert adapted.head.fc.weight.shape == (10, 320)
    assert torch.equal(adapted.stages[3].blocks[1].mlp.fc2.weight, model.stages[3].blocks[1].mlp.fc2.weight)


def test_push_uploads_export_folder(exported, tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def __init__(self, **kwargs):
            calls.append(('init', kwargs))

        def create_repo(self, repo_id, **kwargs):
            calls.append(('create_repo', repo_id, kwargs))
            return type('RepoUrl', (), {'repo_id': repo_id})()

        def upload_folder(self, **kwargs):
            calls.append(('upload_folder', kwargs))
            return type('CommitInfo', (), {'pr_url': None, 'commit_url': 'http://hub/commit/1'})()

    monkeypatch.setattr(hub, 'HfApi', FakeApi)
    assert hub.push(exported, 'my-org/cabvit_h_l1.in1k', token='t') == 'http://hub/commit/1'
    assert calls[1] == ('create_repo', 'my-org/cabvit_h_l1.in1k', {'private': False, 'exist_ok': True})
    assert calls[2][1]['repo_id'] == 'my-org/cabvit_h_l1.in1k' and calls[2][1]['folder_path'] == exported
    with pytest.raises(hub.CheckpointError, match='has no config.json: write the folder with `timm-cabvit export`'):
        hub.push(tmp_path, 'my-org/x')
    assert hub.parse_metrics(['top1=80.3', 'note=ema']) == {'top1': 80.3, 'note': 'ema'}


def test_card_claims_only_the_dataset_it_is_given(exported, tmp_path):
    """A 10-class model's card names no ImageNet; a dataset the user gives is named; a tag the user gives
    ('cabvit_h_l1.in1k', 1000 classes) names its dataset."""
    assert 'ImageNet-1k' in (exported / 'README.md').read_text()
    ten = timm.create_model('cabvit_p_l0', img_size=32, num_classes=10).state_dict()
    for model_name in ('cabvit_p_l0', 'cabvit_p_l0.in1k'):
        card = (hub.export_checkpoint(ten, model_name, tmp_path / model_name, img_size=32) / 'README.md').read_text()
        assert 'ImageNet' not in card and 'Dataset' not in card and 'datasets:' not in card
    named = hub.export_checkpoint(ten, 'cabvit_p_l0', tmp_path / 'named', img_size=32, dataset='Oxford Flowers-102')
    card = (named / 'README.md').read_text()
    assert '- **Dataset:** Oxford Flowers-102' in card and 'datasets:\n- oxford flowers-102' in card


@pytest.mark.integration
@pytest.mark.parametrize('org, offline, message', [
    ('not an/org', '0', r"TIMM_CABVIT_HUB_ORG='not an/org' is not a Hugging Face organisation or user name"),
    ('my-org', '1', r"(?s)Could not load the weights of cabvit_h_l1 from Hugging Face Hub repo "
                    r"'my-org/cabvit_h_l1.in1k' \(named by TIMM_CABVIT_HUB_ORG=my-org\): HF_HUB_OFFLINE is set"),
])
def test_organisation_errors_name_the_variable(org, offline, message, hf_env):
    """A bad TIMM_CABVIT_HUB_ORG, or its repo out of reach, is said in terms of the variable and the repo."""
    script = ('import timm\n'
              'try:\n'
              "    timm.create_model('cabvit_h_l1', pretrained=True)\n"
              'except RuntimeError as e:\n'
              '    print(e)\n')
    env = dict(os.environ, TIMM_CABVIT_HUB_ORG=org, HF_HUB_OFFLINE=offline)
    done = subprocess.run([sys.executable, '-c', script], env=env, timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert re.search(message, done.stdout), done.stdout
