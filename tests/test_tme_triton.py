""" The fused Triton TME against the PyTorch TME, its reference

Without a GPU the kernels run on CPU tensors under Triton's interpreter. Triton decides whether a kernel is
interpreted when it defines it, so this module imports `timm_cabvit.tme_triton` with TRITON_INTERPRET=1 set for that
import only, through `timm_cabvit.import_tme_triton` (models import it lazily, on the first fused forward). With a
GPU the compiled kernels run on it.
"""
import copy
import importlib
import importlib.util
import math
import os
import subprocess
import sys
from typing import Optional, Tuple
from unittest import mock

import pytest
import timm
import torch

from timm_cabvit import import_tme_triton
from timm_cabvit import tme as tme_module
from timm_cabvit.tme import TokenMergeEnhance

HAS_TRITON = importlib.util.find_spec('triton') is not None
DEVICE = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
RTOL = 1e-5  # fp32, relative to the largest magnitude of the reference

requires_triton = pytest.mark.skipif(not HAS_TRITON, reason='Triton is not installed, there is no fused TME path')


@pytest.fixture(scope='module')
def tme_triton():
    if not HAS_TRITON:
        pytest.skip('Triton is not installed, there is no fused TME path')
    module = import_tme_triton()
    if DEVICE.type == 'cpu' and not module.INTERPRETED:
        pytest.skip('timm_cabvit.tme_triton was imported before this module without TRITON_INTERPRET=1, so its '
                    'kernels are compiled for a GPU and this machine has none')
    return module


