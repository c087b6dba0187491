"""examples/detection.py: torchvision's Faster R-CNN over an FPN on a dynamic-size CabViT backbone trains and detects.

The detection transform resizes each batch to its own shape (tiny min_size/max_size here), so the backbone sees
several input shapes; a forward pre-hook records them.
"""
import math

import pytest
import torch
from support import load_example

NUM_CLASSES = 4  # background and three box colours
detection = load_example('detection')


@pytest.fixture(scope='module')
def small_detector(one_thread):
    """A small Faster R-CNN: 64 FPN channels, few proposals and RoIs, images resized to 64 px (longer side <= 128)."""
    torch.manual_seed(0)
    model = detection.cabvit_faster_rcnn(
        NUM_CLASSES, out_channels=64, min_size=64, max_size=128, rpn_pre_nms_top_n_train=200,
        rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
        rpn_batch_size_per_image=64, box_batch_size_per_image=32, box_score_thresh=0.0)
    shapes = []
    model.backbone.body.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    return model, shapes


def test_backbone_levels_and_anchors(small_detector):
    model, _ = small_detector
    assert model.backbone.body.feature_info.reduction() == [8, 16, 32]
    assert model.backbone.strides == [8, 16, 32, 64]
    assert model.rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,))
    with torch.no_grad():
        maps = model.backbone(torch.randn(1, 3, 96, 64))
    assert {k: tuple(v.shape) for k, v in maps.items()} == {
        '0': (1, 64, 12, 8), '1': (1, 64, 6, 4), '2': (1, 64, 3, 2), 'pool': (1, 64, 2, 1)}


def test_training_steps_at_several_sizes_then_detections(small_detector):
    model, shapes = small_detector
    gen = torch.Generator().manual_seed(0)
    # landscape and portrait batches: the transform makes them (64, 96) and (96, 64) after padding to 32
    batches = [detection.synthetic_detection_batch(sizes, NUM_CLASSES, generator=gen)
               for sizes in ([(80, 120), (90, 130)], [(120, 80), (130, 90)])]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    shapes.clear()
    losses = []
    for step in range(12):
        images, targets = batches[step % 2]
        loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        assert all(math.isfinite(v.item()) for v in loss_dict.values()), loss_dict
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert [s[-2:] for s in shapes] == [(64, 96), (96, 64)] * 6, shapes
    # the mean of the last four steps (two per batch) against the first four: 0.45 to 0.6 of it for seeds 0-4
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4]), losses

    model.eval()
    shapes.clear()
    images = [batches[0][0][0], batches[1][0][1]]
    with torch.no_grad():
        detections = model(images)
    assert len(shapes) == 1 and shapes[0][-2:] == (96, 96)  # one batch holding both, padded to 32
    for image, out in zip(images, detections):
        assert set(out) == {'boxes', 'scores', 'labels'}
        n = len(out['boxes'])
        assert n > 0 and out['boxes'].shape == (n, 4) and out['scores'].shape == (n,) and out['labels'].shape == (n,)
        assert torch.isfinite(out['boxes']).all() and ((out['scores'] >= 0) & (out['scores'] <= 1)).all()
        assert ((out['labels'] >= 1) & (out['labels'] < NUM_CLASSES)).all()
        h, w = image.shape[-2:]  # boxes in the coordinates of the image as given, not of the resized one
        assert (out['boxes'][:, 0::2] <= w).all() and (out['boxes'][:, 1::2] <= h).all()
        assert (out['boxes'] >= 0).all()
