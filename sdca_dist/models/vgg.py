"""VGG-16 backbone of DeepLabV2 (output stride 8), with torchvision's ``features.N`` names.

pool4 and pool5 are removed (kept as ``nn.Identity`` at their indices 23 and 30 so every conv
keeps torchvision's key, e.g. ``features.28.weight``), conv5_x are dilated 2, and fc6/fc7 are
dilated (4) 3x3 convolutions to 1024 channels, randomly initialised (ImageNet fc weights do not
fit a 3x3 kernel), as the reference builds it.
"""

from __future__ import annotations

from torch import Tensor, nn

_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
_DROPPED_POOLS = (23, 30)
_DILATED_CONVS = (24, 26, 28)


class VGG16Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in _CFG:
            idx = len(layers)
            if v == "M":
                layers.append(nn.Identity() if idx in _DROPPED_POOLS else nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                d = 2 if idx in _DILATED_CONVS else 1
                conv = nn.Conv2d(in_ch, int(v), kernel_size=3, padding=d, dilation=d)
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(conv.bias)
                layers += [conv, nn.ReLU(inplace=True)]
                in_ch = int(v)
        self.features = nn.Sequential(*layers)
        self.fc6 = nn.Conv2d(512, 1024, kernel_size=3, padding=4, dilation=4)
        self.fc7 = nn.Conv2d(1024, 1024, kernel_size=3, padding=4, dilation=4)
        self.relu = nn.ReLU(inplace=True)
        self.out_channels = 1024
        #: Keys torchvision's vgg16 has no weights for (its fc layers are Linear, not 3x3 convs).
        self.random_init_prefixes = ("fc6.", "fc7.")

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.fc7(self.relu(self.fc6(self.features(x)))))


def vgg16_backbone() -> VGG16Backbone:
    return VGG16Backbone()
