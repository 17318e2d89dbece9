"""sdca_dist: distributed SDCA for domain-adaptive semantic segmentation."""

__version__ = "0.1.0"
