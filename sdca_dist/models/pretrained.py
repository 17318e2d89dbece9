"""Loading ImageNet weights from a local torchvision-format file, with errors that name the file.

Nothing is downloaded (the clusters and CI have no internet): the config names a file holding a
``torchvision.models.resnet101`` / ``vgg16`` state_dict (plain, or under a "state_dict"/"model"
key, optionally with a "module." prefix). Heads we do not use (fc, classifier) are skipped;
every backbone key must be present with the right shape, else a one-line error says which.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn


class WeightsError(ValueError):
    """An ImageNet weights file that cannot serve the backbone; the message is one line naming it."""


#: Checkpoint prefixes of ImageNet heads that DeepLab drops.
_SKIPPED_PREFIXES = ("fc.", "classifier.")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a torch checkpoint file, unwrapped from common containers."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt / not a torch file: say which file
        raise WeightsError(f"cannot read pretrained weights {p}: {type(exc).__name__}: {exc}") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"pretrained weights {p} is not a state_dict (a mapping of names to tensors)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def load_backbone_weights(backbone: nn.Module, path: str | Path, arch: str) -> None:
    """Copy a torchvision ``arch`` state_dict from ``path`` into ``backbone`` (strict on its keys).

    Backbone keys torchvision does not have (VGG's fc6/fc7 convs) start with one of
    ``backbone.random_init_prefixes`` and stay randomly initialised.
    """
    source = read_state_dict(path)
    random_init = tuple(getattr(backbone, "random_init_prefixes", ()))
    target = backbone.state_dict()
    missing = [
        k for k in target if not k.endswith("num_batches_tracked") and not k.startswith(random_init) and k not in source
    ]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(
            f"pretrained weights {path} do not match a torchvision {arch}: missing key {missing[0]!r}{more}"
        )
    unexpected = [k for k in source if k not in target and not k.startswith(_SKIPPED_PREFIXES)]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise WeightsError(
            f"pretrained weights {path} do not match a torchvision {arch}: unexpected key {unexpected[0]!r}{more}"
        )
    new_state = {}
    for k, v in target.items():
        if k not in source:
            new_state[k] = v
            continue
        if tuple(source[k].shape) != tuple(v.shape):
            raise WeightsError(
                f"pretrained weights {path}: key {k!r} has shape {tuple(source[k].shape)}, "
                f"expected {tuple(v.shape)} for {arch}"
            )
        new_state[k] = source[k].to(v.dtype)
    backbone.load_state_dict(new_state, strict=True)
