"""Semantic segmentation with a CabViT backbone: a Semantic FPN head (Kirillov et al., Panoptic FPN) over its four maps.

The backbone is `timm.create_model(name, features_only=True, dynamic_img_size=True)`: NCHW maps at strides 4, 8, 16
and 32 for any input of at least 32x32, square or not, so training crops and whole test images of other sizes go
through one model. The head merges the maps top-down (FPN), brings each to stride 4 with 3x3 conv, GroupNorm,
ReLU and 2x upsampling, sums them and classifies every pixel; the logits are upsampled to the input size.

    python examples/segmentation.py    # logits of a 96x160 image and one training step on a synthetic mask
"""
from typing import Any, List, Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_cabvit  # noqa: F401  (registers the models; once installed, `import timm` does it by itself)

__all__ = ['SemanticFPN', 'cabvit_semantic_fpn']


def _conv_gn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(min(32, out_channels // 4), out_channels),
        nn.ReLU(inplace=True))


class SemanticFPN(nn.Module):
    """A timm `features_only` backbone and a Semantic FPN head: `forward(images)` gives (B, classes, H, W) logits.

    Args:
        backbone: A features_only timm model (its `feature_info` gives the channels and strides of its maps).
        num_classes: Classes per pixel.
        fpn_channels: Channels of the FPN maps.
        head_channels: Channels of the per-level branches brought to the finest stride.
        dropout: Dropout before the classifier.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, fpn_channels: int = 256, head_channels: int = 128,
                 dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        channels, strides = backbone.feature_info.channels(), backbone.feature_info.reduction()
        self.lateral = nn.ModuleList(nn.Conv2d(c, fpn_channels, 1) for c in channels)
        self.smooth = nn.ModuleList(nn.Conv2d(fpn_channels, fpn_channels, 3, padding=1) for _ in channels)
        # each level to the finest stride: one conv-GN-ReLU (+ 2x upsampling) per halving of the stride
        self.branches = nn.ModuleList()
        for stride in strides:
            steps = max(1, (stride // strides[0]).bit_length() - 1)
            self.branches.append(nn.ModuleList(
                _conv_gn_relu(fpn_channels if i == 0 else head_channels, head_channels) for i in range(steps)))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features: List[torch.Tensor] = self.backbone(x)
        laterals = [conv(f) for conv, f in zip(self.lateral, features)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down: sizes by interpolation, as odd sizes round up
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                              mode='nearest')
        finest = laterals[0].shape[-2:]
        merged = 0
        for level, (smooth, branch) in enumerate(zip(self.smooth, self.branches)):
            y = smooth(laterals[level])
            for block in branch:
                y = block(y)
                if level > 0:
                    y = F.interpolate(y, scale_factor=2.0, mode='bilinear', align_corners=False)
            merged = merged + (F.interpolate(y, size=finest, mode='bilinear', align_corners=False)
                               if y.shape[-2:] != finest else y)
        logits = self.classifier(self.dropout(merged))
        return F.interpolate(logits, size=x.shape[-2:], mode='bilinear', align_corners=False)


def cabvit_semantic_fpn(
        num_classes: int,
        model_name: str = 'cabvit_h_l1',
        out_indices: Sequence[int] = (0, 1, 2, 3),
        pretrained_backbone: bool = False,
        fpn_channels: int = 256,
        head_channels: int = 128,
        **backbone_kwargs: Any,
) -> SemanticFPN:
    """A Semantic FPN over the maps of a CabViT-H backbone at strides 4, 8, 16 and 32, for inputs of any size.

    `backbone_kwargs` go to `timm.create_model` (drop_path_rate, pretrained_cfg_overlay, ...); pass
    `dynamic_img_size=False, img_size=(H, W)` for a backbone built for one size (e.g. to export it).
    """
    backbone_kwargs.setdefault('dynamic_img_size', True)
    backbone = timm.create_model(model_name, pretrained=pretrained_backbone, features_only=True,
                                 out_indices=tuple(out_indices), **backbone_kwargs)
    return SemanticFPN(backbone, num_classes, fpn_channels=fpn_channels, head_channels=head_channels)


def main() -> None:
    torch.manual_seed(0)
    model = cabvit_semantic_fpn(num_classes=5)
    images = torch.rand(2, 3, 96, 160)
    masks = torch.randint(0, 5, (2, 96, 160))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    logits = model(images)
    loss = F.cross_entropy(logits, masks)
    loss.backward()
    optimizer.step()
    print(f'logits {tuple(logits.shape)} for images {tuple(images.shape)}, loss {loss.item():.3f}')
    model.eval()
    with torch.no_grad():
        print(f'eval at 120x200: {tuple(model(torch.rand(1, 3, 120, 200)).shape)}')


if __name__ == '__main__':
    main()
