"""DeepLabV2-style segmentation model: backbone -> (features, logits at stride 8)."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class SegmentationModel(nn.Module):
    """``forward(images [B, 3, H, W]) -> (features [B, A, H/8, W/8], logits [B, C, H/8, W/8])``.

    Both outputs are returned because SDCA's contrastive loss works on both levels; logits are
    NOT upsampled (the segmentation loss does that, see method.segmentation_loss).
    """

    def __init__(
        self, backbone: nn.Module, classifier: nn.Module, feature_dim: int, num_classes: int, *, freeze_bn: bool = True
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.feature_dim = int(feature_dim)
        self.num_classes = int(num_classes)
        self.bn_frozen = False
        self.set_bn_frozen(freeze_bn)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.backbone(images)
        return features, self.classifier(features)

    def _batchnorms(self) -> list[_BatchNorm]:
        return [m for m in self.modules() if isinstance(m, _BatchNorm)]

    def set_bn_frozen(self, frozen: bool) -> "SegmentationModel":
        """Frozen BN (src/sdca stages): running statistics used and never updated, affine params
        without gradient, and it stays so across ``model.train()``. Unfrozen (ssl stage): ordinary
        trainable BN. Build the optimizer (``param_groups``) AFTER calling this."""
        self.bn_frozen = bool(frozen)
        for bn in self._batchnorms():
            for p in (bn.weight, bn.bias):
                if p is not None:
                    p.requires_grad_(not frozen)
            bn.train(self.training and not frozen)
        return self

    def train(self, mode: bool = True) -> "SegmentationModel":
        super().train(mode)
        if self.bn_frozen:
            for bn in self._batchnorms():
                bn.eval()
        return self

    def to_sync_bn(self) -> "SegmentationModel":
        """Replace every BatchNorm by SyncBatchNorm in place (ssl stage, multi-GPU), keeping
        parameters, running statistics and the frozen/unfrozen state."""
        for name, child in list(self.named_children()):
            setattr(self, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        return self.set_bn_frozen(self.bn_frozen)

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer groups: backbone at ``lr``, classifier at ``10 * lr`` (DeepLab's 10x rule).

        Only parameters that require grad are listed (frozen BN affine ones are not). Each group
        carries ``lr_mult`` so a poly schedule can set ``lr = base * (1 - t)^0.9 * lr_mult`` and keep
        the ratio; ``name`` is for logging.
        """
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        classifier = [p for p in self.classifier.parameters() if p.requires_grad]
        return [
            {"params": backbone, "lr": lr, "lr_mult": 1.0, "name": "backbone"},
            {"params": classifier, "lr": 10.0 * lr, "lr_mult": 10.0, "name": "classifier"},
        ]
