"""The config schema: presets compose, and every kind of mistake fails before anything runs."""

import pytest

from sdca_dist.config import ConfigError, compose_config


def test_presets_compose_with_published_settings():
    g = compose_config(["conf=gta2city"])
    assert g.model.name == "deeplabv2_r101" and g.data.num_classes == 19
    assert (g.src.iters, g.src.schedule_iters, g.src.lr) == (20000, 31250, 5e-4)
    assert (g.sdca.iters, g.sdca.schedule_iters, g.sdca.lr) == (40000, 62500, 2.5e-4)
    assert (g.method.tau, g.method.delta, g.method.lovasz_weight, g.method.pseudo_label_cap) == (100.0, 0.9, 0.75, 0.9)
    assert list(g.data.source_resize) == [720, 1280] and list(g.data.target_resize) == [512, 1024]
    s = compose_config(["conf=synthia2city"])
    assert s.data.num_classes == 16 and list(s.data.source_resize) == [760, 1280]
    syn = compose_config(["conf=synthetic"])
    assert syn.model.name == "small" and syn.data.synthetic
    # on a cluster: CPU-only ranks; cluster=local runs the same preset on this machine
    assert syn.cluster.name == "slurm" and syn.cluster.gpus_per_node == 0
    assert compose_config(["conf=synthetic", "cluster=local"]).cluster.name == "local"


def test_command_line_group_choice_beats_the_preset():
    cfg = compose_config(["conf=gta2city", "model=deeplabv2_vgg16", "engine=deepspeed"])
    assert cfg.model.name == "deeplabv2_vgg16" and cfg.engine.name == "deepspeed"


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (
            ["conf=nope"],
            "unknown conf='nope'; valid choices: city2acdc, city2darkzurich, folder, gta2city, synthetic, synthia2city",
        ),
        (["conf=synthetic", "model=resnet9"], "unknown model='resnet9'; valid choices: deeplabv2_r101"),
        (["conf=synthetic", "train.itres=3"], "train.itres"),
        (["conf=synthetic", "train.iters=abc"], "train.iters"),
        (["conf=synthetic", "stage=foo"], "unknown stage='foo'"),
        (["conf=synthetic", "nodes=2"], "nodes is a setting of the launcher (launch/slurm.py), not of a run"),
        (["conf=synthetic", "engine.zero_stage=3"], "engine.zero_stage=3 must be 0, 1 or 2"),
        (["conf=synthetic", "data.eval_resize=[5]"], "data.eval_resize=[5] must be [H, W]"),
        (["conf=synthetic", "oops"], "not of the form key=value"),
    ],
)
def test_mistakes_fail_in_one_line_naming_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        compose_config(overrides)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_composed_config_is_read_only():
    cfg = compose_config(["conf=synthetic"])
    with pytest.raises(Exception):
        cfg.seed = 3
