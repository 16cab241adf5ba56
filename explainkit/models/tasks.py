"""Small default models for the tasks beyond classification, on explainkit's ResNet18 trunk.

Both keep the trunk's module names (``conv1``, ``layer1`` ... ``layer4``) so that explanations
name the same layers as on the classifier:

- ``fcn-s8`` (segmentation): the resnet18-s8 trunk (stride 4), a 3x3 + 1x1 convolution head
  (an FCN head) and bilinear upsampling to the input: (N, classes, H, W) logits, class 0 the
  background.
- ``fcos-s8`` (detection): torchvision's FCOS on the same trunk, one feature level at stride 4
  projected to a multiple of 32 channels (its heads use GroupNorm of 32 groups), with its own
  losses. Images are neither resized nor normalized by it: explainkit normalizes them, and
  the model sees them at ``--image-size``. ``num_classes`` is the dataset's; the background
  class torchvision detectors need is added inside, so labels stay 0..K-1 outside.
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

from explainkit.models.resnet import resnet18_s8
from explainkit.task_eval import MAX_DETECTIONS


class Trunk(nn.Module):
    """resnet18-s8 without its pooled classifier head: features at stride 4."""

    def __init__(self, width: int) -> None:
        super().__init__()
        net = resnet18_s8(1, width)
        self.conv1, self.bn1, self.relu = net.conv1, net.bn1, net.relu
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        self.channels = 8 * width

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(out))))


class SegmentationNet(nn.Module):
    """The trunk, an FCN head and bilinear upsampling: per-pixel class logits."""

    def __init__(self, num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.backbone = Trunk(width)
        c = self.backbone.channels
        self.head = nn.Sequential(
            nn.Conv2d(c, c // 2, 3, padding=1, bias=False),
            nn.BatchNorm2d(c // 2),
            nn.ReLU(),
            nn.Conv2d(c // 2, num_classes, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.head(self.backbone(x))
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


class _FeatureLevels(nn.Module):
    """The trunk as a torchvision detection backbone: one level, ``out_channels`` wide."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = Trunk(width)
        self.out_channels = min(256, 32 * max(1, width // 16))
        self.neck = nn.Conv2d(self.body.channels, self.out_channels, 1)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return OrderedDict([("0", self.neck(self.body(x)))])


def segmentation_net(num_classes: int, width: int = 64) -> SegmentationNet:
    return SegmentationNet(num_classes, width)


def fcos_net(num_classes: int, width: int = 64, image_size: int = 64) -> nn.Module:
    """torchvision FCOS on the trunk for ``num_classes`` dataset classes (plus background)."""
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    backbone = _FeatureLevels(width)
    return FCOS(
        backbone,
        num_classes + 1,
        min_size=image_size,
        max_size=image_size,
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
        anchor_generator=AnchorGenerator(sizes=((8,),), aspect_ratios=((1.0,),)),
        score_thresh=0.05,
        detections_per_img=MAX_DETECTIONS,
    )
