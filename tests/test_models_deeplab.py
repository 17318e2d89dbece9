"""Models: shapes at output stride 8, param groups, frozen BN, SyncBN, torchvision-format weights."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdca_dist.models import build_model


def torchvision_resnet101_keys() -> "OrderedDict[str, tuple[int, ...]]":
    """Key -> shape of torchvision's resnet101 state_dict, written from its published architecture."""
    keys: OrderedDict[str, tuple[int, ...]] = OrderedDict()

    def bn(prefix: str, c: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.{name}"] = (c,)
        keys[f"{prefix}.num_batches_tracked"] = ()

    keys["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    inplanes = 64
    for li, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 23), (512, 3)], start=1):
        for b in range(blocks):
            p = f"layer{li}.{b}"
            keys[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            bn(f"{p}.bn1", planes)
            keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            keys[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            bn(f"{p}.bn3", planes * 4)
            if b == 0:
                keys[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    keys["fc.weight"] = (1000, 2048)
    keys["fc.bias"] = (1000,)
    return keys


def torchvision_vgg16_keys() -> "OrderedDict[str, tuple[int, ...]]":
    keys: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    convs = [
        (0, 3, 64),
        (2, 64, 64),
        (5, 64, 128),
        (7, 128, 128),
        (10, 128, 256),
        (12, 256, 256),
        (14, 256, 256),
        (17, 256, 512),
        (19, 512, 512),
        (21, 512, 512),
        (24, 512, 512),
        (26, 512, 512),
        (28, 512, 512),
    ]
    for i, cin, cout in convs:
        keys[f"features.{i}.weight"] = (cout, cin, 3, 3)
        keys[f"features.{i}.bias"] = (cout,)
    for i, (cout, cin) in zip((0, 3, 6), [(4096, 25088), (4096, 4096), (1000, 4096)]):
        keys[f"classifier.{i}.weight"] = (cout, cin)
        keys[f"classifier.{i}.bias"] = (cout,)
    return keys


def _random_state(keys, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.tensor(7) if not shape else torch.randn(*shape, generator=g) * 0.01) for k, shape in keys.items()}


@pytest.mark.parametrize("name,dim", [("small", 64), ("deeplabv2_vgg16", 1024), ("deeplabv2_r101", 2048)])
def test_forward_returns_features_and_logits_at_stride_8(name: str, dim: int):
    torch.manual_seed(0)
    model = build_model(name, 19).eval()
    assert model.feature_dim == dim and model.num_classes == 19
    with torch.no_grad():
        feats, logits = model(torch.randn(1, 3, 64, 96))
    assert feats.shape == (1, dim, 8, 12) and logits.shape == (1, 19, 8, 12)
    if name == "small":  # no final ReLU (unit-normalised features must not crowd one orthant)
        assert feats.min() < 0 < feats.max()
    else:
        assert feats.min() >= 0  # post-ReLU features, like the reference backbones


def test_aspp_is_the_sum_of_four_dilated_convs_with_small_init():
    model = build_model("deeplabv2_r101", 16).eval()
    aspp = model.classifier
    assert [c.dilation for c in aspp.branches] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    w = torch.cat([c.weight.detach().flatten() for c in aspp.branches])
    assert abs(float(w.std()) - 0.01) < 5e-4 and abs(float(w.mean())) < 5e-4
    x = torch.randn(1, 2048, 30, 30)
    manual = sum(F.conv2d(x, c.weight, c.bias, padding=c.padding, dilation=c.dilation) for c in aspp.branches)
    torch.testing.assert_close(aspp(x), manual, rtol=1e-4, atol=1e-5)


def test_param_groups_backbone_lr_and_classifier_ten_times():
    model = build_model("small", 19, freeze_bn=True)
    groups = model.param_groups(2.5e-4)
    assert [g["name"] for g in groups] == ["backbone", "classifier"]
    assert groups[0]["lr"] == 2.5e-4 and groups[1]["lr"] == pytest.approx(2.5e-3)
    assert groups[1]["lr_mult"] / groups[0]["lr_mult"] == 10.0
    listed = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(listed) == sorted(trainable) and len(set(listed)) == len(listed)
    bn_params = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert bn_params and not bn_params & set(listed)  # frozen BN affine params are not optimised
    model.set_bn_frozen(False)
    assert bn_params <= {id(p) for g in model.param_groups(1.0) for p in g["params"]}
    torch.optim.SGD(model.param_groups(1e-3), lr=1e-3, momentum=0.9, weight_decay=5e-4)


def test_frozen_bn_stays_in_eval_mode_and_gets_no_gradient():
    torch.manual_seed(0)
    model = build_model("small", 5, freeze_bn=True)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not bn.training for bn in bns) and model.backbone.stem.training
    before = [bn.running_mean.clone() for bn in bns]
    feats, logits = model(torch.randn(2, 3, 32, 48) * 3 + 1)
    (feats.mean() + logits.mean()).backward()
    assert all(torch.equal(b, bn.running_mean) for b, bn in zip(before, bns))
    assert all(bn.weight.grad is None for bn in bns)
    assert model.classifier.branches[0].weight.grad is not None

    model.set_bn_frozen(False)
    model.train()
    assert all(bn.training and bn.weight.requires_grad for bn in bns)
    model(torch.randn(2, 3, 32, 48) * 3 + 1)
    assert not torch.equal(before[0], bns[0].running_mean)


def test_to_sync_bn_converts_every_bn_and_keeps_weights_and_state():
    torch.manual_seed(0)
    model = build_model("small", 5, freeze_bn=True).eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        expected = model(x)[1]
    num_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model.to_sync_bn()
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    syncs = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(syncs) == num_bn > 0 and all(not m.weight.requires_grad for m in syncs)
    model.train()
    assert all(not m.training for m in syncs)  # still frozen
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[1], expected)


