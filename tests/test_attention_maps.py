"""Attention maps with digest-token columns (`timm_cabvit.tools.attention_maps`, the paper's Fig. 6)."""
import struct

import pytest
import timm
import torch
from PIL import Image

from timm_cabvit.tools.attention_maps import (
    attention_maps,
    cabvit_blocks,
    default_blocks,
    load_image,
    run_attention_command,
    save_attention_figure,
)

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


pytestmark = pytest.mark.usefixtures('one_thread')


def png_size(path) -> tuple:
    """Width and height from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b'IHDR', f'{path} is not a PNG'
    return struct.unpack('>II', data[16:24])


@pytest.fixture(scope='module')
def hybrid():
    """CabViT-H-L1 with peaked attention: at init the bias tables are 0 and q.k tiny, so every map is uniform."""
    torch.manual_seed(0)
    model = timm.create_model('cabvit_h_l1').eval()
    with torch.no_grad():
        for block in cabvit_blocks(model).values():
            block.attn.qkv.weight.normal_(0, 0.2)
            block.attn.pos_bias.attention_biases.normal_()
            if block.attn.depth_bias is not None:
                block.attn.depth_bias.bias.normal_()
    return model


def test_hybrid_maps_have_digest_columns_growing_with_depth(hybrid):
    blocks = ['stages.2.blocks.0', 'stages.2.blocks.1', 'stages.2.blocks.5', 'stages.3.blocks.0', 'stages.3.blocks.1']
    maps = attention_maps(hybrid, torch.randn(3, 224, 224), blocks)
    assert list(maps) == blocks
    # 14x14 tokens and S = 16 digests per earlier block in stage 3; 7x7 and S = 4 in stage 4
    expected = {'stages.2.blocks.0': (196, 196), 'stages.2.blocks.1': (196, 212), 'stages.2.blocks.5': (196, 276),
                'stages.3.blocks.0': (49, 49), 'stages.3.blocks.1': (49, 53)}
    for name, attn in maps.items():
        assert tuple(attn.shape) == expected[name], name
        torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[0]))
        assert (attn >= 0).all()
    assert (maps['stages.2.blocks.5'][:, 196:].sum(-1) > 0).all()  # every query attends to the digests


def test_maps_are_those_of_the_forward_pass(hybrid):
    """The maps times the values give the block's attention output of the (fused) forward pass; no side effects."""
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = hybrid(x)
    attn = hybrid.get_submodule('stages.2.blocks.3.attn')
    seen = {}
    handle = attn.register_forward_hook(lambda module, args, out: seen.update(args=args, out=out))
    per_head = attention_maps(hybrid, x, ['stages.2.blocks.3'], average_heads=False)['stages.2.blocks.3']
    handle.remove()
    assert tuple(per_head.shape) == (6, 196, 244)
    assert per_head.max() > 10 / 244  # far from uniform, so a wrong map would show
    with torch.no_grad():
        _, _, v = attn._qkv(*seen['args'][:2])  # tokens and digests; the grid is the third
        out = attn.proj((per_head.unsqueeze(0) @ v).transpose(1, 2).reshape(1, 196, -1))
        torch.testing.assert_close(out, seen['out'], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(hybrid(x), expected)  # hooks removed, model unchanged
    assert not hybrid.training


def test_default_blocks_are_the_papers_choice(hybrid):
    assert default_blocks(hybrid) == ['stages.2.blocks.1', 'stages.2.blocks.3', 'stages.2.blocks.5',
                                      'stages.3.blocks.1']
    plain = timm.create_model('cabvit_p_l0', img_size=64)
    assert default_blocks(plain) == ['blocks.1', 'blocks.3', 'blocks.5', 'blocks.11']
    assert len(cabvit_blocks(plain)) == 12


def test_plain_maps_count_the_class_token():
    model = timm.create_model('cabvit_p_l0').eval()
    maps = attention_maps(model, torch.randn(1, 3, 224, 224), ['blocks.0', 'blocks.2'])
    assert tuple(maps['blocks.0'].shape) == (197, 197)
    assert tuple(maps['blocks.2'].shape) == (197, 197 + 2 * 16)
    torch.testing.assert_close(maps['blocks.2'].sum(-1), torch.ones(197))


def test_without_cross_block_attention_there_are_no_digest_columns():
    model = timm.create_model('cabvit_h_l1', img_size=64, cross_block=False)
    maps = attention_maps(model, torch.randn(1, 3, 64, 64))  # 4x4 tokens in stage 3, 2x2 in stage 4
    assert {name: tuple(m.shape) for name, m in maps.items()} == {
        'stages.2.blocks.1': (16, 16), 'stages.2.blocks.3': (16, 16), 'stages.2.blocks.5': (16, 16),
        'stages.3.blocks.1': (4, 4)}


def test_bad_arguments_say_what_was_expected(hybrid):
    with pytest.raises(ValueError, match='unknown block.*stages.2.blocks.0'):
        attention_maps(hybrid, torch.randn(3, 224, 224), ['stages.2.blocks.9'])
    with pytest.raises(ValueError, match='expected one image'):
        attention_maps(hybrid, torch.randn(2, 3, 224, 224))
    with pytest.raises(ValueError, match='no CabViT blocks'):
        attention_maps(timm.create_model('resnet10t'), torch.randn(3, 64, 64))


def test_figure_is_a_png(hybrid, tmp_path):
    maps = attention_maps(hybrid, torch.randn(3, 224, 224))
    path = save_attention_figure(maps, tmp_path / 'fig' / 'attention.png', title='test', dpi=60)
    width, height = png_size(path)
    assert width > 200 and height > 2 * width  # four panels, stacked
    assert path.stat().st_size > 10_000


def test_load_image_and_command_with_a_checkpoint(tmp_path):
    Image.new('RGB', (50, 40), (200, 30, 60)).save(tmp_path / 'img.png')
    model = timm.create_model('cabvit_h_l1', img_size=64, num_classes=5)
    x = load_image(tmp_path / 'img.png', model)
    assert tuple(x.shape) == (1, 3, 64, 64)
    assert x[0, 0].mean() > x[0, 1].mean()  # red stays red through timm's normalisation

    torch.save({'state_dict': model.state_dict()}, tmp_path / 'checkpoint.pth.tar')
    out = run_attention_command(tmp_path / 'img.png', 'cabvit_h_l1', checkpoint=tmp_path / 'checkpoint.pth.tar',
                                blocks=['stages.2.blocks.2'], out=tmp_path / 'maps.png', img_size=64)
    assert out == tmp_path / 'maps.png' and png_size(out)[0] > 0
    with pytest.raises(ValueError, match="unknown model 'cabvit_x'"):
        run_attention_command(tmp_path / 'img.png', 'cabvit_x')
    with pytest.raises(ValueError, match='is not a file'):
        run_attention_command(tmp_path / 'img.png', 'cabvit_h_l1', checkpoint=tmp_path / 'missing.pth')
