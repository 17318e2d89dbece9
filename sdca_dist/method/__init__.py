"""The SDCA method as pure tensor code with one injected all-reduce seam (see collective.py).

Runs unchanged in a plain unit test (no process group) and on every rank of a job.
"""

from sdca_dist.method.collective import AllReduce, default_all_reduce
from sdca_dist.method.contrastive import pixel_contrastive_loss
from sdca_dist.method.distribution import SemanticDistribution, update_distributions
from sdca_dist.method.metrics import ConfusionMatrix, miou_report
from sdca_dist.method.pixels import downsample_labels, flatten_pixels
from sdca_dist.method.pseudo_labels import ClassThresholds, apply_thresholds, confidence_pseudo_labels
from sdca_dist.method.segmentation_loss import lovasz_softmax, segmentation_ce, segmentation_loss, upsample_logits

__all__ = [
    "AllReduce",
    "default_all_reduce",
    "SemanticDistribution",
    "update_distributions",
    "pixel_contrastive_loss",
    "flatten_pixels",
    "downsample_labels",
    "confidence_pseudo_labels",
    "ClassThresholds",
    "apply_thresholds",
    "lovasz_softmax",
    "segmentation_ce",
    "segmentation_loss",
    "upsample_logits",
    "ConfusionMatrix",
    "miou_report",
]
