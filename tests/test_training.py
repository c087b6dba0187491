"""Training set-ups beyond one process: DDP on CPU, SyncBatchNorm conversion, torch.compile."""
import json
import os
import subprocess
import sys
from pathlib import Path

import timm
import torch

REPO = Path(__file__).resolve().parents[1]


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
