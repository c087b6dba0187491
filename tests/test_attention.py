"""Cross-block attention: its bias against timm's relative position index, query chunks, and a bias built from the
tables on every forward pass (nothing kept between calls, so nothing can go stale)."""
import copy
import pickle

import pytest
import timm
import torch
from timm.layers import gen_relative_position_index

import timm_cabvit.cabvit as cabvit
from timm_cabvit.cabvit import CrossBlockAttention

MODELS = ['cabvit_h_l1', 'cabvit_p_l0']


def _bias_tables(model: torch.nn.Module):
    return [p for n, p in model.named_parameters() if n.endswith(('attention_biases', 'relative_position_bias_table',
                                                                   'depth_bias.bias'))]


def _model(model_name: str, img_size=64, **kwargs) -> torch.nn.Module:
    """A model whose bias tables matter: random tables, layer scales 1."""
    model = timm.create_model(model_name, img_size=img_size, ls_init_value=1., **kwargs).eval()
    with torch.no_grad():
        for p in _bias_tables(model):
            p.normal_()
    return model


def _attention_modules(model):
    return [m for m in model.modules() if isinstance(m, CrossBlockAttention)]


@pytest.mark.parametrize('grid', [(4, 4), (3, 5)])
def test_class_token_bias_is_timms_relative_position_index(grid):
    """CabViT-P's bias, built from rows of a row table, equals timm's RelPosBias indexing of the same table."""
    model = _model('cabvit_p_l0', img_size=(grid[0] * 16, grid[1] * 16))
    block = model.blocks[2]
    x = torch.randn(1, 1 + grid[0] * grid[1], 192)
    digest_grid = cabvit.digest_grid_size(grid)
    digests = torch.randn(1, 2 * digest_grid[0] * digest_grid[1], 192)
    attn = block.attn
    q, k, _ = attn._qkv(x, digests)
    table = attn.pos_bias.relative_position_bias_table
    pos = table[gen_relative_position_index(grid, class_token=True)].permute(2, 0, 1)
    depth = attn.depth_bias.bias.flip(1).flatten(1)  # key order: the oldest block's digests first
    bias = torch.cat([pos, depth.unsqueeze(1).expand(-1, pos.shape[1], -1)], dim=-1)
    expected = ((q * attn.scale) @ k.transpose(-2, -1) + bias).softmax(-1)
    torch.testing.assert_close(attn.attention_weights(x, digests, grid), expected)


@pytest.mark.parametrize('model_name', MODELS)
def test_query_chunks_give_the_same_output(model_name, monkeypatch):
    model = _model(model_name, img_size=(96, 64))
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        whole = model(x)
        for attn in _attention_modules(model):
            monkeypatch.setattr(attn, 'max_bias_elements', 100)
            assert len(attn.query_chunks(attn.pos_bias.grid_size)) > 1
        torch.testing.assert_close(model(x), whole)


def _load_state_dict(model, state_dict, tmp_path):
    model.load_state_dict(state_dict)


def _timm_load_checkpoint(model, state_dict, tmp_path):
    torch.save(state_dict, tmp_path / 'weights.pth')
    timm.models.load_checkpoint(model, str(tmp_path / 'weights.pth'))


def _copy_tables(model, state_dict, tmp_path):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state_dict[name])


def _data_ema(model, state_dict, tmp_path):
    """An EMA update as some trainers write it: through .data, which bumps no version counter."""
    params = dict(model.named_parameters())
    for name, p in params.items():
        p.data.mul_(0.).add_(state_dict[name].data)
    for name, b in model.named_buffers():
        if name in state_dict:
            b.data.copy_(state_dict[name])


def _vector_to_parameters(model, state_dict, tmp_path):
    names = [n for n, _ in model.named_parameters()]
    torch.nn.utils.vector_to_parameters(
        torch.nn.utils.parameters_to_vector([state_dict[n] for n in names]), model.parameters())


@pytest.mark.parametrize('load', [_load_state_dict, _timm_load_checkpoint, _copy_tables, _data_ema,
                                  _vector_to_parameters])
@pytest.mark.parametrize('model_name', MODELS)
def test_new_tables_take_effect_at_once(model_name, load, tmp_path):
    """After an eval forward, tables changed by any means give the new model's output at the next forward."""
    model, other = _model(model_name), _model(model_name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, before = other(x), model(x)
        load(model, other.state_dict(), tmp_path)
        assert not torch.allclose(before, expected)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize('model_name', MODELS)
def test_fused_adamw_step_after_an_eval_forward(model_name):
    """The fused optimizers write parameters without version counter bumps: the next forward sees the step."""
    model = _model(model_name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model(x).square().mean().backward()
    optimizer.step()
    fresh = _model(model_name)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), fresh(x), rtol=0, atol=0)


