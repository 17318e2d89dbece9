"""Segmentation models: DeepLabV2 (ResNet-101, VGG-16) and a small CPU backbone, one interface.

``build_model(name, num_classes, pretrained=None, freeze_bn=True)`` returns a
:class:`SegmentationModel` whose forward gives ``(features, logits)`` at output stride 8.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from sdca_dist.models.aspp import ASPPClassifier
from sdca_dist.models.pretrained import load_backbone_weights, read_state_dict
from sdca_dist.models.resnet import resnet101_backbone
from sdca_dist.models.segmentation import SegmentationModel
from sdca_dist.models.small import SmallBackbone
from sdca_dist.models.vgg import vgg16_backbone

#: DeepLabV2's ASPP dilations; the small net's map is ~16x32 at test sizes, so it uses smaller ones.
DEEPLAB_DILATIONS = (6, 12, 18, 24)
SMALL_DILATIONS = (1, 2, 4, 8)

_BACKBONES = {
    "deeplabv2_r101": (resnet101_backbone, "resnet101", DEEPLAB_DILATIONS),
    "deeplabv2_vgg16": (vgg16_backbone, "vgg16", DEEPLAB_DILATIONS),
    "small": (SmallBackbone, None, SMALL_DILATIONS),
}

MODEL_NAMES = tuple(_BACKBONES)


def build_model(
    name: str, num_classes: int, *, pretrained: str | Path | None = None, freeze_bn: bool = True
) -> SegmentationModel:
    """Build ``name`` (one of :data:`MODEL_NAMES`) for ``num_classes``.

    ``pretrained``: path of a local torchvision-format ImageNet state_dict for the backbone
    (resnet101 / vgg16); None = random init. The classifier is always freshly initialised.
    """
    if name not in _BACKBONES:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    make_backbone, arch, dilations = _BACKBONES[name]
    backbone: nn.Module = make_backbone()
    if pretrained is not None:
        if arch is None:
            raise ValueError(f"model {name!r} has no ImageNet weights; set pretrained to None (got {pretrained})")
        load_backbone_weights(backbone, pretrained, arch)
    dim = backbone.out_channels
    classifier = ASPPClassifier(dim, num_classes, dilations)
    return SegmentationModel(backbone, classifier, dim, num_classes, freeze_bn=freeze_bn)


__all__ = [
    "build_model",
    "SegmentationModel",
    "ASPPClassifier",
    "MODEL_NAMES",
    "read_state_dict",
    "load_backbone_weights",
]
