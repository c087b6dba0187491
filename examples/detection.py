"""Object detection with a CabViT backbone: torchvision's Faster R-CNN over an FPN on the last three CabViT-H stages.

The backbone is `timm.create_model(name, features_only=True, dynamic_img_size=True, out_indices=(1, 2, 3))`: NCHW maps
at strides 8, 16 and 32 for any input of at least 32x32, so it takes the batches torchvision's detection transform
makes (each image resized to `min_size`/`max_size`, the batch padded to a multiple of 32, a new shape per batch).
An FPN (torchvision's `FeaturePyramidNetwork`, one more level by max pooling) turns them into `out_channels` maps at
strides 8 to 64, with one anchor size per level and RoI pooling over the three CabViT levels.

    python examples/detection.py    # a few training steps on synthetic images, then the detections of one

For real training, start from ImageNet weights (`pretrained_backbone=True` with `backbone_kwargs=dict(
pretrained_cfg_overlay=dict(file='/path/to/weights.safetensors'))` for a checkpoint file, or alone once weights are
published) and keep torchvision's usual sizes (800/1333).
The backbone's BatchNorm layers then see detection batches of a few images: with several GPUs, convert them with
`torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)`. `model.backbone.body.model.set_grad_checkpointing(True)`
saves memory at large sizes.
"""
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

import timm_cabvit  # noqa: F401  (registers the models; once installed, `import timm` does it by itself)

__all__ = ['TimmBackboneWithFPN', 'cabvit_faster_rcnn', 'synthetic_detection_batch']


class TimmBackboneWithFPN(nn.Module):
    """A timm `features_only` model and an FPN over its maps, as torchvision's detection models take a backbone.

    Like torchvision's `BackboneWithFPN`: `forward(images)` gives an OrderedDict of NCHW maps ('0', '1', ... for the
    backbone's levels, 'pool' for the extra one), all with `out_channels` channels.
    """

    def __init__(self, body: nn.Module, out_channels: int = 256):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        self.level_names = [str(i) for i in range(len(body.feature_info.channels()))]
        self.strides = [*body.feature_info.reduction(), 2 * body.feature_info.reduction()[-1]]  # 'pool' included

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.fpn(OrderedDict(zip(self.level_names, self.body(x))))


def cabvit_faster_rcnn(
        num_classes: int,
        model_name: str = 'cabvit_h_l1',
        out_indices: Sequence[int] = (1, 2, 3),
        out_channels: int = 256,
        min_size: int = 800,
        max_size: int = 1333,
        anchor_sizes: Optional[Sequence[int]] = None,
        pretrained_backbone: bool = False,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
) -> FasterRCNN:
    """torchvision's Faster R-CNN with a CabViT-H backbone and an FPN.

    Args:
        num_classes: Classes, background included (torchvision's convention).
        model_name: A CabViT-H model (strides 4 to 32; CabViT-P is plain, one stride 16 map).
        out_indices: The backbone stages the FPN takes: (1, 2, 3) are strides 8, 16, 32.
        out_channels: Channels of the FPN maps and of the RoI features.
        min_size, max_size: The detection transform's resizing: shorter side, cap on the longer side.
        anchor_sizes: One anchor size per FPN level; default 4x the level's stride (32 to 256 for strides 8 to 64).
        pretrained_backbone: Load the backbone's ImageNet weights (timm's `pretrained=True`).
        backbone_kwargs: More `timm.create_model` arguments for the backbone (drop_path_rate, pretrained_cfg_overlay).
        **kwargs: Passed to `FasterRCNN` (rpn_* and box_* settings, size_divisible, ...).
    """
    body = timm.create_model(model_name, pretrained=pretrained_backbone, features_only=True, dynamic_img_size=True,
                             out_indices=tuple(out_indices), **(backbone_kwargs or {}))
    backbone = TimmBackboneWithFPN(body, out_channels)
    sizes = anchor_sizes or [4 * stride for stride in backbone.strides]
    if len(sizes) != len(backbone.strides):
        raise ValueError(f'{len(sizes)} anchor sizes for {len(backbone.strides)} FPN levels; give one per level.')
    anchors = AnchorGenerator(tuple((size,) for size in sizes), ((0.5, 1.0, 2.0),) * len(sizes))
    roi_pool = MultiScaleRoIAlign(featmap_names=backbone.level_names, output_size=7, sampling_ratio=2)
    cfg = body.pretrained_cfg
    return FasterRCNN(
        backbone, num_classes=num_classes, min_size=min_size, max_size=max_size, image_mean=list(cfg['mean']),
        image_std=list(cfg['std']), rpn_anchor_generator=anchors, box_roi_pool=roi_pool, **kwargs)


def synthetic_detection_batch(
        sizes: Sequence[Tuple[int, int]],
        num_classes: int,
        boxes_per_image: int = 2,
        generator: Optional[torch.Generator] = None,
) -> Tuple[List[torch.Tensor], List[Dict[str, torch.Tensor]]]:
    """Images (0-1, of the given (H, W) sizes) of noise with filled rectangles, one colour per class, and targets.

    The boxes have random sizes, from an eighth to half of the image side.
    """
    images, targets = [], []
    for h, w in sizes:
        image = torch.rand(3, h, w, generator=generator) * 0.3
        boxes, labels = [], []
        for _ in range(boxes_per_image):
            bh, bw = (int(torch.randint(s // 8, s // 2 + 1, (1,), generator=generator)) for s in (h, w))
            y0 = int(torch.randint(0, h - bh + 1, (1,), generator=generator))
            x0 = int(torch.randint(0, w - bw + 1, (1,), generator=generator))
            label = int(torch.randint(1, num_classes, (1,), generator=generator))
            colour = torch.zeros(3)
            colour[(label - 1) % 3] = 1.0
            image[:, y0:y0 + bh, x0:x0 + bw] = colour[:, None, None]
            boxes.append([x0, y0, x0 + bw, y0 + bh])
            labels.append(label)
        images.append(image)
        targets.append(dict(boxes=torch.tensor(boxes, dtype=torch.float32), labels=torch.tensor(labels)))
    return images, targets


def main() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = cabvit_faster_rcnn(num_classes=4, min_size=128, max_size=256)
    batches = [synthetic_detection_batch(sizes, 4, generator=gen)
               for sizes in ([(120, 160), (150, 200)], [(200, 130), (160, 120)])]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    model.train()
    for step in range(6):
        images, targets = batches[step % len(batches)]
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f'step {step}: loss {loss.item():.3f} ({", ".join(f"{k} {v.item():.3f}" for k, v in losses.items())})')
    model.eval()
    with torch.no_grad():
        detections = model(batches[0][0][:1])[0]
    print(f"{len(detections['boxes'])} detections; top 3: boxes {detections['boxes'][:3].tolist()}, "
          f"scores {detections['scores'][:3].tolist()}, labels {detections['labels'][:3].tolist()}")


if __name__ == '__main__':
    main()