@pytest.fixture(autouse=True)
def _no_tf32():
    """cuDNN may run fp32 convolutions in TF32 on a GPU, which is not the reference to 1e-5."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = previous


def _in_nan_storage(t: torch.Tensor, pad: int = 4096) -> torch.Tensor:
    """The same values, in the middle of a NaN-filled storage: a read outside the tensor shows up as NaN."""
    buf = torch.full((t.numel() + 2 * pad,), float('nan'), dtype=t.dtype, device=t.device)
    view = buf[pad:pad + t.numel()].view(t.shape)
    view.copy_(t)
    return view


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _make_tme(dim: int, prefix: int, merge: bool = True, dtype=torch.float32):
    torch.manual_seed(0)
    tme = TokenMergeEnhance(dim, merge=merge, num_prefix_tokens=prefix).to(DEVICE, dtype)
    bn = tme.enhance.bn
    with torch.no_grad():
        for conv in (tme.merge, tme.enhance.conv):
            if conv is not None:
                conv.weight.normal_(0, 0.2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.)
    return tme


def _run(
        tme: TokenMergeEnhance, x: torch.Tensor, grid: Tuple[int, int], dz: torch.Tensor, dd: Optional[torch.Tensor],
):
    """Forward and backward of a TME copy; returns its outputs, the gradients and the BN buffers."""
    x = x.detach().clone().requires_grad_()
    z, digest = tme(x, grid)
    torch.autograd.backward([z] + ([digest] if dd is not None else []), [dz] + ([dd] if dd is not None else []))
    grads = {'x': x.grad, 'enhance': tme.enhance.conv.weight.grad,
             'bn_weight': tme.enhance.bn.weight.grad, 'bn_bias': tme.enhance.bn.bias.grad}
    if tme.merge is not None:
        grads['merge'] = tme.merge.weight.grad
    bn = tme.enhance.bn
    buffers = {'running_mean': bn.running_mean, 'running_var': bn.running_var,
               'num_batches_tracked': bn.num_batches_tracked}
    return z, digest, grads, buffers


def _compare(tme: TokenMergeEnhance, x: torch.Tensor, grid: Tuple[int, int], train: bool, rtol: float = RTOL):
    """Fused and PyTorch path from the same state: outputs, all gradients and the BN buffers after one step."""
    tme.train(train)
    fused, ref = copy.deepcopy(tme), copy.deepcopy(tme)
    fused.set_impl('triton')
    ref.set_impl('torch')
    num_digest = math.ceil(grid[0] / 4) * math.ceil(grid[1] / 4)
    dz = torch.randn_like(x)
    dd = torch.randn(x.shape[0], num_digest, x.shape[2], device=x.device) if tme.merge is not None else None
    z_ref, d_ref, g_ref, b_ref = _run(ref, x, grid, dz, dd)
    dd_fused = _in_nan_storage(dd) if dd is not None else None
    z, d, g, b = _run(fused, _in_nan_storage(x), grid, _in_nan_storage(dz), dd_fused)
    assert _rel_err(z, z_ref) < rtol
    assert (d is None) == (d_ref is None)
    if d is not None:
        assert d.shape == d_ref.shape
        assert _rel_err(d, d_ref) < rtol
    for name in g_ref:
        assert g[name] is not None and g[name].shape == g_ref[name].shape, name
        assert _rel_err(g[name], g_ref[name]) < rtol, name
    for name in b_ref:
        assert torch.allclose(b[name].double(), b_ref[name].double(), rtol=rtol, atol=rtol), name


@pytest.mark.integration
def test_impl_from_env_and_module_setting(monkeypatch):
    script = 'import timm_cabvit.tme as t; print(t.get_tme_impl())'
    done = subprocess.run([sys.executable, '-c', script], env=dict(os.environ, TIMM_CABVIT_TME='torch'),
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == 'torch', done.stderr
    for value, impl in (('triton', 'triton'), ('', 'auto')):
        monkeypatch.setenv('TIMM_CABVIT_TME', value)
        with mock.patch.object(tme_module, 'HAS_TRITON', True):
            assert tme_module._impl_from_environment() == impl
    tme = TokenMergeEnhance(8)
    assert tme.tme_impl is None  # follows the module-level setting
    try:
        with mock.patch.object(tme_module, 'HAS_TRITON', True):
            tme_module.set_tme_impl('triton')
        assert tme_module.get_tme_impl() == 'triton' and tme._use_triton(torch.zeros(1, 16, 8))
        with pytest.raises(ValueError, match="'auto', 'triton' or 'torch', got 'fused'"):
            tme_module.set_tme_impl('fused')
        with pytest.raises(ValueError, match="pass the model"):
            tme_module.set_tme_impl(None)
        assert tme_module.get_tme_impl() == 'triton'  # a refused setting changes nothing
    finally:
        tme_module.set_tme_impl('auto')


@pytest.mark.parametrize('value, message', [
    ('fused', r"TIMM_CABVIT_TME='fused' is ignored, the TME implementation is 'auto': .*'auto', 'triton' or 'torch'"),
    ('Triton', r"TIMM_CABVIT_TME='Triton' is ignored"),
    ('triton', r"TIMM_CABVIT_TME='triton' is ignored.*needs Triton, which is not installed: pip install triton"),
])
def test_bad_env_value_warns_at_import_and_falls_back_to_auto(monkeypatch, value, message):
    """A warning rather than an error: through timm's entry-point hook an error would unregister every model."""
    monkeypatch.setenv('TIMM_CABVIT_TME', value)
    with mock.patch.object(tme_module, 'HAS_TRITON', False), pytest.warns(RuntimeWarning, match=message):
        assert tme_module._impl_from_environment() == 'auto'


