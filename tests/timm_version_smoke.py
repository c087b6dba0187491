"""Smoke test of the package against whichever timm comes first on sys.path.

Run by tests/test_timm_versions.py with the oldest supported timm in front of the installed one; by hand:

    pip install --no-deps --target /tmp/timm-1.0.31 timm==1.0.31
    PYTHONPATH=/tmp/timm-1.0.31 python tests/timm_version_smoke.py

Every model at 64x64: creation (also on the meta device), forward, features_only, forward_intermediates,
reset_classifier, set_input_size, a training step with timm's optimizer factory, BatchNorm folding, and a
checkpoint loaded through timm's pretrained-file path into another size. Prints one JSON line.
"""
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> dict:
    start = time.perf_counter()
    import timm
    from timm.optim import create_optimizer_v2
    from timm.utils import reparameterize_model

    import timm_cabvit

    torch.manual_seed(0)
    torch.set_num_threads(1)
    x = torch.randn(2, 3, 64, 64)
    checks = []
    names = sorted(timm.list_models('cabvit*'))
    assert names == ['cabvit_h_l1', 'cabvit_h_l2', 'cabvit_h_l3', 'cabvit_p_l0'], names
    for name in names:
        model = timm.create_model(name, num_classes=5, img_size=64).eval()
        with torch.no_grad():
            out = model(x)
            assert out.shape == (2, 5) and out.isfinite().all(), (name, out.shape)
            final, intermediates = model.forward_intermediates(x)
            assert len(intermediates) == len(model.feature_info), name
            model.reset_classifier(3)
            assert model(x).shape == (2, 3), name
        backbone = timm.create_model(name, features_only=True, img_size=64).eval()
        with torch.no_grad():
            features = backbone(x)
        assert [f.shape[1] for f in features] == backbone.feature_info.channels(), name
        meta = timm.create_model(name, device='meta')
        assert all(p.is_meta for p in meta.parameters()), name
        checks.append(name)

    model = timm.create_model('cabvit_h_l1', num_classes=4, img_size=64, drop_path_rate=0.1).train()
    model.set_grad_checkpointing(True)
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05)
    target = torch.randint(0, 4, (2,))
    loss = torch.nn.functional.cross_entropy(model(x), target)
    optimizer.zero_grad()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    optimizer.step()
    checks.append('train_step')

    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'checkpoint.pth'
        torch.save(model.state_dict(), path)
        loaded = timm.create_model('cabvit_h_l1', num_classes=4, img_size=96, pretrained=True,
                                   pretrained_cfg_overlay=dict(file=str(path), num_classes=4)).eval()
    loaded.set_input_size(64)
    with torch.no_grad():
        diff = (loaded(x) - model(x)).abs().max().item()
        folded = reparameterize_model(model)
        fold_diff = (folded(x) - loaded(x)).abs().max().item()
    assert diff < 1e-4 and fold_diff < 1e-3, (diff, fold_diff)
    checks.append('checkpoint_resample_and_reparameterize')
    return {
        'timm': timm.__version__, 'timm_file': timm.__file__, 'timm_cabvit': timm_cabvit.__version__,
        'torch': torch.__version__, 'checks': checks, 'seconds': round(time.perf_counter() - start, 1)}


if __name__ == '__main__':
    print(json.dumps(main()))
    sys.exit(0)
