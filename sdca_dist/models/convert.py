"""Import the reference SDCA code's checkpoints (BIT-DA/SDCA) as our weights-only state_dicts.

``python -m sdca_dist.models.convert --from official CKPT --model deeplabv2_r101|deeplabv2_vgg16
--num-classes 19|16 --out OUT.pt``; and for the reference's VGG16 ImageNet weights (Caffe input),
``python -m sdca_dist.models.convert --from caffe_vgg16_imagenet vgg16-00b39a1b.pth --out VGG.pt``
(then ``model.pretrained=VGG.pt``).

The reference (train_src.py / train_sdca.py / train_ssl.py) saves ``{"iteration",
"feature_extractor": state_dict, "classifier": state_dict, optimizer states...}``, the state dicts
with a ``module.`` prefix when trained under DDP. Its layout, read from core/models:

* ResNet-101: ``resnet_feature_extractor`` wraps torchvision's ResNet in an
  ``IntermediateLayerGetter`` named ``backbone`` -> ``backbone.conv1.weight``,
  ``backbone.layer3.7.bn2.running_var`` ... (our ResNetBackbone uses the same names). With
  ``MODEL.FREEZE_BN`` (src, sdca) every BN is the reference's ``FrozenBatchNorm2d``: buffers
  weight/bias/running_mean/running_var, no ``num_batches_tracked``, and NO eps
  (``x * weight * rsqrt(var) + ...``). ssl trains ordinary (Sync)BatchNorm: eps 1e-5 and a
  ``num_batches_tracked`` buffer, i.e. exactly our BatchNorm2d.
* VGG-16: torchvision's ``features`` with pool4 (index 23) and pool5 (30) removed, re-indexed
  0..28, then fc6 (29) and fc7 (31), all in one ``nn.Sequential`` named ``backbone``:
  ``backbone.{0,2,5,7,10,12,14,17,19,21,23,25,27,29,31}.{weight,bias}``. Its input is Caffe-style:
  BGR, 0..255, minus the mean (103.939, 116.779, 123.68), std 1 (configs/deeplabv2_vgg16_*.yaml).
* Classifier: ``ASPP_Classifier_V2.conv2d_list.{0..3}.{weight,bias}`` (dilations 6, 12, 18, 24,
  summed), ours ``classifier.branches.{0..3}``.

Conversion is exact where it can be: a frozen BN's missing eps is folded into its weight
(``w * sqrt((var + eps) / var)``, so our ``w' / sqrt(var + eps)`` equals ``w / sqrt(var)``); the
VGG's Caffe input is folded into conv1_1 (channel order, 255 * std scale, mean into the bias), so
our RGB ImageNet-normalised input gives the reference's logits everywhere except along the image's
one-pixel border, where the reference's zero padding (in BGR 0..255 space) is not zero in ours
(it is the difference of the two means, < 0.5 grey levels).
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from sdca_dist import arguments
from sdca_dist.models import build_model

#: The reference's FrozenBatchNorm2d has no eps; ours (nn.BatchNorm2d) adds this one.
OUR_BN_EPS = 1e-5
#: Reference VGG16 input: BGR channel order, 0..255, minus this per-channel (B, G, R) mean, std 1.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
#: Our input normalisation (RGB, 0..1): (x - mean) / std (sdca_dist.data.loader).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Reference VGG16 Sequential index -> our key prefix (pool4/pool5 dropped, fc6/fc7 appended).
VGG16_LAYERS: dict[int, str] = {
    **{i: f"features.{i}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21)},
    23: "features.24",
    25: "features.26",
    27: "features.28",  # conv5_x, dilated 2
    29: "fc6",
    31: "fc7",
}
SUPPORTED = ("deeplabv2_r101", "deeplabv2_vgg16")


class ConvertError(ValueError):
    """A checkpoint that is not what the command says; the message is one line naming it."""


# --------------------------------------------------------------------------- reading
def _strip_module(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop DDP's ``module.`` prefix when every key has it (the reference's strip_prefix_if_present)."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def read_official(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(feature_extractor, classifier) state dicts of a reference checkpoint, prefixes stripped."""
    p = Path(path)
    if not p.is_file():
        raise ConvertError(f"checkpoint {p} does not exist")
    try:  # the reference saves plain dicts of tensors and ints: the safe loader reads them
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        kind = "not a torch checkpoint" if isinstance(exc, pickle.UnpicklingError) else type(exc).__name__
        raise ConvertError(f"cannot read checkpoint {p}: {kind}: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(obj, Mapping) or "feature_extractor" not in obj or "classifier" not in obj:
        keys = sorted(obj)[:6] if isinstance(obj, Mapping) else type(obj).__name__
        raise ConvertError(
            f"checkpoint {p} is not an SDCA reference checkpoint (no 'feature_extractor' and "
            f"'classifier' entries; it has {keys})"
        )
    parts = []
    for name in ("feature_extractor", "classifier"):
        part = obj[name]
        if not isinstance(part, Mapping) or not all(isinstance(v, Tensor) for v in part.values()):
            raise ConvertError(f"checkpoint {p}: '{name}' is not a state_dict")
        parts.append(_strip_module(part))
    return parts[0], parts[1]


# --------------------------------------------------------------------------- mapping
def _bn_prefixes(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _fold_frozen_bn(weight: Tensor, var: Tensor, key: str, path: Path) -> Tensor:
    if bool((var <= 0).any()):
        raise ConvertError(
            f"checkpoint {path}: {key} has a non-positive running_var (the reference divides by zero there)"
        )
    return (weight.double() * torch.sqrt((var.double() + OUR_BN_EPS) / var.double())).to(weight.dtype)


def _fold_caffe_input(weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """conv1_1 on BGR*255 - mean  ->  the same conv on our (RGB - mean) / std input.

    x_ref[c] = 255 * (std[p(c)] * x[p(c)] + mean[p(c)]) - caffe_mean[c], p = (2, 1, 0). The linear
    part permutes and scales the input channels; the constant part adds to the bias.
    """
    w = weight.double()
    order = [2, 1, 0]  # our RGB channel k is the reference's BGR channel order[k]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64)
    new_w = w[:, order] * (255.0 * std)[None, :, None, None]
    shift = torch.tensor(
        [255.0 * IMAGENET_MEAN[order[c]] - CAFFE_BGR_MEAN[c] for c in range(3)], dtype=torch.float64
    )  # constant input offset per reference (BGR) channel
    new_b = bias.double() + (w * shift[None, :, None, None]).sum(dim=(1, 2, 3))
    return new_w.to(weight.dtype), new_b.to(bias.dtype)


def _reference_key(model_name: str, ours: str) -> str:
    """Our backbone key -> the reference feature_extractor key."""
    assert ours.startswith("backbone.")
    rest = ours[len("backbone.") :]
    if model_name == "deeplabv2_r101":
        return "backbone." + rest
    layer, _, param = rest.rpartition(".")
    for ref_index, our_layer in VGG16_LAYERS.items():
        if our_layer == layer:
            return f"backbone.{ref_index}.{param}"
    raise KeyError(ours)


def convert_official(
    feature_extractor: Mapping[str, Tensor],
    classifier: Mapping[str, Tensor],
    model_name: str,
    num_classes: int,
    path: str | Path = "<checkpoint>",
) -> dict[str, Tensor]:
    """Our state_dict (strictly loadable by ``build_model(model_name, num_classes)``) from the
    reference's two state dicts. Every reference key must be used and every one of ours filled."""
    path = Path(path)
    if model_name not in SUPPORTED:
        raise ConvertError(f"--model {model_name!r}: the reference has {', '.join(SUPPORTED)}")
    model = build_model(model_name, num_classes)
    target = model.state_dict()
    bn_layers = _bn_prefixes(model)
    del model
    _check_classifier(classifier, num_classes, path)
    used: set[str] = set()
    out: dict[str, Tensor] = {}

    def take(state: Mapping[str, Tensor], key: str, shape: torch.Size, where: str) -> Tensor:
        if key not in state:
            missing = [k for k in state_keys_needed(where) if k not in state]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ConvertError(f"checkpoint {path}: {where} lacks {key!r}{more}; not a {model_name} checkpoint")
        value = state[key]
        if tuple(value.shape) != tuple(shape):
            raise ConvertError(
                f"checkpoint {path}: {where} {key!r} has shape {tuple(value.shape)}, {model_name} needs {tuple(shape)}"
            )
        used.add(f"{where}:{key}")
        return value.detach().float() if value.is_floating_point() else value.detach()

    needed: dict[str, list[str]] = {"feature_extractor": [], "classifier": []}

    def state_keys_needed(where: str) -> list[str]:
        return needed[where]

    for ours in target:
        if ours.startswith("classifier."):
            needed["classifier"].append(ours.replace("classifier.branches.", "conv2d_list.", 1))
        elif not ours.endswith("num_batches_tracked"):
            needed["feature_extractor"].append(_reference_key(model_name, ours))

    for ours, like in target.items():
        if ours.startswith("classifier."):
            out[ours] = take(
                classifier, ours.replace("classifier.branches.", "conv2d_list.", 1), like.shape, "classifier"
            )
            continue
        layer, _, param = ours.rpartition(".")
        ref = _reference_key(model_name, ours)
        if param == "num_batches_tracked":
            if ref in feature_extractor:  # ordinary BN (ssl): keep its count
                used.add(f"feature_extractor:{ref}")
                out[ours] = feature_extractor[ref].detach().clone()
            else:
                out[ours] = torch.zeros((), dtype=torch.long)
            continue
        out[ours] = take(feature_extractor, ref, like.shape, "feature_extractor")

    for layer in bn_layers:  # frozen BN (no num_batches_tracked): fold the missing eps into weight
        ref_count = _reference_key(model_name, f"{layer}.num_batches_tracked")
        if ref_count not in feature_extractor:
            out[f"{layer}.weight"] = _fold_frozen_bn(
                out[f"{layer}.weight"],
                out[f"{layer}.running_var"],
                _reference_key(model_name, f"{layer}.running_var"),
                path,
            )
    if model_name == "deeplabv2_vgg16":
        out["backbone.features.0.weight"], out["backbone.features.0.bias"] = _fold_caffe_input(
            out["backbone.features.0.weight"], out["backbone.features.0.bias"]
        )

    for where, state in (("feature_extractor", feature_extractor), ("classifier", classifier)):
        extra = [k for k in state if f"{where}:{k}" not in used]
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise ConvertError(
                f"checkpoint {path}: {where} has {extra[0]!r}{more}, which a {model_name} does not; wrong --model?"
            )
    return out


def _check_classifier(classifier: Mapping[str, Tensor], num_classes: int, path: Path) -> None:
    w = classifier.get("conv2d_list.0.weight")
    if w is not None and w.dim() == 4 and w.shape[0] != num_classes:
        raise ConvertError(f"checkpoint {path} has a {w.shape[0]}-class classifier; --num-classes is {num_classes}")


def convert_caffe_vgg16_imagenet(state: Mapping[str, Tensor], path: str | Path = "<weights>") -> dict[str, Tensor]:
    """The reference's VGG16 ImageNet weights (jcjohnson/pytorch-vgg ``vgg16-00b39a1b.pth``:
    torchvision names, Caffe BGR 0..255 input) -> a torchvision-format state_dict for OUR input
    (``model.pretrained``): the ``features.*`` tensors with the Caffe input folded into conv1_1.
    Its fully connected layers are dropped (DeepLab's fc6/fc7 are new 3x3 convolutions)."""
    state = _strip_module(state)
    needed = [f"features.{i}.{p}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28) for p in ("weight", "bias")]
    missing = [k for k in needed if k not in state]
    if missing:
        raise ConvertError(f"weights {path} lack {missing[0]!r}: not a VGG16 in torchvision naming")
    out = {k: state[k].detach().float() for k in needed}
    if tuple(out["features.0.weight"].shape) != (64, 3, 3, 3):
        raise ConvertError(
            f"weights {path}: features.0.weight has shape {tuple(out['features.0.weight'].shape)}, "
            f"a VGG16 has (64, 3, 3, 3)"
        )
    out["features.0.weight"], out["features.0.bias"] = _fold_caffe_input(
        out["features.0.weight"], out["features.0.bias"]
    )
    return out


# --------------------------------------------------------------------------- our side
def load_converted(path: str | Path, model_name: str, num_classes: int, *, freeze_bn: bool = True):
    """``build_model(model_name, num_classes)`` with the weights-only state_dict at ``path``
    (a converted checkpoint or a stage's model_final.pt), loaded strictly.

    Errors are one line naming the file: missing, not a state_dict, another model or class count.
    """
    p = Path(path)
    if not p.is_file():
        raise ConvertError(f"model weights {p} do not exist")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        detail = (
            "not a weights-only torch state_dict"
            if isinstance(exc, pickle.UnpicklingError)
            else " ".join(str(exc).split())[:200]
        )
        raise ConvertError(f"cannot read model weights {p}: {type(exc).__name__}: {detail}") from None
    if isinstance(state, Mapping) and "feature_extractor" in state:
        raise ConvertError(
            f"model weights {p} are a reference SDCA checkpoint: convert them first with "
            f"python -m sdca_dist.models.convert --from official {p} --model {model_name} "
            f"--num-classes {num_classes} --out OUT.pt"
        )
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConvertError(f"model weights {p} are not a state_dict (a mapping of names to tensors)")
    model = build_model(model_name, num_classes, freeze_bn=freeze_bn)
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:
        key, what = (missing[0], "lack") if missing else (unexpected[0], "have an unexpected")
        n = len(missing) + len(unexpected)
        more = f" ({n - 1} more mismatches)" if n > 1 else ""
        raise ConvertError(f"model weights {p} {what} key {key!r}{more}: not a {model_name} (model.name)")
    for k, v in target.items():
        if tuple(state[k].shape) != tuple(v.shape):
            if k.startswith("classifier.") and k.endswith("weight"):
                raise ConvertError(
                    f"model weights {p} have {state[k].shape[0]} classes; data.num_classes is {num_classes}"
                )
            raise ConvertError(
                f"model weights {p}: {k!r} has shape {tuple(state[k].shape)}, {model_name} needs {tuple(v.shape)}"
            )
    model.load_state_dict(state, strict=True)
    return model


def save_state_dict(state: Mapping[str, Tensor], out: str | Path) -> Path:
    """Atomic save (temp name + fsync + rename); no temporary file survives a failure."""
    out = Path(out)
    if out.parent and not out.parent.is_dir():
        raise ConvertError(f"--out {out}: folder {out.parent} does not exist")
    tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        _unlink(tmp)
        raise ConvertError(f"cannot write {out}: {exc.strerror or exc}") from None
    except BaseException:
        _unlink(tmp)
        raise
    return out


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def main(argv: list[str]) -> int:
    parser = arguments.parser("python -m sdca_dist.models.convert", __doc__.split("\n")[0])
    parser.add_argument(
        "--from",
        dest="source_format",
        choices=["official", "caffe_vgg16_imagenet"],
        required=True,
        help="official = a BIT-DA/SDCA reference checkpoint (feature_extractor + classifier); "
        "caffe_vgg16_imagenet = the reference's VGG16 ImageNet weights (vgg16-00b39a1b.pth), "
        "written as a torchvision-format file for model.pretrained",
    )
    parser.add_argument("checkpoint", help="the file to convert")
    parser.add_argument("--model", choices=SUPPORTED)
    parser.add_argument("--num-classes", type=int, choices=[19, 16])
    parser.add_argument("--out", required=True, help="output .pt (atomic write)")
    args = parser.parse_args(argv)
    if args.source_format == "caffe_vgg16_imagenet":
        try:
            from sdca_dist.models.pretrained import read_state_dict

            try:
                source = read_state_dict(args.checkpoint)
            except (FileNotFoundError, ValueError) as exc:
                raise ConvertError(str(exc)) from None
            save_state_dict(convert_caffe_vgg16_imagenet(source, args.checkpoint), args.out)
        except ConvertError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(
            f"converted {args.checkpoint} -> {args.out} (torchvision-format VGG16 features, Caffe BGR input "
            f"folded into conv1_1; use it as model.pretrained)"
        )
        return 0
    if args.model is None or args.num_classes is None:
        parser.error("--from official needs --model and --num-classes")
    try:
        fe, cls = read_official(args.checkpoint)
        state = convert_official(fe, cls, args.model, args.num_classes, args.checkpoint)
        save_state_dict(state, args.out)
        load_converted(args.out, args.model, args.num_classes)  # proves the output loads strictly
    except ConvertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    frozen = sum(1 for k in fe if k.endswith("running_var")) - sum(1 for k in fe if k.endswith("num_batches_tracked"))
    notes = [f"{frozen} frozen BN (eps folded)"] if frozen else []
    if args.model == "deeplabv2_vgg16":
        notes.append("Caffe BGR input folded into conv1_1")
    print(
        f"converted {args.checkpoint} -> {args.out} ({args.model}, {args.num_classes} classes"
        + (", " + ", ".join(notes) if notes else "")
        + ")"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
