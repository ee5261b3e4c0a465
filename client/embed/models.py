"""Architectures that fedpath builds itself (torchvision is not a dependency).

``ResNet50Trunc`` reproduces CLAM's ``resnet50_baseline``: a torchvision ResNet-50 cut after
``layer3`` and average-pooled, so module names match torchvision/timm checkpoints and their
state dicts load directly (``layer4``/``fc`` keys are simply not used). ``TinyCNN`` is a
weight-file-free encoder for tests: its initialisation uses a private generator so it is the
same on every machine and never disturbs (or depends on) the global torch RNG.

Two inference details live here because they depend on the architecture:

- The first layers run in float32 even under bfloat16 autocast. Normalised 8-bit pixels are
  spaced about one grey level apart, which is also bf16's resolution at their magnitude, so
  rounding the input (and the full-resolution stem activations) costs more accuracy than all
  the later layers together (EfficientNet-Lite0 on real H&E tiles: mean cosine to float32
  0.9988 all-bf16, 0.9996 with stem + first block in float32), for ~5% of the FLOPs.
- ``fold_batchnorm`` folds every BatchNorm into its convolution in float32 for the traced
  inference graph; letting ``torch.jit.freeze`` fold them after autocast has already rounded
  the weights to bf16 costs accuracy (mean cosine 0.995 instead of 0.999).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride on the 3×3 conv), same attribute names."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        width = planes
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def fold_batchnorm(self) -> None:
        for i in (1, 2, 3):
            fold_conv_bn(self, f"conv{i}", f"bn{i}")
        if self.downsample is not None:
            fold_conv_bn(self.downsample, "0", "1")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


def fold_conv_bn(parent: nn.Module, conv_name: str, bn_name: str) -> None:
    """Replace ``parent.<conv>`` by the conv with ``parent.<bn>`` folded in; BN → Identity."""
    conv = getattr(parent, conv_name)
    bn = getattr(parent, bn_name)
    if isinstance(bn, nn.Identity):
        return
    setattr(parent, conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
    setattr(parent, bn_name, nn.Identity())


@contextlib.contextmanager
def _float32_region() -> Iterator[None]:
    """Autocast switched off: the enclosed layers compute in float32 whatever the caller set.

    Both the CPU and (where present) the CUDA autocast are switched off, so the stem stays
    float32 on a GPU too.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield


def _make_layer(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [Bottleneck(inplanes, planes, stride)]
    layers += [Bottleneck(planes * Bottleneck.expansion, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet50Trunc(nn.Module):
    """ResNet-50 through ``layer3`` + global average pool → 1024-d (CLAM's patch encoder)."""

    feature_dim = 1024

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = _make_layer(64, 64, 3, 1)
        self.layer2 = _make_layer(256, 128, 4, 2)
        self.layer3 = _make_layer(512, 256, 6, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def fold_batchnorm(self) -> None:
        """Fold every BatchNorm into its convolution (inference only; eval mode required)."""
        fold_conv_bn(self, "conv1", "bn1")
        for layer in (self.layer1, self.layer2, self.layer3):
            for block in layer:
                block.fold_batchnorm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _float32_region():
            x = self.maxpool(self.relu(self.bn1(self.conv1(x.float()))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.avgpool(x), 1)


class TinyCNN(nn.Module):
    """Three strided convolutions + global average pool → 64-d; deterministic, no weight file."""

    feature_dim = 64

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        # Built on the meta device so PyTorch's default init never draws from the global RNG.
        meta = torch.device("meta")
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1, device=meta),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, device=meta),
            nn.ReLU(),
            nn.Conv2d(32, self.feature_dim, 3, stride=2, padding=1, device=meta),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.to_empty(device="cpu")
        self._deterministic_init(seed)

    @torch.no_grad()
    def _deterministic_init(self, seed: int) -> None:
        """He-normal weights, small positive biases, from a private generator (portable)."""
        gen = torch.Generator().manual_seed(seed)
        for name, param in sorted(self.named_parameters()):
            if name.endswith("weight"):
                fan_in = param[0].numel()
                values = torch.randn(param.shape, generator=gen) * (2.0 / fan_in) ** 0.5
            else:
                values = torch.full(param.shape, 0.01)
            param.copy_(values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


class EfficientNetTrunk(nn.Module):
    """``efficientnet_lite_pytorch.EfficientNet`` without its classifier: pooled last conv.

    Same computation as ``net.extract_features(x).mean((2, 3))`` (drop-connect is a training-
    only op), written out so the stem and first block can stay in float32 under autocast.
    """

    feature_dim = 1280

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def fold_batchnorm(self) -> None:
        """Fold every BatchNorm into its convolution (inference only; eval mode required)."""
        net = self.net
        fold_conv_bn(net, "_conv_stem", "_bn0")
        fold_conv_bn(net, "_conv_head", "_bn1")
        for block in net._blocks:
            if hasattr(block, "_expand_conv"):
                fold_conv_bn(block, "_expand_conv", "_bn0")
            fold_conv_bn(block, "_depthwise_conv", "_bn1")
            fold_conv_bn(block, "_project_conv", "_bn2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        blocks = list(net._blocks)
        with _float32_region():
            x = net._swish(net._bn0(net._conv_stem(x.float())))
            x = blocks[0](x)
        for block in blocks[1:]:
            x = block(x)
        x = net._swish(net._bn1(net._conv_head(x)))
        return x.mean(dim=(2, 3))
