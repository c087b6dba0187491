"""The blocks' linears through oneDNN in CPU inference (the MLPs' fc1 + GELU as one op, `run_linear` for the
others): timm's and nn.Linear's function, and only where nothing needs more than a forward pass of float32 CPU
tensors, on a plain nn.Linear called as is. Under torch.compile they and the bias gather are ops of the package."""
import pytest
import timm
import torch
from timm.layers import Mlp
from torch.profiler import profile

import timm_cabvit.layers as layers
from timm_cabvit.cabvit import CrossBlockAttention, DigestCalibration
from timm_cabvit.layers import FusedGeluMlp, run_linear

FUSED_OP = 'mkldnn::_linear_pointwise'

pytestmark = pytest.mark.skipif(not layers.HAS_ONEDNN_LINEAR, reason='this torch build has no oneDNN')


def _ops(fn) -> list:
    """The names of the operators `fn()` dispatches, in order."""
    with profile() as prof:
        fn()
    return [event.name for event in prof.events()]


def _pair(**kwargs):
    """A FusedGeluMlp in eval mode and timm's Mlp with the same weights."""
    fused = FusedGeluMlp(16, 64, **kwargs).eval()
    plain = Mlp(16, 64, **kwargs).eval()
    plain.load_state_dict(fused.state_dict())
    return fused, plain


@pytest.mark.parametrize('context', [torch.no_grad, torch.inference_mode])
def test_inference_runs_one_fused_op_with_timms_result(context):
    fused, plain = _pair()
    x = torch.randn(2, 5, 7, 16).permute(0, 2, 1, 3)  # non-contiguous, as a permuted ConvNeXt map
    with context():
        expected = plain(x)
        ops = _ops(lambda: fused(x))
        torch.testing.assert_close(fused(x), expected, rtol=1e-6, atol=1e-6)
    assert FUSED_OP in ops and 'aten::gelu' not in ops


def test_gradients_training_autocast_and_other_dtypes_take_timms_ops():
    fused, plain = _pair()
    x = torch.randn(3, 16)
    ops = _ops(lambda: fused(x).sum().backward())  # eval mode, gradients enabled: autograd needs timm's ops
    assert FUSED_OP not in ops and 'aten::gelu' in ops
    plain(x).sum().backward()
    torch.testing.assert_close(fused.fc1.weight.grad, plain.fc1.weight.grad)
    with torch.no_grad():
        assert 'aten::gelu' in _ops(lambda: fused.train()(x))  # dropout's place
        fused.eval()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert FUSED_OP not in _ops(lambda: fused(x))
        assert FUSED_OP not in _ops(lambda: fused.bfloat16()(x.bfloat16()))


@pytest.mark.parametrize('act_layer, fused_here', [
    (torch.nn.GELU, True), (timm.layers.GELU, True), (timm.layers.GELUTanh, False), (torch.nn.ReLU, False)])
def test_only_the_exact_gelu_is_fused(act_layer, fused_here):
    fused, plain = _pair(act_layer=act_layer)
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert _ops(lambda: fused(x)).count(FUSED_OP) == (2 if fused_here else 1)  # fc2's always
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings('ignore:`torch.jit.trace_method` is deprecated')
def test_scripted_traced_and_without_onednn_it_is_timms_path(monkeypatch):
    fused, plain = _pair()
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = plain(x)
        torch.testing.assert_close(torch.jit.script(fused)(x), expected, rtol=1e-6, atol=1e-6)
        traced = torch.jit.trace(fused, x)
        assert 'mkldnn' not in str(traced.graph)
        monkeypatch.setattr(layers, 'HAS_ONEDNN_LINEAR', False)
        assert FUSED_OP not in _ops(lambda: fused(x))


@pytest.mark.parametrize('context', [torch.no_grad, torch.inference_mode])
def test_run_linear_is_the_linear_in_inference(context):
    linear = torch.nn.Linear(16, 8)
    x = torch.randn(2, 5, 7, 16).permute(0, 2, 1, 3)
    with context():
        ops = _ops(lambda: run_linear(linear, x))
        torch.testing.assert_close(run_linear(linear, x), linear(x), rtol=1e-6, atol=1e-6)
    assert FUSED_OP in ops and 'aten::linear' not in ops
    ops = _ops(lambda: run_linear(linear, x).sum().backward())
    assert FUSED_OP not in ops and linear.weight.grad is not None
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert FUSED_OP not in _ops(lambda: run_linear(linear, x))


def test_run_linear_calls_a_hooked_or_subclassed_linear():
    x = torch.randn(3, 16)
    linear = torch.nn.Linear(16, 8)
    seen = []
    handle = linear.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        assert FUSED_OP not in _ops(lambda: run_linear(linear, x)) and seen == [(3, 8)]
        handle.remove()

        class Scaled(torch.nn.Linear):
            def forward(self, inp):
                return 2 * super().forward(inp)

        scaled = Scaled(16, 8)
        scaled.load_state_dict(linear.state_dict())
        torch.testing.assert_close(run_linear(scaled, x), 2 * linear(x))