def test_loads_torchvision_format_resnet101_and_vgg16(tmp_path):
    r101 = _random_state(torchvision_resnet101_keys(), seed=1)
    path = tmp_path / "resnet101-imagenet.pth"
    torch.save(r101, path)
    model = build_model("deeplabv2_r101", 19, pretrained=str(path))
    got = model.backbone.state_dict()
    assert torch.equal(got["layer3.22.conv2.weight"], r101["layer3.22.conv2.weight"])
    assert torch.equal(got["layer4.0.downsample.1.running_var"], r101["layer4.0.downsample.1.running_var"])
    assert all(
        torch.equal(got[k], v)
        for k, v in r101.items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    )

    vgg = _random_state(torchvision_vgg16_keys(), seed=2)
    vpath = tmp_path / "vgg16-imagenet.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in vgg.items()}}, vpath)  # wrapped + DP prefix
    vmodel = build_model("deeplabv2_vgg16", 16, pretrained=vpath)
    assert torch.equal(vmodel.backbone.features[28].weight, vgg["features.28.weight"])
    assert vmodel.backbone.features[28].dilation == (2, 2)


def test_pretrained_errors_name_the_file_and_key(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model("deeplabv2_r101", 19, pretrained=missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read pretrained weights .*garbage.pth"):
        build_model("deeplabv2_vgg16", 19, pretrained=garbage)
    vgg = _random_state(torchvision_vgg16_keys(), seed=3)
    vgg["features.10.weight"] = torch.zeros(256, 128, 1, 1)
    bad_shape = tmp_path / "bad_shape.pth"
    torch.save(vgg, bad_shape)
    with pytest.raises(ValueError, match=r"bad_shape.pth: key 'features.10.weight' has shape \(256, 128, 1, 1\)"):
        build_model("deeplabv2_vgg16", 19, pretrained=bad_shape)
    wrong_arch = tmp_path / "vgg_for_resnet.pth"
    torch.save(_random_state(torchvision_vgg16_keys(), seed=4), wrong_arch)
    with pytest.raises(
        ValueError, match="vgg_for_resnet.pth do not match a torchvision resnet101: missing key 'conv1.weight'"
    ):
        build_model("deeplabv2_r101", 19, pretrained=wrong_arch)
    with pytest.raises(ValueError, match="has no ImageNet weights"):
        build_model("small", 19, pretrained=wrong_arch)
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        build_model("resnet50", 19)
