"""A gallery of tiny "foreign" CNN classifiers built from plain ``torch.nn``.

These models exercise architectural patterns that compression code must cope
with: residual additions, grouped / depthwise convolutions, concatenations,
channel shuffles, squeeze-excitation gating, layers defined but unused in
``forward``, classifiers without ``nn.Linear``, dict outputs and auxiliary
heads.  Every model takes ``in_channels`` (1 for 28x28 inputs, 3 for 32x32
inputs) and ``num_classes`` and is small enough that a forward+backward pass
on a batch of 32 takes milliseconds on a CPU.

``GALLERY`` maps a short name to each model class.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn(cin, cout, k=3, stride=1, groups=1, relu=True):
    """Conv (no bias) + BatchNorm (+ ReLU) as an ``nn.Sequential``."""
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class VGGNet(nn.Module):
    """Plain conv-BN-ReLU stacks with max-pooling, dropout and a linear head."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(in_channels, 8), conv_bn(8, 8), nn.MaxPool2d(2),
            conv_bn(8, 16), conv_bn(16, 16), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(16 * 4, 32),
            nn.ReLU(inplace=True), nn.Dropout(0.2), nn.Linear(32, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 projection shortcut when the shape changes."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3, relu=False)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = conv_bn(cin, cout, 1, stride, relu=False)

    def forward(self, x):
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNet(nn.Module):
    """Residual network: stem, identity block, strided projection block (``block``: their kind)."""

    block = BasicBlock

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.stem = conv_bn(in_channels, 8)
        self.layer1 = self.block(8, 8)
        self.layer2 = self.block(8, 16, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def features(self, x):
        return torch.flatten(self.pool(self.layer2(self.layer1(self.stem(x)))), 1)

    def forward(self, x):
        return self.fc(self.features(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: optional 1x1 expand, depthwise 3x3, 1x1 project.

    With ``expand_ratio == 1`` the ``expand`` conv is still defined but
    skipped in ``forward`` (as in MobileNetV2's first block).
    """

    def __init__(self, cin, cout, stride=1, expand_ratio=1):
        super().__init__()
        hidden = cin * expand_ratio
        self.expand_ratio = expand_ratio
        self.expand = conv_bn(cin, hidden, 1)
        self.depthwise = conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.project = conv_bn(hidden, cout, 1, relu=False)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.expand(x) if self.expand_ratio != 1 else x
        out = self.project(self.depthwise(out))
        return x + out if self.use_residual else out


class MobileNet(nn.Module):
    """Depthwise-separable blocks plus inverted residuals (one unused expand)."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.stem = conv_bn(in_channels, 8, stride=2)
        self.blocks = nn.Sequential(
            InvertedResidual(8, 8, expand_ratio=1),      # expand unused
            InvertedResidual(8, 16, stride=2, expand_ratio=2),
            InvertedResidual(16, 16, expand_ratio=2),
        )
        self.head = conv_bn(16, 32, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class ResNeXtBlock(nn.Module):
    """Bottleneck block with a grouped 3x3 convolution (cardinality 4)."""

    def __init__(self, cin, cout, stride=1, groups=4):
        super().__init__()
        width = cout
        self.reduce = conv_bn(cin, width, 1)
        self.grouped = conv_bn(width, width, 3, stride, groups=groups)
        self.restore = conv_bn(width, cout, 1, relu=False)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = conv_bn(cin, cout, 1, stride, relu=False)

    def forward(self, x):
        out = self.restore(self.grouped(self.reduce(x)))
        return F.relu(out + self.shortcut(x))


class ResNeXt(nn.Module):
    """Residual network of grouped-convolution bottleneck blocks."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.stem = conv_bn(in_channels, 16, stride=2)
        self.layer1 = ResNeXtBlock(16, 16)
        self.layer2 = ResNeXtBlock(16, 32, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class InceptionBlock(nn.Module):
    """Parallel 1x1, 3x3 and pool+1x1 branches joined by ``torch.cat``."""

    def __init__(self, cin, c1, c3, cp):
        super().__init__()
        self.branch1 = conv_bn(cin, c1, 1)
        self.branch3 = nn.Sequential(conv_bn(cin, c3, 1), conv_bn(c3, c3, 3))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, cp, 1))
        self.out_channels = c1 + c3 + cp

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch3(x), self.branch_pool(x)], 1)


class Inception(nn.Module):
    """Two inception blocks separated by max-pooling."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.stem = conv_bn(in_channels, 16, stride=2)
        self.block1 = InceptionBlock(16, 8, 8, 8)
        self.pool1 = nn.MaxPool2d(2)
        self.block2 = InceptionBlock(24, 8, 16, 8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.block2(self.pool1(self.block1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class DenseLayer(nn.Module):
    """BN-ReLU-conv layer whose output is concatenated onto its input."""

    def __init__(self, cin, growth):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


def dense_block(cin, growth, n):
    """``n`` dense layers; returns the block and its output channel count."""
    layers = [DenseLayer(cin + i * growth, growth) for i in range(n)]
    return nn.Sequential(*layers), cin + n * growth


class DenseNet(nn.Module):
    """Dense blocks with 1x1-conv + avg-pool transitions."""

    def __init__(self, in_channels=1, num_classes=10, growth=8):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, 2, 1, bias=False)
        self.block1, c = dense_block(16, growth, 2)
        self.transition = nn.Sequential(
            nn.BatchNorm2d(c), nn.ReLU(inplace=True),
            nn.Conv2d(c, 16, 1, bias=False), nn.AvgPool2d(2),
        )
        self.block2, c = dense_block(16, growth, 2)
        self.norm = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.block2(self.transition(self.block1(self.stem(x))))
        x = F.adaptive_avg_pool2d(F.relu(self.norm(x)), 1)
        return self.fc(torch.flatten(x, 1))


class SqueezeExcite(nn.Module):
    """Global pool, 1x1 reduce, ReLU, 1x1 expand, sigmoid, channel scaling."""

    def __init__(self, channels, reduction=4):
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // reduction, 1)
        self.expand = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.expand(F.relu(self.reduce(s))))
        return x * s


class SEBlock(BasicBlock):
    """Basic residual block with squeeze-excitation before the addition."""

    def __init__(self, cin, cout, stride=1):
        super().__init__(cin, cout, stride)
        self.se = SqueezeExcite(cout)

    def forward(self, x):
        return F.relu(self.se(self.conv2(self.conv1(x))) + self.shortcut(x))


class SENet(ResNet):
    """Residual network of squeeze-excitation blocks."""

    block = SEBlock


def channel_shuffle(x, groups):
    """Interleave the channels of ``groups`` groups (ShuffleNet)."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: channel split (stride 1) or two branches (stride 2),
    concatenation, then channel shuffle."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.stride = stride
        branch = cout // 2
        if stride == 1:
            assert cin == cout
            bin_ = cin // 2
        else:
            bin_ = cin
            self.branch1 = nn.Sequential(
                conv_bn(cin, cin, 3, stride, groups=cin, relu=False),
                conv_bn(cin, branch, 1),
            )
        self.branch2 = nn.Sequential(
            conv_bn(bin_, branch, 1),
            conv_bn(branch, branch, 3, stride, groups=branch, relu=False),
            conv_bn(branch, branch, 1),
        )

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat([x1, self.branch2(x2)], 1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], 1)
        return channel_shuffle(out, 2)


class ShuffleNet(nn.Module):
    """ShuffleNetV2-style network with split, concat and channel shuffles."""

    def __init__(self, in_channels=1, num_classes=10, width=16):
        super().__init__()
        self.stem = conv_bn(in_channels, width, stride=2)
        self.stage = nn.Sequential(
            ShuffleUnit(width, width * 2, stride=2),
            ShuffleUnit(width * 2, width * 2),
            ShuffleUnit(width * 2, width * 2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 2, num_classes)

    def forward(self, x):
        x = self.stage(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class SizedShuffleUnit(ShuffleUnit):
    """A ShuffleUnit whose shuffle reads the channel count as a Python int, as hand-written
    ShuffleNets often do: torch.fx cannot trace its forward."""

    def forward(self, x):
        if self.stride == 1:
            half = int(x.size(1)) // 2
            out = torch.cat([x[:, :half], self.branch2(x[:, half:])], 1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], 1)
        b, c, h, w = out.shape
        return out.view(b, 2, int(c) // 2, h, w).transpose(1, 2).reshape(b, c, h, w)


class SizedShuffleNet(ShuffleNet):
    """The ShuffleNet above built from :class:`SizedShuffleUnit` (not traceable inside its units)."""

    def __init__(self, in_channels=1, num_classes=10, width=16):
        super().__init__(in_channels, num_classes, width)
        self.stage = nn.Sequential(
            SizedShuffleUnit(width, width * 2, stride=2),
            SizedShuffleUnit(width * 2, width * 2),
            SizedShuffleUnit(width * 2, width * 2),
        )


class PartialShortcut(nn.Module):
    """ReXNet's block: the shortcut is added to the first ``cin`` of its ``cout`` output channels."""

    def __init__(self, cin, cout):
        super().__init__()
        self.cin = cin
        self.conv = nn.Sequential(conv_bn(cin, cout, 1), conv_bn(cout, cout, 3, groups=cout, relu=False))

    def forward(self, x):
        out = self.conv(x)
        return torch.cat([out[:, :self.cin] + x, out[:, self.cin:]], 1)


class ReXNet(nn.Module):
    """Channels growing block by block with partial shortcuts (Torch-Pruning's groups run away on it)."""

    def __init__(self, in_channels=1, num_classes=10, blocks=6):
        super().__init__()
        self.stem = conv_bn(in_channels, 16, stride=2)
        self.blocks = nn.Sequential(*[PartialShortcut(16 + 4 * i, 20 + 4 * i) for i in range(blocks)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16 + 4 * blocks, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


class GhostModule(nn.Module):
    """GhostNet's module: half the output from a 1x1 conv, the other half a depthwise conv of that half,
    concatenated (channel ``k`` of the second half is made from channel ``k`` of the first)."""

    def __init__(self, cin, cout, relu=True):
        super().__init__()
        self.out_channels = cout
        self.primary = conv_bn(cin, cout // 2, 1, relu=relu)
        self.cheap = conv_bn(cout // 2, cout // 2, 3, groups=cout // 2, relu=relu)

    def forward(self, x):
        x1 = self.primary(x)
        return torch.cat([x1, self.cheap(x1)], 1)[:, :self.out_channels]


class GhostBottleneck(nn.Module):
    """Ghost module, strided depthwise conv, squeeze-excitation, ghost module, plus a shortcut."""

    def __init__(self, cin, mid, cout, stride=1):
        super().__init__()
        self.ghost1 = GhostModule(cin, mid)
        self.dw = conv_bn(mid, mid, 3, stride, groups=mid, relu=False) if stride > 1 else nn.Identity()
        self.se = SqueezeExcite(mid)
        self.ghost2 = GhostModule(mid, cout, relu=False)
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin, relu=False), conv_bn(cin, cout, 1, relu=False)))

    def forward(self, x):
        return self.ghost2(self.se(self.dw(self.ghost1(x)))) + self.shortcut(x)


class GhostNet(nn.Module):
    """GhostNet's pattern: channels that only prune in pairs (see :class:`GhostModule`)."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.stem = conv_bn(in_channels, 16, stride=2)
        self.blocks = nn.Sequential(GhostBottleneck(16, 32, 16), GhostBottleneck(16, 48, 24, stride=2),
                                    GhostBottleneck(24, 64, 24))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


class AllConvNet(nn.Module):
    """All-convolutional net: 1x1 conv to classes + global average pooling."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(in_channels, 16), conv_bn(16, 16, stride=2),
            conv_bn(16, 32), conv_bn(32, 32, stride=2),
        )
        self.classifier = nn.Sequential(
            nn.Conv2d(32, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class DictNet(ResNet):
    """Small residual net returning ``{"logits": ..., "features": ...}``."""

    def forward(self, x):
        features = self.features(x)
        return {"logits": self.fc(features), "features": features}


class AuxNet(nn.Module):
    """Net with an auxiliary head: ``(logits, aux_logits)`` in train mode,
    only ``logits`` in eval mode (like GoogLeNet / Inception-v3)."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.stage1 = nn.Sequential(conv_bn(in_channels, 8), conv_bn(8, 16, stride=2))
        self.stage2 = nn.Sequential(conv_bn(16, 16), conv_bn(16, 32, stride=2))
        self.aux_head = nn.Sequential(
            conv_bn(16, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(8, num_classes),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        mid = self.stage1(x)
        logits = self.fc(torch.flatten(self.pool(self.stage2(mid)), 1))
        if self.training:
            return logits, self.aux_head(mid)
        return logits


GALLERY = {
    "vgg": VGGNet,
    "resnet": ResNet,
    "mobilenet": MobileNet,
    "resnext": ResNeXt,
    "inception": Inception,
    "densenet": DenseNet,
    "senet": SENet,
    "shufflenet": ShuffleNet,
    "sized_shufflenet": SizedShuffleNet,
    "ghostnet": GhostNet,
    "allconv": AllConvNet,
    "dictnet": DictNet,
    "auxnet": AuxNet,
}