@pytest.mark.parametrize('model_name', MODELS)
def test_eval_mode_with_grad_trains_the_bias_tables(model_name):
    """Eval mode with grad enabled (e.g. fine-tuning with frozen BatchNorm) builds the bias in the graph."""
    model = _model(model_name)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(x)
    for _ in range(2):  # a second backward over a new forward must not reuse the first graph
        model.zero_grad()
        model(x).sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _bias_tables(model))


@pytest.mark.parametrize('model_name', MODELS)
def test_built_and_run_under_inference_mode(model_name):
    torch.manual_seed(0)
    reference = timm.create_model(model_name, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.manual_seed(0)
        model = timm.create_model(model_name, img_size=64).eval()
        out = model(x)
        assert torch.equal(model(x), out)
    with torch.no_grad():
        torch.testing.assert_close(out, reference(x), rtol=0, atol=0)


@pytest.mark.parametrize('model_name', MODELS)
def test_pickle_after_an_eval_forward_is_the_fresh_models(model_name):
    model = _model(model_name)
    size = len(pickle.dumps(model))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        restored = pickle.loads(pickle.dumps(model))
        assert len(pickle.dumps(model)) == size
        torch.testing.assert_close(restored(x), out, rtol=0, atol=0)


def test_eval_forward_at_another_size_keeps_nothing():
    """A dynamic model run at 256x256 holds the same tensors afterwards as before: no bias, no index of the grid."""
    model = _model('cabvit_h_l1', img_size=64, dynamic_img_size=True)

    def held():
        tensors = {n: t for n, t in model.state_dict(keep_vars=True).items()}
        tensors.update({f'{m}.{n}': t for m, mod in model.named_modules() for n, t in vars(mod).items()
                        if isinstance(t, torch.Tensor)})
        tensors.update({f'buffer {n}': b for n, b in model.named_buffers()})
        return {n: (t.data_ptr(), t.numel()) for n, t in tensors.items()}

    before = held()
    with torch.no_grad():
        model(torch.randn(1, 3, 256, 256))
    assert held() == before


@pytest.mark.parametrize('model_name', MODELS)
def test_vmap_ensemble_jvp_and_fake_tensors(model_name):
    """torch.func transforms and a FakeTensorMode pass see plain tensor code, and leave the model as it was."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call, jvp, stack_module_state, vmap

    models = [_model(model_name), _model(model_name)]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = torch.stack([m(x) for m in models])
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to('meta')

    def run(p, b, inp):
        return functional_call(base, (p, b), (inp,))

    with torch.no_grad():
        torch.testing.assert_close(vmap(run, in_dims=(0, 0, None))(params, buffers, x), expected)
        out, tangent = jvp(lambda inp: models[0](inp), (x,), (torch.ones_like(x),))
    torch.testing.assert_close(out, expected[0])
    assert torch.isfinite(tangent).all()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
        assert models[0](mode.from_tensor(x)).shape == expected[0].shape
    with torch.no_grad():
        torch.testing.assert_close(models[0](x), expected[0], rtol=0, atol=0)


@pytest.mark.parametrize('model_name', MODELS)
def test_traces_lay_the_bias_out_from_the_row_table(model_name):
    """A trace without gradients (jit.trace, the ONNX export) lays every bias out from the row table, the block
    without digest keys too: no (N, N) index in the graph. Eager inference gathers it by `bias_positions`."""
    model = _model(model_name)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    for attn in _attention_modules(model):
        attn.bias_positions = torch.empty(0, 0, dtype=torch.int32)  # any use of it fails
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            model(x)
        traced = torch.jit.trace(model, x, check_trace=False)
    torch.testing.assert_close(traced(x), expected)  # not bit-identical: traces take the unfused GELU


@pytest.mark.parametrize('model_name', MODELS)
def test_gradient_and_layout_paths_give_one_bias(model_name, monkeypatch):
    """On the table's own grid the bias is one gather by `bias_positions`, in traces rows of a row table: the same
    bias, with and without gradients, its rows aligned to MASK_ALIGNMENT keys for CUDA's memory-efficient
    attention."""
    model = _model(model_name, img_size=(96, 64))
    for attn in _attention_modules(model):
        monkeypatch.setattr(attn, 'max_bias_elements', 1000)
        grid = attn.pos_bias.grid_size
        for rows in attn.query_chunks(grid):
            trained = attn.attention_bias(grid, rows, torch.float32)
            with torch.no_grad():
                gathered = attn.attention_bias(grid, rows, torch.float32)
                laid_out = attn._layout(attn._tables(grid), grid, rows, attn.bias_index, attn.window_rows)
            assert trained.requires_grad and not gathered.requires_grad
            torch.testing.assert_close(trained, gathered, rtol=0, atol=0)
            torch.testing.assert_close(gathered[0], laid_out[:, :, :attn.num_keys(grid)], rtol=0, atol=0)
            assert trained.shape[-1] == attn.num_keys(grid)
            assert all(s % cabvit.MASK_ALIGNMENT == 0 for s in trained.stride()[:-1])

