"""User-style models for the engine tests: what a user's `package.module:callable` might return.

Each factory takes no required arguments and returns a freshly initialised `nn.Module` whose classifier
is the last layer. INPUT_SHAPES gives one sample's shape per factory.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _cbr2(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class ConcatResNet2d(nn.Module):
    """Residual adds, a channel concatenation (torch.cat of two branches), a depthwise conv, a Linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _cbr2(1, 16)
        self.block_a = _cbr2(16, 16)
        self.block_b = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        self.branch1 = _cbr2(16, 8, 1)
        self.branch2 = _cbr2(16, 12, 3)
        self.dw = _cbr2(20, 20, 3, stride=2, groups=20)  # depthwise over the concatenation
        self.proj = _cbr2(20, 24, 1)
        self.head = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.block_b(self.block_a(x)))  # residual add couples stem and block_b
        x = torch.cat([self.branch1(x), self.branch2(x)], dim=1)
        x = self.proj(self.dw(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class GroupedConvNet(nn.Module):
    """A grouped (non-depthwise) convolution with 4 conv groups between two plain convs."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = _cbr2(1, 16)
        self.grouped = _cbr2(16, 16, 3, groups=4)
        self.conv3 = _cbr2(16, 32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3(self.grouped(self.conv1(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _ResNeXtBlock(nn.Module):
    """1x1 -> grouped 3x3 (`cardinality` conv groups) -> 1x1, with a residual add (a projection when the shape changes)."""

    def __init__(self, cin: int, width: int, cout: int, cardinality: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _cbr2(cin, width, 1)
        self.conv2 = _cbr2(width, width, 3, stride, groups=cardinality)
        self.conv3 = nn.Sequential(nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.short(x) + self.conv3(self.conv2(self.conv1(x))))


class ResNeXtNet(nn.Module):
    """ResNeXt-style: bottleneck blocks whose 3x3 convs are grouped (4 conv groups, not depthwise), two stages."""

    def __init__(self, num_classes: int = 10, cardinality: int = 4) -> None:
        super().__init__()
        self.stem = _cbr2(1, 16)
        self.layer1 = nn.Sequential(_ResNeXtBlock(16, 16, 32, cardinality), _ResNeXtBlock(32, 16, 32, cardinality))
        self.layer2 = nn.Sequential(_ResNeXtBlock(32, 32, 64, cardinality, stride=2), _ResNeXtBlock(64, 32, 64, cardinality))
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DenseNetLike(nn.Module):
    """DenseNet-style: each layer's BatchNorm sees the torch.cat of the stem and every earlier layer's channels."""

    def __init__(self, num_classes: int = 10, growth: int = 6, layers: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 5, 3, padding=1, bias=False)
        c = 5
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, growth, 3, padding=1, bias=False)))
            c += growth
        self.norm = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [self.stem(x)]
        for block in self.blocks:
            feats.append(block(torch.cat(feats, 1)))
        x = F.relu(self.norm(torch.cat(feats, 1)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ConcatResNet1d(nn.Module):
    """Conv1d with a residual add, a concatenation and a flatten into a Linear layer (no global pooling)."""

    def __init__(self, num_classes: int = 10, length: int = 40) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv1d(1, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv1d(16, 16, 3, padding=1), nn.BatchNorm1d(16))
        self.left = nn.Sequential(nn.Conv1d(16, 8, 3, stride=2, padding=1), nn.BatchNorm1d(8), nn.ReLU())
        self.right = nn.Sequential(nn.Conv1d(16, 8, 3, stride=2, padding=1), nn.BatchNorm1d(8), nn.ReLU())
        self.fc1 = nn.Linear(16 * (length // 2), 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = F.relu(x + self.conv2(x))
        x = torch.cat([self.left(x), self.right(x)], dim=1)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class MHABlockNet(nn.Module):
    """Patch embedding (Conv1d), a pre-norm transformer block with nn.MultiheadAttention, a Linear head."""

    def __init__(self, num_classes: int = 10, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv1d(1, dim, 4, stride=4)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).transpose(1, 2)  # (N, L, dim)
        h = self.norm1(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        t = t + self.mlp(self.norm2(t))
        return self.head(t.mean(1))


class SDPABlockNet(nn.Module):
    """Hand-written q/k/v Linear attention through F.scaled_dot_product_attention, an MLP, a Linear head."""

    def __init__(self, num_classes: int = 10, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(8, dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        t = self.embed(x.reshape(n, -1, 8))  # (N, L, dim): 40 samples -> 5 tokens of 8
        split = lambda z: z.reshape(n, z.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(self.q(t)), split(self.k(t)), split(self.v(t)))
        t = t + self.o(a.transpose(1, 2).reshape(n, t.shape[1], -1))
        t = t + self.mlp(t)
        return self.head(t.mean(1))


class UNet(nn.Module):
    """A small segmentation UNet: two down steps, transposed-conv up steps, skips concatenated with the upsampled
    features, a per-pixel 4-class output (the output keeps the input's spatial size)."""

    def __init__(self) -> None:
        super().__init__()
        self.e1, self.e2, self.e3 = _cbr2(1, 8), _cbr2(8, 16), _cbr2(16, 32)
        self.pool = nn.MaxPool2d(2)
        self.up2, self.d2 = nn.ConvTranspose2d(32, 16, 2, stride=2), _cbr2(32, 16)
        self.up1, self.d1 = nn.ConvTranspose2d(16, 8, 2, stride=2), _cbr2(16, 8)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.e1(x)
        b = self.e2(self.pool(a))
        c = self.e3(self.pool(b))
        d = self.d2(torch.cat([self.up2(c), b], 1))
        return self.out(self.d1(torch.cat([self.up1(d), a], 1)))


FACTORIES = {
    "concat_resnet2d": ConcatResNet2d,
    "grouped_conv": GroupedConvNet,
    "resnext": ResNeXtNet,
    "densenet": DenseNetLike,
    "concat_resnet1d": ConcatResNet1d,
    "mha_block": MHABlockNet,
    "sdpa_block": SDPABlockNet,
    "unet": UNet,
}
INPUT_SHAPES = {
    "concat_resnet2d": (1, 8, 8),
    "grouped_conv": (1, 8, 8),
    "resnext": (1, 8, 8),
    "densenet": (1, 8, 8),
    "concat_resnet1d": (1, 40),
    "mha_block": (1, 40),
    "sdpa_block": (1, 40),
    "unet": (1, 8, 8),
}
