"""A hand-written classifier for tests/test_evaluate.py (importable: tests is a package)."""

from __future__ import annotations

from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))


def tiny_net(num_classes: int) -> TinyNet:
    return TinyNet(num_classes)