@pytest.mark.integration
def test_bad_env_value_leaves_import_timm_and_the_models_working():
    script = ('import warnings; warnings.simplefilter("always"); import timm; from timm_cabvit.tme import '
              'get_tme_impl; timm.create_model("cabvit_h_l1", img_size=32); print(get_tme_impl())')
    done = subprocess.run([sys.executable, '-c', script], env=dict(os.environ, TIMM_CABVIT_TME='fused'),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == 'auto', done.stderr
    assert "TIMM_CABVIT_TME='fused' is ignored, the TME implementation is 'auto'" in done.stderr


def test_triton_without_triton_is_refused_when_set():
    """Where Triton is missing, 'triton' is refused by every setter, saying so and how to install it."""
    model = timm.create_model('cabvit_h_l1', img_size=32)
    tme = model.stages[2].blocks[0].tme
    message = r"'triton' needs Triton, which is not installed: pip install triton"
    before = tme_module.get_tme_impl()
    with mock.patch.object(tme_module, 'HAS_TRITON', False):
        for set_triton in (lambda: tme_module.set_tme_impl('triton'), lambda: model.set_tme_impl('triton'),
                           lambda: tme.set_impl('triton')):
            with pytest.raises(ImportError, match=message):
                set_triton()
        model.set_tme_impl('torch')  # the others still work
    assert tme_module.get_tme_impl() == before and tme.tme_impl == 'torch'


@pytest.mark.parametrize('model_name, img_size', [('cabvit_h_l1', 64), ('cabvit_p_l0', 32)])
def test_set_tme_impl(model_name, img_size):
    model = timm.create_model(model_name, img_size=img_size)
    tmes = [m for m in model.modules() if isinstance(m, TokenMergeEnhance)]
    assert tmes
    for impl in ('triton', 'torch', 'auto'):
        with mock.patch.object(tme_module, 'HAS_TRITON', True):
            model.set_tme_impl(impl)
        assert all(m.tme_impl == impl for m in tmes)
    with pytest.raises(ValueError):
        model.set_tme_impl('fused')
    assert all(m.tme_impl == 'auto' for m in tmes)
    model.set_tme_impl(None)  # back to the module-level setting
    assert all(m.tme_impl is None for m in tmes)
    x = torch.zeros(1, 16, 8)
    try:
        with mock.patch.object(tme_module, 'HAS_TRITON', True):
            tme_module.set_tme_impl('triton')
        assert all(m._use_triton(x) for m in tmes)
    finally:
        tme_module.set_tme_impl('auto')


def test_path_selection():
    tme = TokenMergeEnhance(8)
    x = torch.zeros(1, 16, 8)
    tme.set_impl('torch')
    assert not tme._use_triton(x)
    with mock.patch.object(tme_module, 'HAS_TRITON', True):
        tme.set_impl('triton')
    assert tme._use_triton(x)
    tme.set_impl('auto')
    assert not tme._use_triton(x)


def test_auto_picks_the_fused_tme_only_where_it_was_measured_faster():
    """Batched CUDA inference without gradients (faster there on an H100); the PyTorch path for training, for
    inputs that need gradients and for small batches (slower there)."""
    tme = TokenMergeEnhance(8).eval()
    tme.set_impl('auto')
    batched = torch.empty(tme_module.FUSED_TME_MIN_BATCH, 16, 8, device='meta')
    with mock.patch.object(torch.Tensor, 'is_cuda', property(lambda t: True)), \
            mock.patch.object(tme_module, 'HAS_TRITON', True):
        assert tme._use_triton(batched)
        assert not tme._use_triton(batched[:tme_module.FUSED_TME_MIN_BATCH - 1])
        assert not tme._use_triton(batched[:1])
        assert not tme._use_triton(batched.clone().requires_grad_())
        assert not tme.train()._use_triton(batched)
    assert not tme.eval()._use_triton(batched)  # not a CUDA tensor


@requires_triton
def test_torchscript_and_fx_use_torch_path():
    tme = _make_tme(8, prefix=1).eval()
    tme.set_impl('triton')
    x = torch.randn(2, 36, 8, device=DEVICE)
    ref = copy.deepcopy(tme)
    ref.set_impl('torch')
    scripted = torch.jit.script(tme)
    assert _rel_err(scripted(x, (5, 7))[0], ref(x, (5, 7))[0]) < RTOL
    graph = torch.fx.symbolic_trace(tme, concrete_args={'grid_size': (5, 7)}).graph
    assert 'enhance.conv' in [node.target for node in graph.nodes if node.op == 'call_module']


@pytest.mark.parametrize('grid, prefix, train, dim', [
    ((7, 7), 0, False, 24),
    ((7, 7), 0, True, 24),
    ((7, 7), 1, False, 24),
    ((7, 7), 1, True, 24),
    ((13, 17), 0, False, 32),
    ((13, 17), 0, True, 32),
    ((13, 17), 1, False, 32),
    ((13, 17), 1, True, 32),
])
def test_matches_torch(tme_triton, grid, prefix, train, dim):
    # batch 2: at batch 1 with a prefix token the reference itself is wrong on CPU. Its map is then a view with
    # batch stride C, not C * H * W, for which BatchNorm2d's CPU backward (torch 2.14) returns wrong gradients.
    tme = _make_tme(dim, prefix)
    x = torch.randn(2, prefix + grid[0] * grid[1], dim, device=DEVICE) + 0.5
    _compare(tme, x, grid, train)


@pytest.mark.parametrize('train', [False, True])
def test_matches_torch_no_merge_two_channel_blocks(tme_triton, train):
    tme = _make_tme(72, prefix=0, merge=False)  # 72 channels: a full and a masked block of 64
    x = torch.randn(3, 30, 72, device=DEVICE)
    _compare(tme, x, (6, 5), train)


def test_momentum_none_cumulative_average(tme_triton):
    tme = _make_tme(8, prefix=0)
    tme.enhance.bn.momentum = None
    fused, ref = copy.deepcopy(tme).train(), copy.deepcopy(tme).train()
    fused.set_impl('triton')
    ref.set_impl('torch')
    for _ in range(2):
        x = torch.randn(2, 25, 8, device=DEVICE)
        fused(x, (5, 5))
        ref(x, (5, 5))
    for name in ('running_mean', 'running_var', 'num_batches_tracked'):
        a, b = getattr(fused.enhance.bn, name), getattr(ref.enhance.bn, name)
        assert torch.allclose(a.double(), b.double(), rtol=RTOL, atol=RTOL), name


@pytest.mark.parametrize('dtype, rtol', [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_low_precision(tme_triton, dtype, rtol):
    """bf16 / fp16 in, fp32 accumulation: the fused path is within the dtype's rounding of the fp32 reference."""
    grid, prefix = (7, 7), 1
    x = torch.randn(2, prefix + 49, 16, device=DEVICE)
    for train in (False, True):
        ref = _make_tme(16, prefix).train(train)
        ref.set_impl('torch')
        z_ref, d_ref = ref(x, grid)
        tme = _make_tme(16, prefix).to(dtype).train(train)
        tme.set_impl('triton')
        xl = x.to(dtype).requires_grad_()
        z, d = tme(xl, grid)
        assert z.dtype == d.dtype == dtype
        assert _rel_err(z.float(), z_ref) < rtol
        assert _rel_err(d.float(), d_ref) < rtol
        (z.float().square().sum() + d.float().sum()).backward()
        assert xl.grad.dtype == dtype and torch.isfinite(xl.grad).all()


@pytest.mark.parametrize('train', [False, True])
def test_gradcheck_fp64(tme_triton, train):
    """Analytic gradients of the ops against finite differences (fast mode: a random projection of the Jacobian)."""
    grid_h, grid_w, prefix, dim = 5, 6, 1, 4
    torch.manual_seed(0)
    f64 = {'device': DEVICE, 'dtype': torch.float64}
    y = torch.randn(1, prefix + grid_h * grid_w, dim, **f64)  # batch statistics over batches: test_matches_torch
    w3, w7 = torch.randn(dim, 1, 3, 3, **f64), torch.randn(dim, 1, 7, 7, **f64)
    bn_weight, bn_bias = torch.rand(dim, **f64) + 0.5, torch.randn(dim, **f64)
    bn_mean, bn_var = torch.randn(dim, **f64), torch.rand(dim, **f64) + 0.5
    inputs = tuple(t.requires_grad_() for t in (y, w3, w7, bn_weight, bn_bias))

    def fn(y, w3, w7, bn_weight, bn_bias):
        if train:
            return tme_triton.tme_train(y, w3, w7, bn_weight, bn_bias, 1e-5, grid_h, grid_w, prefix)[:2]
        return tme_triton.tme_eval(y, w3, w7, bn_weight, bn_bias, bn_mean, bn_var, 1e-5, grid_h, grid_w, prefix)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize('train', [False, True])
def test_compile_fullgraph(tme_triton, train):
    """torch.compile traces through the custom ops, forward and backward (aot_eager: no C++ / Triton codegen)."""
    tme = _make_tme(16, prefix=0).train(train)
    tme.set_impl('triton')
    eager = copy.deepcopy(tme)
    compiled = torch.compile(tme, fullgraph=True, backend='aot_eager')
    x = torch.randn(2, 49, 16, device=DEVICE)
    outs = []
    for module in (eager, compiled):
        xg = x.clone().requires_grad_()
        z, d = module(xg, (7, 7))
        (z.square().sum() + d.sum()).backward()
        outs.append((z, d, xg.grad, module.enhance.conv.weight.grad, module.enhance.bn.running_mean))
    for a, b in zip(*outs):
        assert _rel_err(a, b) < RTOL


def test_opcheck(tme_triton):
    """Schema, fake tensor, autograd registration and AOT dispatch of the forward ops (torch.library.opcheck)."""
    grid_h, grid_w, prefix, dim = 5, 6, 1, 8
    y = torch.randn(2, prefix + grid_h * grid_w, dim, device=DEVICE, requires_grad=True)
    w3 = torch.randn(dim, 1, 3, 3, device=DEVICE, requires_grad=True)
    w7 = torch.randn(dim, 1, 7, 7, device=DEVICE, requires_grad=True)
    bn_weight = torch.rand(dim, device=DEVICE, requires_grad=True)
    bn_bias = torch.randn(dim, device=DEVICE, requires_grad=True)
    bn_mean, bn_var = torch.randn(dim, device=DEVICE), torch.rand(dim, device=DEVICE) + 0.5
    torch.library.opcheck(
        tme_triton.tme_eval, (y, w3, w7, bn_weight, bn_bias, bn_mean, bn_var, 1e-5, grid_h, grid_w, prefix))
    torch.library.opcheck(tme_triton.tme_train, (y, w3, None, bn_weight, bn_bias, 1e-5, grid_h, grid_w, prefix))


def test_bad_input(tme_triton):
    with pytest.raises(ValueError, match='tokens'):
        tme_triton.tme_eval(
            torch.zeros(1, 10, 4, device=DEVICE), torch.zeros(4, 1, 3, 3, device=DEVICE), None,
            *(torch.ones(4, device=DEVICE),) * 4, 1e-5, 3, 3, 0)
    tme = _make_tme(4, prefix=0).train()
    tme.set_impl('triton')
    with pytest.raises(ValueError, match='more than 1 value per channel'):
        tme(torch.zeros(1, 1, 4, device=DEVICE), (1, 1))


def _model_logits(img_size: int, batch_size: int, train: bool):
    torch.manual_seed(0)
    model = timm.create_model('cabvit_h_l1', img_size=img_size).to(DEVICE).train(train)
    x = torch.randn(batch_size, 3, img_size, img_size, device=DEVICE)
    logits = []
    for impl in ('torch', 'triton'):
        model.set_tme_impl(impl)
        with torch.no_grad():
            logits.append(model(x))
    return logits


@pytest.mark.parametrize('train', [False, True])
def test_model_same_logits(tme_triton, train):
    """cabvit_h_l1 at 64x64 (stage grids 4x4 and 2x2); eval folds the BN, train uses batch statistics.

    Training takes two images: with one, the last BN's batch statistics leave every channel of the final 2x2 map
    with zero mean (the layer scales start at 1e-6), so the pooled features are rounding noise the head's
    LayerNorm amplifies, on either path.
    """
    ref, fused = _model_logits(64, 2 if train else 1, train)
    assert _rel_err(fused, ref) < RTOL


@pytest.mark.slow
@pytest.mark.parametrize('train', [False, True])
def test_model_same_logits_224(tme_triton, train):
    """cabvit_h_l1 at 224x224 (stage grids 14x14 and 7x7): about 30 s per forward under the interpreter."""
    ref, fused = _model_logits(224, 2, train)
    assert _rel_err(fused, ref) < RTOL


@pytest.mark.slow
def test_opcheck_backward_ops(tme_triton):
    grid_h, grid_w, prefix, dim = 5, 6, 1, 8
    dz = torch.randn(2, prefix + grid_h * grid_w, dim, device=DEVICE)
    y, u = torch.randn_like(dz), torch.randn_like(dz)
    w3, w7 = torch.randn(dim, 1, 3, 3, device=DEVICE), torch.randn(dim, 1, 7, 7, device=DEVICE)
    ddigest = torch.randn(2, 4, dim, device=DEVICE)
    scale = torch.rand(dim, device=DEVICE)
    torch.library.opcheck(tme_triton.tme_backward, (dz, ddigest, y, w3, w7, scale, grid_h, grid_w, prefix))
    torch.library.opcheck(tme_triton.tme_backward, (dz, None, y, w3, None, None, grid_h, grid_w, prefix))
    torch.library.opcheck(
        tme_triton.tme_bn_backward,
        (dz, u, torch.randn(dim, device=DEVICE), torch.rand(dim, device=DEVICE), scale, 1e-5, grid_h, grid_w, prefix))
