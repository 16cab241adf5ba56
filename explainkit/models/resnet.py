"""ResNet18 for small images (He et al. 2016, "Deep Residual Learning", arXiv:1512.03385).

Two CIFAR variants share one definition:

* ``resnet18-s8`` (the seed's model): 3x3 stem, stages of 64/128/256/512 channels with strides
  1, 2, 2, **1**, so the last stage keeps an 8x8 map; pooling to 2x2 gives a 2048-wide head.
  11,189,322 parameters for 10 classes.
* ``resnet18``: the common CIFAR ResNet18 (last stride 2, global average pooling): 11,173,962.

Submodules are named ``conv1, bn1, layer1..layer4, pool, linear``; ReLUs are modules (not
in-place) so forward hooks and attribution methods can see them.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["BasicBlock", "ResNet", "resnet18", "resnet18_s8"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual shortcut (1x1 projection when the shape changes)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem without max-pool, four stages, pooled linear head."""

    default_target_layer = "layer4"

    def __init__(
        self,
        num_blocks: tuple[int, ...] = (2, 2, 2, 2),
        num_classes: int = 10,
        width: int = 64,
        last_stride: int = 2,
        pool_size: int = 1,
    ) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        in_planes = width
        stages = []
        for planes, blocks, stride in zip(widths, num_blocks, (1, 2, 2, last_stride), strict=True):
            layers = []
            for s in [stride] + [1] * (blocks - 1):
                layers.append(BasicBlock(in_planes, planes, s))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        # Adaptive pooling equals the seed's avg_pool2d(4) on 32x32 inputs, and still works
        # for other input sizes (ImageFolder data resized to 64, say).
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(widths[3] * pool_size * pool_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.flatten(self.pool(out)))


def resnet18_s8(num_classes: int = 10, width: int = 64) -> ResNet:
    """The seed's ResNet18: last stage at stride 1 (8x8 maps), 2x2 pooled 2048-wide head."""
    return ResNet((2, 2, 2, 2), num_classes, width, last_stride=1, pool_size=2)


def resnet18(num_classes: int = 10, width: int = 64) -> ResNet:
    """The common CIFAR ResNet18: last stage at stride 2, global average pooling."""
    return ResNet((2, 2, 2, 2), num_classes, width, last_stride=2, pool_size=1)
