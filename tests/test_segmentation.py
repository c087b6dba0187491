"""examples/segmentation.py: a Semantic FPN head over the four CabViT-H maps gives logits at the input resolution."""
import pytest
import torch
import torch.nn.functional as F
from support import load_example

NUM_CLASSES = 5
segmentation = load_example('segmentation')


@pytest.fixture(scope='module')
def model(one_thread):
    torch.manual_seed(0)
    return segmentation.cabvit_semantic_fpn(NUM_CLASSES, fpn_channels=64, head_channels=32)


def test_logits_at_input_resolution_and_one_backward(model):
    model.train()
    images, masks = torch.rand(2, 3, 96, 160), torch.randint(0, NUM_CLASSES, (2, 96, 160))
    features = model.backbone(images)
    assert [tuple(f.shape[-2:]) for f in features] == [(24, 40), (12, 20), (6, 10), (3, 5)]
    model.zero_grad()
    logits = model(images)
    assert logits.shape == (2, NUM_CLASSES, 96, 160)
    F.cross_entropy(logits, masks).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # every level of the backbone and of the head contributes
    assert all(grads[f'lateral.{i}.weight'].abs().sum() > 0 for i in range(4))
    first_conv = next(n for n in grads if n.startswith('backbone.') and n.endswith('.weight'))  # the stem's
    assert grads[first_conv].abs().sum() > 0, first_conv


@pytest.mark.parametrize('size', [(120, 200), (100, 70)])  # sizes that are no multiple of 32, either orientation
def test_other_sizes_in_eval(model, size):
    model.eval()
    with torch.no_grad():
        logits = model(torch.rand(1, 3, *size))
    assert logits.shape == (1, NUM_CLASSES, *size) and torch.isfinite(logits).all()
