"""Model zoo in plain torch: small CNNs / ResNets / a ResNeXt / MobileNetV2 for 1-D and 2-D inputs.

Every convolution is followed by a BatchNorm layer (adaptive-BN recalibration relies on it)
and every model ends in an ``nn.Linear`` classifier named ``fc``. All models are traceable
by ``torch_pruning.DependencyGraph``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["cnn1d", "resnet1d", "digits_cnn", "resnet20", "resnext20", "mobilenetv2", "ZOO"]


def _conv_bn_relu_1d(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Conv1d (no bias) + BatchNorm1d + ReLU with 'same'-style padding."""
    return nn.Sequential(
        nn.Conv1d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm1d(cout),
        nn.ReLU(inplace=True),
    )


def _conv_bn_relu_2d(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Conv2d (no bias) + BatchNorm2d + ReLU with 'same'-style padding."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _Classifier(nn.Module):
    """Generic ``features -> pool -> flatten -> fc`` network."""

    def __init__(self, features: nn.Module, pool: nn.Module, fc: nn.Linear) -> None:
        super().__init__()
        self.features = features
        self.pool = pool
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.pool(x)
        return self.fc(torch.flatten(x, 1))


def cnn1d(in_channels: int = 1, num_classes: int = 10, width: int = 32) -> nn.Module:
    """4-layer Conv1d+BN+ReLU network with global average pooling for MNIST-1D (N, C, 40)."""
    w = width
    features = nn.Sequential(
        _conv_bn_relu_1d(in_channels, w, 5),
        _conv_bn_relu_1d(w, 2 * w, 3, stride=2),
        _conv_bn_relu_1d(2 * w, 2 * w, 3),
        _conv_bn_relu_1d(2 * w, 4 * w, 3, stride=2),
    )
    return _Classifier(features, nn.AdaptiveAvgPool1d(1), nn.Linear(4 * w, num_classes))


class _BasicBlock1d(nn.Module):
    """1-D ResNet basic block; shortcut is 1x1 Conv1d + BN whenever the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv1d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv1d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm1d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def resnet1d(
    in_channels: int = 1,
    num_classes: int = 10,
    width: int = 32,
    blocks: tuple[int, ...] = (2, 2, 2),
) -> nn.Module:
    """1-D ResNet (stages of BasicBlocks, widths w*2^i, stride 2 after the first stage)."""
    layers: list[nn.Module] = [_conv_bn_relu_1d(in_channels, width, 5)]
    cin = width
    for i, n in enumerate(blocks):
        cout = width * 2**i
        for j in range(n):
            stride = 2 if (i > 0 and j == 0) else 1
            layers.append(_BasicBlock1d(cin, cout, stride))
            cin = cout
    return _Classifier(nn.Sequential(*layers), nn.AdaptiveAvgPool1d(1), nn.Linear(cin, num_classes))


def digits_cnn(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> nn.Module:
    """Small Conv2d+BN+ReLU network with max pooling for 8x8 sklearn digits."""
    w = width
    features = nn.Sequential(
        _conv_bn_relu_2d(in_channels, w, 3),
        _conv_bn_relu_2d(w, w, 3),
        nn.MaxPool2d(2, ceil_mode=True),
        _conv_bn_relu_2d(w, 2 * w, 3),
        _conv_bn_relu_2d(2 * w, 2 * w, 3),
        nn.MaxPool2d(2, ceil_mode=True),
    )
    return _Classifier(features, nn.AdaptiveAvgPool2d(1), nn.Linear(2 * w, num_classes))


class _BasicBlock2d(nn.Module):
    """2-D ResNet basic block; projection shortcut (1x1 conv + BN) where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = _shortcut_2d(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _shortcut_2d(cin: int, cout: int, stride: int) -> nn.Module:
    """Identity, or a projection (1x1 conv + BN) where the block changes the shape."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class _CifarResNet(nn.Module):
    """CIFAR-style residual body: stem, 3 stages of `depth` blocks (widths w/2w/4w, strides 1/2/2), pool, fc.
    `block(cin, cout, stride)` builds one residual block (ResNet-20's basic block, ResNeXt-20's bottleneck)."""

    def __init__(self, in_channels: int, num_classes: int, width: int, depth: int,
                 block: Callable[[int, int, int], nn.Module]) -> None:
        super().__init__()
        self.stem = _conv_bn_relu_2d(in_channels, width, 3)
        stages: list[nn.Module] = []
        cin = width
        for i, stride in enumerate((1, 2, 2)):
            cout = width * 2**i
            blocks = []
            for j in range(depth):
                blocks.append(block(cin, cout, stride if j == 0 else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet20(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> nn.Module:
    """CIFAR-style ResNet-20 (3x3 BasicBlocks, widths w/2w/4w, strides 1/2/2); any size >= 8x8."""
    return _CifarResNet(in_channels, num_classes, width, 3, _BasicBlock2d)


class _ResNeXtBlock2d(nn.Module):
    """ResNeXt bottleneck: 1x1 -> 3x3 grouped (``cardinality`` conv groups, not depthwise, carries the stride) -> 1x1,
    with a residual add; projection shortcut (1x1 conv + BN) where the shape changes."""

    def __init__(self, cin: int, mid: int, cout: int, cardinality: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut_2d(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


def resnext20(in_channels: int = 1, num_classes: int = 10, width: int = 16, cardinality: int = 4) -> nn.Module:
    """CIFAR-style ResNeXt-20: 2 bottleneck blocks per stage (1x1 -> 3x3 grouped with ``cardinality`` conv groups ->
    1x1), block widths w/2w/4w, grouped widths 3x that, strides 1/2/2; about resnet20's MACs; any size >= 8x8."""
    if cardinality < 1:
        raise ValueError(f"cardinality must be >= 1, got {cardinality}")

    def block(cin: int, cout: int, stride: int) -> nn.Module:
        # grouped width 3x the block output, a multiple of the cardinality: about resnet20's MACs
        mid = -(-3 * cout // cardinality) * cardinality
        return _ResNeXtBlock2d(cin, mid, cout, cardinality, stride)

    return _CifarResNet(in_channels, num_classes, width, 2, block)


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` (MobileNet convention)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class _InvertedResidual(nn.Module):
    """MobileNetV2 block: [1x1 expand] -> 3x3 depthwise -> 1x1 linear projection (+ residual)."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = cin * expand_ratio
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res else out


# (expand_ratio, channels, repeats, first stride); total stride 4 so 8x8 inputs end at 2x2.
_MBV2_CFG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 2, 2),
    (6, 64, 1, 1),
)


class _MobileNetV2(nn.Module):
    """Small MobileNetV2-style network."""

    def __init__(self, in_channels: int, num_classes: int, width_mult: float) -> None:
        super().__init__()
        stem_c = _make_divisible(16 * width_mult)
        last_c = _make_divisible(128 * max(1.0, width_mult))
        layers: list[nn.Module] = [
            nn.Sequential(
                nn.Conv2d(in_channels, stem_c, 3, padding=1, bias=False),
                nn.BatchNorm2d(stem_c),
                nn.ReLU6(inplace=True),
            )
        ]
        cin = stem_c
        for t, c, n, s in _MBV2_CFG:
            cout = _make_divisible(c * width_mult)
            for j in range(n):
                layers.append(_InvertedResidual(cin, cout, s if j == 0 else 1, t))
                cin = cout
        layers.append(
            nn.Sequential(nn.Conv2d(cin, last_c, 1, bias=False), nn.BatchNorm2d(last_c), nn.ReLU6(inplace=True))
        )
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last_c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def mobilenetv2(in_channels: int = 1, num_classes: int = 10, width_mult: float = 1.0) -> nn.Module:
    """Small MobileNetV2-style net (6 inverted residual blocks, total stride 4); any size >= 8x8."""
    return _MobileNetV2(in_channels, num_classes, width_mult)


ZOO: dict[str, Callable[..., nn.Module]] = {
    "cnn1d": cnn1d,
    "resnet1d": resnet1d,
    "digits_cnn": digits_cnn,
    "resnet20": resnet20,
    "resnext20": resnext20,
    "mobilenetv2": mobilenetv2,
}
