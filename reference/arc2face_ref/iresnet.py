"""IResNet (the ArcFace backbone) in torch, written from the architecture of insightface's arcface_torch
`backbones/iresnet.py`; module names match it, so its checkpoints load with load_state_dict.

Layout (Deng et al., ArcFace; "improved" pre-activation ResNet of Duta et al.):
    input [B, 3, 112, 112], RGB scaled to (x − 127.5)/127.5
    conv3x3(3→64) · BN · PReLU
    4 stages of IBasicBlocks, each stage halves the resolution: 112 → 56 → 28 → 14 → 7,
        widths 64, 128, 256, 512; IResNet-100 has [3, 13, 30, 3] blocks
    IBasicBlock: BN · conv3x3 · BN · PReLU · conv3x3(stride) · BN, plus the shortcut
        (identity, or conv1x1(stride) · BN when the shape changes); no activation after the sum
    BN2d(512) · flatten [B, 512·7·7] · dropout · Linear(25088 → 512) · BN1d(512)   ("features")
    output: the raw 512-d embedding (normalised by the caller)
"""
from __future__ import annotations

import math

import torch
from torch import nn

BN_EPS = 1e-5


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=BN_EPS)
        self.conv1 = conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.prelu = nn.PReLU(cout)
        self.conv2 = conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout, eps=BN_EPS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return y + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """x: [B, 3, 112, 112] normalised RGB → [B, num_features] raw embedding."""

    def __init__(self, layers=(3, 13, 30, 3), widths=(64, 128, 256, 512), num_features: int = 512,
                 dropout: float = 0.0, input_size: int = 112):
        super().__init__()
        self.conv1 = conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0], eps=BN_EPS)
        self.prelu = nn.PReLU(widths[0])
        cin = widths[0]
        for i, (n, w) in enumerate(zip(layers, widths)):
            blocks = [IBasicBlock(cin, w, stride=2)] + [IBasicBlock(w, w) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = w
        self.bn2 = nn.BatchNorm2d(cin, eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        side = input_size // 2 ** len(layers)                   # 112 / 16 = 7
        self.fc = nn.Linear(cin * side * side, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))                 # [B, 64, 112, 112]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))   # [B, 512, 7, 7]
        x = torch.flatten(self.bn2(x), 1)                       # [B, 25088]
        return self.features(self.fc(self.dropout(x)))          # [B, 512]


def iresnet100(**kw) -> IResNet:
    return IResNet(layers=(3, 13, 30, 3), **kw)


def iresnet_tiny(**kw) -> IResNet:
    """Same I/O as IResNet-100 (112x112 → 512), one narrow block per stage: for fast tests."""
    return IResNet(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), **kw)


@torch.no_grad()
def randomize_(model: IResNet, generator: torch.Generator) -> IResNet:
    """Random weights that keep activations finite and O(1) through 100 layers (so exports are testable):
    He-normal convolutions, residual branches damped by their last BN, random BN statistics."""
    def normal(t, std, mean=0.0):
        t.copy_(torch.randn(t.shape, generator=generator) * std + mean)

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            normal(m.weight, math.sqrt(2.0 / fan_in))
            if m.bias is not None:
                normal(m.bias, 0.01)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            normal(m.weight, 0.1, 1.0)
            normal(m.bias, 0.1)
            normal(m.running_mean, 0.1)
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=generator))
        elif isinstance(m, nn.PReLU):
            m.weight.fill_(0.25)
    for m in model.modules():
        if isinstance(m, IBasicBlock):     # residual branch starts small, as zero-init-residual training does
            normal(m.bn3.weight, 0.05, 0.2)
    return model
