"""The stage table: the ONE description of every stage that the launcher, the runner, the
preflight, the lineage and the tests read.

A stage is a ``StageSpec``: the function that runs it (imported lazily, so the launcher never
imports torch), the shard sets it reads directly, the files it needs from earlier stages, the
files it leaves for later ones, its schedule section (training stages), whether a failure of
it stops the chain and, for a reference stage, the launcher key that adds it and the stage it is
paired with in the summary. Everything else that lists stages is derived from this table: the
schema's schedule sections and launcher keys (``sdca_dist.config.schema``), their checks
(``sdca_dist.config.compose``), the launcher's plan and summary (``sdca_dist.launch``). Adding a
stage is one entry here, one function and (training stages) its preset schedule values.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

MODEL_FINAL = "model_final.pt"
METRICS = "metrics.json"
DISTRIBUTIONS = "distributions.pt"
THRESHOLDS = "thresholds.json"
PSEUDO_MANIFEST = "shards/manifest.json"


@dataclass(frozen=True)
class StageInput:
    """A file that stage ``producer`` leaves in its folder and this stage reads."""

    producer: str
    file: str

    @property
    def rel(self) -> str:
        return f"{self.producer}/{self.file}"


@dataclass(frozen=True)
class StageSpec:
    name: str
    #: "module:function" with the face ``run(sc: StageContext) -> dict``
    run: str
    #: DataConfig keys of the shard sets read directly (pseudo-label shards are an input instead)
    shard_sets: tuple[str, ...] = ()
    inputs: tuple[StageInput, ...] = ()
    #: the shard sets of ``shard_sets`` whose labels it trains on: the launcher refuses a launch
    #: in which one of them is unlabelled (``sdca_dist.data.labelled``); scoring on
    #: ``target_val`` is checked for every stage
    trains_on_labels: tuple[str, ...] = ()
    #: files this stage leaves for later stages (hashed into its DONE record)
    outputs: tuple[str, ...] = ()
    #: config section with the stage's StageSchedule; None for inference stages
    schedule: Optional[str] = None
    #: part of the method's chain (in table order); oracle and eval are not
    in_chain: bool = True
    #: a failure stops the stages after it (the oracle is a reference that gates nothing)
    gates_chain: bool = True
    #: global batch keys the job shape must split (training stages)
    batch_keys: tuple[str, ...] = field(default=())
    #: a reference stage outside the chain: the launcher key (a bool of ``LaunchConfig``) that
    #: adds it to a launch, e.g. ``with_oracle=true``; None for stages planned by name only
    launch_flag: Optional[str] = None
    #: an ablation of stage ``paired_with``: the summary reports ``paired_with`` minus this stage
    #: per seed (same inputs and seed: a paired difference) under the name ``effect``
    paired_with: Optional[str] = None
    effect: Optional[str] = None
    #: settings (sections or dotted keys) the stage reads besides those every stage reads
    #: (``sdca_dist.stage_keys.COMMON_READS``); its stage key hashes them, so a key that misses a
    #: setting that changes the result would reuse a wrong result, and one that lists a setting
    #: the stage never reads recomputes it needlessly in a sweep over that setting.
    #: ``tests/test_stage_reads.py`` runs every stage recording what it reads
    #: (``sdca_dist.config.reads``) and fails on any read not declared here
    reads: tuple[str, ...] = field(default=())

    @property
    def training(self) -> bool:
        return self.schedule is not None

    def function(self) -> Callable:
        module, _, name = self.run.partition(":")
        return getattr(importlib.import_module(module), name)


_STAGES = "sdca_dist.engine.stages"
#: the method settings the sdca objective reads (``sdca_dist.method.objective``); the pseudo-label
#: cap and the threshold bins belong to pseudo_label, so a sweep over them shares sdca
_SDCA_METHOD = ("method.tau", "method.delta", "method.lovasz_weight", "method.feat_weight", "method.out_weight")
_SDCA_READS = (
    "sdca",
    *_SDCA_METHOD,
    "data.source_resize",
    "data.target_resize",
    "data.class_balanced",
    "data.eval_resize",
)

TABLE: tuple[StageSpec, ...] = (
    StageSpec(
        "oracle",
        f"{_STAGES}.supervised:run_oracle",
        shard_sets=("target_train", "target_val"),
        trains_on_labels=("target_train",),
        outputs=(MODEL_FINAL,),
        schedule="oracle",
        in_chain=False,
        gates_chain=False,
        batch_keys=("batch_size",),
        launch_flag="with_oracle",
        reads=("oracle", "method.lovasz_weight", "data.target_resize", "data.eval_resize"),
    ),
    StageSpec(
        "src",
        f"{_STAGES}.supervised:run_src",
        shard_sets=("source", "target_val"),
        trains_on_labels=("source",),
        outputs=(MODEL_FINAL,),
        schedule="src",
        batch_keys=("batch_size",),
        reads=(
            "src",
            "init.src",
            "method.lovasz_weight",
            "data.source_resize",
            "data.class_balanced",
            "data.eval_resize",
        ),
    ),
    StageSpec(
        "dist_init",
        f"{_STAGES}.dist_init:run",
        shard_sets=("source",),
        inputs=(StageInput("src", MODEL_FINAL),),
        outputs=(DISTRIBUTIONS,),
        reads=("data.source_resize",),
    ),
    StageSpec(
        "sdca",
        f"{_STAGES}.sdca:run",
        shard_sets=("source", "target_train", "target_val"),
        trains_on_labels=("source",),
        inputs=(StageInput("src", MODEL_FINAL), StageInput("dist_init", DISTRIBUTIONS)),
        outputs=(MODEL_FINAL,),
        schedule="sdca",
        batch_keys=("batch_size", "target_batch_size"),
        reads=_SDCA_READS,
    ),
    # the one-command ablation: sdca with the four contrastive terms off, from the same src model,
    # distributions and seed; a reference, gates nothing
    StageSpec(
        "sdca_no_align",
        f"{_STAGES}.sdca:run_no_align",
        shard_sets=("source", "target_train", "target_val"),
        trains_on_labels=("source",),
        inputs=(StageInput("src", MODEL_FINAL), StageInput("dist_init", DISTRIBUTIONS)),
        outputs=(MODEL_FINAL,),
        schedule="sdca",
        in_chain=False,
        gates_chain=False,
        batch_keys=("batch_size", "target_batch_size"),
        launch_flag="with_ablation",
        paired_with="sdca",
        effect="alignment effect",
        reads=_SDCA_READS,
    ),
    StageSpec(
        "pseudo_label",
        f"{_STAGES}.pseudo_label:run",
        shard_sets=("target_train",),
        inputs=(StageInput("sdca", MODEL_FINAL),),
        outputs=(PSEUDO_MANIFEST, THRESHOLDS),
        reads=("method.pseudo_label_cap", "method.threshold_bins", "data.target_resize"),
    ),
    StageSpec(
        "ssl",
        f"{_STAGES}.supervised:run_ssl",
        shard_sets=("target_val",),
        inputs=(StageInput("sdca", MODEL_FINAL), StageInput("pseudo_label", PSEUDO_MANIFEST)),
        outputs=(MODEL_FINAL,),
        schedule="ssl",
        batch_keys=("batch_size",),
        reads=("ssl", "data.ssl_scale", "data.ssl_crop", "data.eval_resize"),
    ),
    # eval's input depends on eval.model_from: see ``inputs_of``
    StageSpec(
        "eval",
        f"{_STAGES}.evaluate_stage:run",
        shard_sets=("target_val",),
        in_chain=False,
        reads=("eval.model_from", "data.eval_resize"),
    ),
)

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in TABLE)
CHAIN: tuple[str, ...] = tuple(s.name for s in TABLE if s.in_chain)
TRAINING_STAGES: tuple[str, ...] = tuple(s.name for s in TABLE if s.training)
#: stages with a model_final.pt that ``eval.model_from`` may name
MODEL_STAGES: tuple[str, ...] = tuple(s.name for s in TABLE if MODEL_FINAL in s.outputs)
#: the config sections holding a StageSchedule (one per training stage; an ablation shares its
#: stage's), the chain's first, in chain order, then the references'
SCHEDULE_SECTIONS: tuple[str, ...] = tuple(
    dict.fromkeys(s.schedule for s in sorted(TABLE, key=lambda s: not s.in_chain) if s.schedule)
)
#: launcher key -> the reference stage it adds
LAUNCH_FLAGS: dict[str, str] = {s.launch_flag: s.name for s in TABLE if s.launch_flag}


def spec(name: str) -> StageSpec:
    for s in TABLE:
        if s.name == name:
            return s
    raise KeyError(f"unknown stage {name!r}; valid stages: {', '.join(STAGE_NAMES)}")


def inputs_of(name: str, cfg=None) -> tuple[StageInput, ...]:
    """The files stage ``name`` reads from earlier stages under the settings ``cfg``: eval reads
    the model ``eval.model_from`` names (none when it names a weights file); ssl started from
    ImageNet (``ssl.init=imagenet``) reads no sdca model."""
    if name == "eval":
        model_from = cfg.eval.model_from if cfg is not None else "ssl"
        return () if model_from.endswith(".pt") else (StageInput(model_from, MODEL_FINAL),)
    if name == "ssl" and cfg is not None and cfg.ssl.init == "imagenet":
        return tuple(i for i in spec(name).inputs if i.producer != "sdca")
    return spec(name).inputs


def weights_read(name: str, cfg) -> list[tuple[str, str]]:
    """(setting, path) of the weights files ``name`` reads besides earlier stages' outputs."""
    out = []
    init_src = cfg.init.src if name == "src" else None
    if init_src:
        out.append(("init.src", str(init_src)))
    elif name in ("src", "oracle") or (name == "ssl" and cfg.ssl.init == "imagenet"):
        if cfg.model.pretrained:
            out.append(("model.pretrained", cfg.model.pretrained))
    if name == "eval" and cfg.eval.model_from.endswith(".pt"):
        out.append(("eval.model_from", cfg.eval.model_from))
    return out


def ordered(names) -> list[str]:
    """``names`` in table order (the order in which their inputs are produced)."""
    wanted = set(names)
    return [s.name for s in TABLE if s.name in wanted]
