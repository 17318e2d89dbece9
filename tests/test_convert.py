"""Reference SDCA checkpoints -> our state_dict: strict load, the reference's logits, one-line errors.

The reference side is written here as the spec, from BIT-DA/SDCA core/models (facts, not code):
its key layout (torchvision ResNet names under ``backbone.``, the VGG Sequential re-indexed after
dropping pool4/pool5, ``conv2d_list.i``), its FrozenBatchNorm2d without eps, its ssl-stage
BatchNorm with eps 1e-5, the VGG's Caffe input (BGR, 0..255, mean subtracted), and a forward pass
in plain torch ops.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sdca_dist.models.convert import ConvertError, convert_official, load_converted, read_official, save_state_dict

REPO = Path(__file__).resolve().parents[1]
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])
CAFFE_BGR_MEAN = torch.tensor([103.939, 116.779, 123.68])
ASPP = (6, 12, 18, 24)
#: torchvision ResNet-101 with replace_stride_with_dilation=[False, True, True]:
#: (planes, blocks, stride of the first block, dilation of the first block, dilation of the others)
R101_LAYERS = ((64, 3, 1, 1, 1), (128, 4, 2, 1, 1), (256, 23, 1, 1, 2), (512, 3, 1, 2, 4))
#: reference VGG16 Sequential after dropping pool4/pool5: index -> ("conv", cin, cout, dilation) | ("pool",)
VGG_REF = {
    0: ("conv", 3, 64, 1),
    2: ("conv", 64, 64, 1),
    4: ("pool",),
    5: ("conv", 64, 128, 1),
    7: ("conv", 128, 128, 1),
    9: ("pool",),
    10: ("conv", 128, 256, 1),
    12: ("conv", 256, 256, 1),
    14: ("conv", 256, 256, 1),
    16: ("pool",),
    17: ("conv", 256, 512, 1),
    19: ("conv", 512, 512, 1),
    21: ("conv", 512, 512, 1),
    23: ("conv", 512, 512, 2),
    25: ("conv", 512, 512, 2),
    27: ("conv", 512, 512, 2),
    29: ("conv", 512, 1024, 4),
    31: ("conv", 1024, 1024, 4),
}


def _conv(g, cout, cin, k):
    return torch.randn(cout, cin, k, k, generator=g) * (0.7 / (cin * k * k)) ** 0.5


def _bn(g, sd, prefix, n, ordinary):
    # some tiny variances, where eps 1e-5 vs none changes a channel's scale by ~18%; the weight is
    # proportional to sqrt(var) so activations keep their size through 100 layers
    var = torch.rand(n, generator=g) * 0.9 + 0.1
    var[::7] = 2e-5
    sd[prefix + "weight"] = var.sqrt() * (torch.rand(n, generator=g) * 0.5 + 0.5)
    sd[prefix + "bias"] = torch.randn(n, generator=g) * 0.1
    sd[prefix + "running_mean"] = torch.randn(n, generator=g) * 0.1 * var.sqrt()
    sd[prefix + "running_var"] = var
    if ordinary:
        sd[prefix + "num_batches_tracked"] = torch.tensor(123)


def reference_r101(seed: int, num_classes: int, ordinary_bn: bool = False):
    g = torch.Generator().manual_seed(seed)
    fe: dict = {"backbone.conv1.weight": _conv(g, 64, 3, 7)}
    _bn(g, fe, "backbone.bn1.", 64, ordinary_bn)
    inplanes = 64
    for li, (planes, blocks, _, _, _) in enumerate(R101_LAYERS, start=1):
        for b in range(blocks):
            p = f"backbone.layer{li}.{b}."
            fe[p + "conv1.weight"] = _conv(g, planes, inplanes, 1)
            _bn(g, fe, p + "bn1.", planes, ordinary_bn)
            fe[p + "conv2.weight"] = _conv(g, planes, planes, 3)
            _bn(g, fe, p + "bn2.", planes, ordinary_bn)
            fe[p + "conv3.weight"] = _conv(g, planes * 4, planes, 1)
            _bn(g, fe, p + "bn3.", planes * 4, ordinary_bn)
            if b == 0:
                fe[p + "downsample.0.weight"] = _conv(g, planes * 4, inplanes, 1)
                _bn(g, fe, p + "downsample.1.", planes * 4, ordinary_bn)
            inplanes = planes * 4
    return fe, _aspp(g, 2048, num_classes)


def _aspp(g, cin, num_classes):
    cls = {}
    for i in range(len(ASPP)):
        cls[f"conv2d_list.{i}.weight"] = torch.randn(num_classes, cin, 3, 3, generator=g) * 0.01
        cls[f"conv2d_list.{i}.bias"] = torch.randn(num_classes, generator=g) * 0.1
    return cls


def _ref_bn(x, sd, p):
    if p + "num_batches_tracked" in sd:  # nn.BatchNorm2d in eval mode (ssl checkpoints)
        return F.batch_norm(
            x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"], training=False, eps=1e-5
        )
    scale = sd[p + "weight"] * sd[p + "running_var"].rsqrt()  # FrozenBatchNorm2d: no eps
    shift = sd[p + "bias"] - sd[p + "running_mean"] * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def _ref_aspp(x, cls):
    out = None
    for i, d in enumerate(ASPP):
        y = F.conv2d(x, cls[f"conv2d_list.{i}.weight"], cls[f"conv2d_list.{i}.bias"], padding=d, dilation=d)
        out = y if out is None else out + y
    return out


def reference_r101_forward(fe, cls, rgb01):
    x = (rgb01 - IMAGENET_MEAN[None, :, None, None]) / IMAGENET_STD[None, :, None, None]
    x = F.conv2d(x, fe["backbone.conv1.weight"], stride=2, padding=3)
    x = F.max_pool2d(F.relu(_ref_bn(x, fe, "backbone.bn1.")), 3, 2, 1)
    for li, (_, blocks, stride, first_dil, dil) in enumerate(R101_LAYERS, start=1):
        for b in range(blocks):
            p = f"backbone.layer{li}.{b}."
            s, d = (stride, first_dil) if b == 0 else (1, dil)
            out = F.relu(_ref_bn(F.conv2d(x, fe[p + "conv1.weight"]), fe, p + "bn1."))
            out = F.relu(
                _ref_bn(F.conv2d(out, fe[p + "conv2.weight"], stride=s, padding=d, dilation=d), fe, p + "bn2.")
            )
            out = _ref_bn(F.conv2d(out, fe[p + "conv3.weight"]), fe, p + "bn3.")
            identity = x
            if b == 0:
                identity = _ref_bn(F.conv2d(x, fe[p + "downsample.0.weight"], stride=s), fe, p + "downsample.1.")
            x = F.relu(out + identity)
    return _ref_aspp(x, cls)


def reference_vgg16(seed: int, num_classes: int):
    g = torch.Generator().manual_seed(seed)
    fe = {}
    for i, layer in VGG_REF.items():
        if layer[0] == "conv":
            _, cin, cout, _ = layer
            fe[f"backbone.{i}.weight"] = _conv(g, cout, cin, 3) * 1.4
            fe[f"backbone.{i}.bias"] = torch.randn(cout, generator=g) * 0.05
    fe["backbone.0.weight"] /= 60.0  # the input is 0..255, not normalised
    return fe, _aspp(g, 1024, num_classes)


def reference_vgg16_forward(fe, cls, rgb01, first_conv_only=False):
    x = (rgb01 * 255.0)[:, [2, 1, 0]] - CAFFE_BGR_MEAN[None, :, None, None]
    for i, layer in VGG_REF.items():
        if layer[0] == "pool":
            x = F.max_pool2d(x, 2, 2)
            continue
        d = layer[3]
        x = F.conv2d(x, fe[f"backbone.{i}.weight"], fe[f"backbone.{i}.bias"], padding=d, dilation=d)
        if first_conv_only:
            return x
        x = F.relu(x)
    return _ref_aspp(x, cls)


def _ours(model, rgb01):
    x = (rgb01 - IMAGENET_MEAN[None, :, None, None]) / IMAGENET_STD[None, :, None, None]
    with torch.no_grad():
        return model.eval()(x)[1]


def _save_official(tmp_path: Path, fe, cls, name="ref.pth", prefix=""):
    path = tmp_path / name
    torch.save(
        {
            "iteration": 20000,
            "feature_extractor": {prefix + k: v for k, v in fe.items()},
            "classifier": {prefix + k: v for k, v in cls.items()},
            "optimizer_fea": {},
        },
        path,
    )
    return path


def test_r101_frozen_bn_ddp_checkpoint_gives_the_reference_logits(tmp_path: Path):
    """src/sdca checkpoints: FrozenBatchNorm2d without eps, saved from DDP (``module.`` keys)."""
    fe, cls = reference_r101(1, 19)
    ckpt = _save_official(tmp_path, fe, cls, prefix="module.")
    out = tmp_path / "ours.pt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdca_dist.models.convert",
            "--from",
            "official",
            str(ckpt),
            "--model",
            "deeplabv2_r101",
            "--num-classes",
            "19",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "104 frozen BN (eps folded)" in proc.stdout
    model = load_converted(out, "deeplabv2_r101", 19)  # strict
    rgb = torch.rand(2, 3, 41, 53, generator=torch.Generator().manual_seed(0))
    want = reference_r101_forward(fe, cls, rgb)
    got = _ours(model, rgb)
    assert got.shape == want.shape == (2, 19, 6, 7)
    scale = want.abs().max()
    assert torch.isfinite(scale) and scale > 1e-3
    assert (got - want).abs().max() <= 1e-4 * scale, float((got - want).abs().max() / scale)
    # the eps matters at these variances: the reference's BN weights copied as they are differ
    state = model.state_dict()
    for k in state:
        if k.startswith("backbone.") and k.endswith(".weight") and k.replace("weight", "running_var") in fe:
            state[k] = fe[k]
    model.load_state_dict(state)
    assert (_ours(model, rgb) - want).abs().max() > 1e-2 * scale


def test_r101_ssl_checkpoint_with_ordinary_bn(tmp_path: Path):
    """ssl checkpoints: (Sync)BatchNorm2d with eps 1e-5 and num_batches_tracked, no prefix."""
    fe, cls = reference_r101(5, 16, ordinary_bn=True)
    state = convert_official(*read_official(_save_official(tmp_path, fe, cls)), "deeplabv2_r101", 16)
    from sdca_dist.models import build_model

    model = build_model("deeplabv2_r101", 16)
    model.load_state_dict(state, strict=True)
    rgb = torch.rand(1, 3, 33, 41, generator=torch.Generator().manual_seed(1))
    want = reference_r101_forward(fe, cls, rgb)
    got = _ours(model, rgb)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert int(state["backbone.bn1.num_batches_tracked"]) == 123


def test_vgg16_caffe_input_folded_into_conv1(tmp_path: Path):
    fe, cls = reference_vgg16(2, 16)
    state = convert_official(*read_official(_save_official(tmp_path, fe, cls)), "deeplabv2_vgg16", 16)
    model = load_converted(save_state_dict(state, tmp_path / "vgg.pt"), "deeplabv2_vgg16", 16)
    rgb = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(3))
    # conv1_1: exact away from the one-pixel border (where the reference pads zeros in BGR 0..255 space)
    x = (rgb - IMAGENET_MEAN[None, :, None, None]) / IMAGENET_STD[None, :, None, None]
    with torch.no_grad():
        ours1 = model.backbone.features[0](x)
    ref1 = reference_vgg16_forward(fe, cls, rgb, first_conv_only=True)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    assert (ours1[inner] - ref1[inner]).abs().max() <= 1e-4 * ref1.abs().max()
    # the whole net: equal up to that border effect (< 0.5 grey levels on the outermost pixels)
    want = reference_vgg16_forward(fe, cls, rgb)
    got = _ours(model, rgb)
    assert got.shape == want.shape == (1, 16, 6, 8)
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel < 2e-3, rel
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_one_line_errors(tmp_path: Path):
    fe, cls = reference_vgg16(4, 19)
    ckpt = _save_official(tmp_path, fe, cls)
    # wrong class count, through the CLI: exit 2, one line, nothing written
    out = tmp_path / "x.pt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdca_dist.models.convert",
            "--from",
            "official",
            str(ckpt),
            "--model",
            "deeplabv2_vgg16",
            "--num-classes",
            "16",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "19-class classifier; --num-classes is 16" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".tmp*"))
    # a missing key is named
    broken = dict(fe)
    del broken["backbone.27.bias"]
    with pytest.raises(ConvertError, match=r"lacks 'backbone\.27\.bias'; not a deeplabv2_vgg16"):
        convert_official(broken, cls, "deeplabv2_vgg16", 19)
    # the other architecture's checkpoint
    with pytest.raises(ConvertError, match="lacks 'backbone.conv1.weight'"):
        convert_official(fe, cls, "deeplabv2_r101", 19)
    # not a reference checkpoint
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ConvertError, match="not an SDCA reference checkpoint"):
        read_official(tmp_path / "other.pth")
    # our loader: another class count, and a reference file given where our weights are expected
    save_state_dict(convert_official(fe, cls, "deeplabv2_vgg16", 19), out)
    with pytest.raises(ConvertError, match="have 19 classes; data.num_classes is 16"):
        load_converted(out, "deeplabv2_vgg16", 16)
    with pytest.raises(ConvertError, match="convert them first"):
        load_converted(ckpt, "deeplabv2_vgg16", 19)


def test_caffe_vgg16_imagenet_weights_become_torchvision_format(tmp_path: Path):
    """The reference's ImageNet VGG16 (Caffe input) loads as our model.pretrained with its conv1_1
    giving, on our input, what it gave on the reference's (away from the one-pixel border)."""
    from sdca_dist.models import build_model

    fe, _ = reference_vgg16(6, 19)
    caffe = {
        f"features.{i + (1 if i >= 23 else 0)}.{p}": fe[f"backbone.{i}.{p}"]
        for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 23, 25, 27)
        for p in ("weight", "bias")
    }
    caffe["classifier.0.weight"] = torch.zeros(2, 2)  # its fc layers (another naming) are dropped
    torch.save(caffe, tmp_path / "vgg16-00b39a1b.pth")
    out = tmp_path / "vgg16_ours.pt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdca_dist.models.convert",
            "--from",
            "caffe_vgg16_imagenet",
            str(tmp_path / "vgg16-00b39a1b.pth"),
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    model = build_model("deeplabv2_vgg16", 19, pretrained=out)
    rgb = torch.rand(1, 3, 20, 24, generator=torch.Generator().manual_seed(7))
    x = (rgb - IMAGENET_MEAN[None, :, None, None]) / IMAGENET_STD[None, :, None, None]
    with torch.no_grad():
        ours1 = model.backbone.features[0](x)
    ref1 = reference_vgg16_forward(fe, {}, rgb, first_conv_only=True)
    assert (ours1 - ref1)[..., 1:-1, 1:-1].abs().max() <= 1e-4 * ref1.abs().max()
    assert torch.equal(model.backbone.features[26].weight, caffe["features.26.weight"])