@pytest.mark.parametrize('act_layer', [torch.nn.GELU, 'gelu'])
def test_every_linear_of_the_blocks_runs_through_onednn_in_inference(act_layer):
    model = timm.create_model('cabvit_h_l1', img_size=64, act_layer=act_layer).eval()
    x = torch.randn(1, 3, 64, 64)
    expected = model(x).detach()  # gradients enabled: timm's path
    with torch.inference_mode():
        ops = _ops(lambda: model(x))
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m is not model.get_classifier()]
    mlps = [m for m in model.modules() if isinstance(m, FusedGeluMlp)]
    assert len(mlps) == 12 and len(linears) == 2 * 12 + 2 * 8  # each MLP's fc1 and fc2, each attention's qkv, proj
    assert ops.count(FUSED_OP) == len(linears) and ops.count('aten::linear') == 1  # the classifier's


@pytest.mark.filterwarnings('ignore::DeprecationWarning', 'ignore:torch.quantize_per_tensor')
def test_a_swapped_or_hooked_fc1_or_act_runs_as_it_is():
    """The fusion reads fc1's weights itself: a quantized fc1, a wrapped one (LoRA-style) or a forward hook on fc1
    or the activation must see the module called, so each takes timm's path."""
    x = torch.randn(3, 16)
    fused, plain = _pair()
    seen = []
    handle = fused.fc1.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        assert _ops(lambda: fused(x)).count(FUSED_OP) == 1 and seen == [(3, 64)]  # fc2's
        handle.remove()
        handle = fused.act.register_forward_pre_hook(lambda module, args: seen.append('act'))
        assert _ops(lambda: fused(x)).count(FUSED_OP) == 1 and seen[-1] == 'act'
        handle.remove()
        assert _ops(lambda: fused(x)).count(FUSED_OP) == 2

        class Scaled(torch.nn.Linear):  # a subclass computes something else with the same weights
            def forward(self, inp):
                return 2 * super().forward(inp)

        scaled = Scaled(16, 64)
        scaled.load_state_dict(fused.fc1.state_dict())
        fused.fc1 = scaled
        torch.testing.assert_close(fused(x), plain.fc2(plain.act(2 * plain.fc1(x))))
    model = timm.create_model('cabvit_h_l1', img_size=64).eval()
    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    image = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        ops = _ops(lambda: quantized(image))
        assert FUSED_OP not in ops and torch.isfinite(quantized(image)).all()


def test_compiled_inference_calls_the_packages_ops_and_training_does_not():
    """Under torch.compile without gradients oneDNN's linear, the bias gather, the digest calibration and the
    token concatenations are ops of the graph (aot_eager here: no C++ compiler needed), not kernels inductor
    generates; with gradients the graph keeps aten's ops."""
    model = timm.create_model('cabvit_h_l1', img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    expected = model(x).detach()
    graphs = []
    aot_eager = torch._dynamo.lookup_backend('aot_eager')

    def recording_backend(gm, example_inputs):
        graphs.append([str(node.target) for node in gm.graph.nodes if node.op == 'call_function'])
        return aot_eager(gm, example_inputs)

    compiled = torch.compile(model, fullgraph=True, backend=recording_backend)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
    calls = graphs[-1].count
    blocks_linears = sum(type(m) is torch.nn.Linear for m in model.modules()) - 1  # all but the classifier
    assert calls('timm_cabvit.onednn_linear.default') == blocks_linears == 40
    assert calls('timm_cabvit.gather_bias.default') == sum(isinstance(m, CrossBlockAttention) for m in model.modules())
    calibrations = sum(isinstance(m, DigestCalibration) for m in model.modules())
    digest_chain_cats = sum(max(0, sum(b.tme.merge is not None for b in s.blocks) - 1) for s in model.stages[2:])
    assert calls('timm_cabvit.calibrate_digests.default') == calibrations == 6
    assert calls('timm_cabvit.cat_tokens.default') == calibrations + digest_chain_cats == 10  # keys, digests' chain
    compiled(x).sum().backward()
    assert len(graphs) == 2 and not [op for op in graphs[-1] if op.startswith(('timm_cabvit.', 'mkldnn.'))]
    assert model.stages[2].blocks[0].attn.qkv.weight.grad is not None
    assert model.stages[3].blocks[1].attn.depth_bias.bias.grad is not None


def test_exported_programs_keep_atens_ops():
    model = timm.create_model('cabvit_h_l1', img_size=64).eval()
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(1, 3, 64, 64),))
    graph = str(program.graph)
    assert 'timm_cabvit' not in graph and 'mkldnn' not in graph and 'aten.linear' in graph


COMPILED_OP = 'timm_cabvit::onednn_linear'


@pytest.mark.slow
def test_inductor_compiles_the_onednn_op():
    fused, plain = _pair()
    x = torch.randn(2, 7, 16)
    compiled = torch.compile(fused, fullgraph=True)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), plain(x), rtol=1e-5, atol=1e-5)
        assert _ops(lambda: compiled(x)).count(COMPILED_OP) == 2
