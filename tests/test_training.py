"""Training set-ups beyond one process: DDP on CPU, SyncBatchNorm conversion, torch.compile."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_ddp_two_processes_end_with_identical_weights():
    result = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29531',
         str(REPO / 'tests' / 'ddp_train.py')],
        capture_output=True, text=True, timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report['rank_max_diff'] == 0 and report['moved'] > 0, report


def test_sync_batchnorm_conversion_covers_every_batchnorm():
    from timm.layers import convert_sync_batchnorm
    model = convert_sync_batchnorm(timm.create_model('cabvit_h_l1', device='meta'))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)


def test_compiles_fullgraph_for_a_training_step():
    model = timm.create_model('cabvit_h_l1', num_classes=3, img_size=64).train()
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    compiled(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def _dirty_heap() -> None:
    """Leave freed NaN-filled blocks of common sizes in the allocator, as earlier work in a process leaves its data."""
    for numel in (1 << 22, 1 << 20, 1 << 16, 1 << 12, 320 * 49, 64 * 49 * 2):
        for dtype in (torch.float32, torch.bfloat16):
            del_me = torch.full((numel,), float('nan'), dtype=dtype)
            del del_me


def test_bf16_merge_gradient_finite_on_a_dirty_heap():
    """oneDNN's bf16 depthwise conv fills padding taps' weight gradients from uninitialised memory for maps under 4
    columns wide: those merges run in float32 (issue 18 item 4; the upstream reproduction is in the CHANGELOG)."""
    from timm_cabvit.tme import TokenMergeEnhance

    for grid in [(2, 2), (5, 3), (1, 1), (9, 1)]:
        tme = TokenMergeEnhance(64).train()
        tokens = torch.randn(4, grid[0] * grid[1], 64, requires_grad=True)
        _dirty_heap()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            x, digest = tme(tokens, grid)
        (x.float().sum() + digest.float().sum()).backward()
        assert torch.isfinite(tme.merge.weight.grad).all(), grid
        assert torch.isfinite(tokens.grad).all(), grid


def test_narrow_merge_in_float32_is_the_same_function():
    from timm_cabvit.tme import TokenMergeEnhance

    tme = TokenMergeEnhance(32).eval()
    tokens = torch.randn(2, 18, 32)
    x_map = tokens.transpose(1, 2).reshape(2, 32, 6, 3)
    torch.testing.assert_close(tme(tokens, (6, 3))[1], tme.merge(x_map).flatten(2).transpose(1, 2))


def test_bf16_training_after_an_fp32_pass_has_finite_gradients():
    """The order-dependent failure of the README's test command: an fp32 pass at 224, then bf16 autocast at 64."""
    def step(img_size: int, bf16: bool):
        model = timm.create_model('cabvit_h_l1', img_size=img_size, num_classes=10).train()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(
                model(torch.randn(4, 3, img_size, img_size)), torch.randint(0, 10, (4,)))
        loss.backward()
        return [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]

    step(224, False)
    assert step(64, True) == []
