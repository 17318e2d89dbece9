"""DeepLabV2's ASPP classifier: the SUM of parallel dilated 3x3 convolutions straight to classes."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn


class ASPPClassifier(nn.Module):
    """``sum_d conv3x3_dilation_d(x)`` over ``dilations`` (6, 12, 18, 24 in DeepLabV2).

    Weights N(0, 0.01) as in the reference; biases keep PyTorch's default init. Padding equals
    the dilation so the output keeps the feature map's size.
    """

    def __init__(self, in_channels: int, num_classes: int, dilations: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=d, dilation=d, bias=True) for d in dilations
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branches[0](x)
        for conv in self.branches[1:]:
            out = out + conv(x)
        return out
