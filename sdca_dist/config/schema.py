"""Typed configuration schema: the one home for every setting's name, type and default.

Hydra YAML under ``conf/`` fills these dataclasses; because the schema is registered as the
structured base of the primary config, a misspelt key or a wrong type fails when the config is
composed, before anything runs or is submitted.

The per-stage parts come from the stage table (``sdca_dist.stage_table``): ``Config`` has one
schedule section per ``SCHEDULE_SECTIONS`` entry (a ``StageSchedule``, or the class
``SCHEDULE_TYPES`` names for a section with settings of its own), ``LaunchConfig`` one bool per
reference stage's ``launch_flag``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from typing import Any, Optional

from sdca_dist.stage_table import CHAIN, LAUNCH_FLAGS, SCHEDULE_SECTIONS


@dataclass
class DataConfig:
    """Where the shards are and how images are sized. Sizes are [H, W]."""

    #: folder holding one sub-folder per shard set (each with manifest.json)
    shards_root: str = "shards"
    source: str = "???"
    target_train: str = "???"
    target_val: str = "???"
    #: 19 (GTA5 -> Cityscapes) or 16 (SYNTHIA -> Cityscapes); set from ``classes`` when that is given
    num_classes: int = 19
    #: a classes YAML file (docs/datasets.md, "The classes file"): the run's class names, colours and
    #: count (model head, distributions, metrics, prediction colours) come from it; null = the
    #: built-in Cityscapes 19 / SYNTHIA 16 table of ``num_classes``
    classes: Optional[str] = None
    #: source images are resized to this before augmentation (1280x720 GTA5, 1280x760 SYNTHIA)
    source_resize: list[int] = field(default_factory=lambda: [720, 1280])
    #: target images resized to this (1024x512) in sdca, pseudo_label and oracle
    target_resize: list[int] = field(default_factory=lambda: [512, 1024])
    #: evaluation input size, the scale a model is tested at; labels stay at their original resolution
    eval_resize: list[int] = field(default_factory=lambda: [512, 1024])
    #: ssl stage: random zoom of the target image RELATIVE TO ``eval_resize`` (1.0 = the test
    #: scale), whatever size the images are stored at. The reference zooms the stored image by
    #: 0.5-1.5; Cityscapes is stored at 2048x1024 and evaluated at 1024x512, so that is [1.0, 3.0]
    #: here, the same recipe (``sdca_dist.image_scale``)
    ssl_scale: list[float] = field(default_factory=lambda: [1.0, 3.0])
    #: ssl crop [H, W] of the zoomed image, never padded (``ssl_scale`` starts at a zoom that covers it)
    ssl_crop: list[int] = field(default_factory=lambda: [512, 1024])
    #: a target-side training scale that misses the test scale by more than 2x (every image of a
    #: stage above 2x or below 0.5x ``eval_resize``) is refused unless this says it is on purpose
    allow_scale_mismatch: bool = False
    #: class-balanced source sampling (docs/method.md, "Source sampling")
    class_balanced: bool = True
    #: DALI CPU threads per rank
    num_threads: int = 2
    #: embedded synthetic benchmark: generate missing shards on first use
    synthetic: bool = False
    synthetic_seed: int = 0
    #: images generated: [source, target train, target val]
    synthetic_counts: list[int] = field(default_factory=lambda: [300, 300, 100])
    #: generated image sizes [H, W]
    synthetic_source_size: list[int] = field(default_factory=lambda: [144, 288])
    synthetic_target_size: list[int] = field(default_factory=lambda: [128, 256])
    #: domain-gap knobs passed to ``python -m sdca_dist.synth`` (gap, palette_shift, noise, ...);
    #: empty = the generator's defaults
    synthetic_gap: dict[str, float] = field(default_factory=dict)


@dataclass
class ModelConfig:
    name: str = "deeplabv2_r101"
    #: local torchvision-format ImageNet state_dict; None = random init (tests, synthetic)
    pretrained: Optional[str] = None


@dataclass
class StageSchedule:
    """Per-stage optimisation settings (docs/method.md, "Stages")."""

    iters: int = 1000
    #: poly schedule length (the reference decays over a longer horizon than it trains)
    schedule_iters: int = 1000
    lr: float = 5e-4
    #: GLOBAL batch size (source in src/sdca, target in ssl/oracle), split evenly over the ranks
    #: so that 1 GPU and 32 GPUs train the same model
    batch_size: int = 1
    #: GLOBAL target batch size in sdca
    target_batch_size: int = 1


@dataclass
class SSLSchedule(StageSchedule):
    """The ssl stage's schedule plus where it starts from."""

    #: imagenet: the published recipe (train_with_ssl.sh passes no resume: ssl trains ImageNet
    #: weights, ``model.pretrained``, on the pseudo labels); sdca: fine-tune the sdca model
    init: str = "imagenet"


@dataclass
class InitConfig:
    """Start a chain from weights made elsewhere."""

    #: a weights file (e.g. an official SDCA checkpoint converted with ``python -m
    #: sdca_dist.models.convert``) that the src stage imports as its model instead of training
    src: Optional[str] = None


@dataclass
class TrainConfig:
    """Settings shared by the training stages; ``iters`` overrides the stage's own count."""

    iters: Optional[int] = None
    #: scaled recipe for more ranks than the published batch (docs/scaling.md): global
    #: batches and LR x K, iterations, poly horizon and cadences / K. An integer >= 1, or "auto"
    #: (the launcher picks the smallest K with which every training stage uses every rank; the
    #: frozen run configuration records the integer it chose)
    scale: Any = 1
    #: linear LR warm-up (iterations AFTER scaling) used when scale > 1; -1 = the default rule
    #: (``sdca_dist.rank_scaling.default_warmup``), 0 = none
    warmup_iters: int = -1
    checkpoint_every: int = 2000
    keep_checkpoints: int = 2
    log_every: int = 50
    image_every: int = 1000
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    classifier_lr_mult: float = 10.0
    #: evaluate on target val at the end of each training stage
    eval_at_end: bool = True
    #: per-rank eval batch size (does not change the result)
    eval_batch_size: int = 1
    #: deterministic algorithms (cuDNN deterministic, ``torch.use_deterministic_algorithms``, cuDNN
    #: autotuning off): GPU runs then resume bitwise; slower. CPU runs are bitwise without it
    deterministic: bool = False
    #: which weights a training stage keeps as model_final.pt (chained into the next stage and
    #: reported): final = the last iteration's; best_val = the reference code's protocol (its
    #: model_best.pth): evaluate on target val every ``select_every`` iterations and at the end,
    #: keep the best. best_val selects ON THE EVALUATION SET, so its numbers are optimistic; they
    #: are labelled "selected" in metrics.json, DONE and the launcher's summary
    select: str = "final"
    #: best_val: evaluation interval in iterations of the published schedule (divided by train.scale
    #: like the other cadences); the reference evaluates every 1,000
    select_every: int = 1000


@dataclass
class MethodConfig:
    """SDCA hyper-parameters (docs/method.md, "Published settings")."""

    tau: float = 100.0
    delta: float = 0.9
    lovasz_weight: float = 0.75
    feat_weight: float = 1.0
    out_weight: float = 1.0
    pseudo_label_cap: float = 0.9
    threshold_bins: int = 1000


@dataclass
class EngineConfig:
    #: ddp | deepspeed
    name: str = "ddp"
    #: auto: nccl with GPUs, gloo without
    backend: str = "auto"
    zero_stage: int = 0
    #: DeepSpeed: train in bf16 (fp32 master weights in the optimizer). DDP: the same as amp=bf16
    bf16: bool = False
    #: DDP mixed precision: auto = bf16 autocast on CUDA, none on the CPU; bf16; fp32 (none).
    #: Weights, gradients and the optimizer stay fp32; the loss and the estimator statistics are
    #: computed in fp32 from the forward's outputs
    amp: str = "auto"
    #: channels_last memory format for the model and its inputs; null = on with CUDA only
    channels_last: Optional[bool] = None
    #: cuDNN autotuning (``torch.backends.cudnn.benchmark``); null = on with CUDA unless
    #: train.deterministic=true
    cudnn_benchmark: Optional[bool] = None


@dataclass
class ClusterConfig:
    #: local | slurm
    name: str = "local"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    time_min: int = 1440
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int = 2
    mem_gb: Optional[int] = None
    max_requeues: int = 5
    #: seconds before the time limit at which SLURM signals the job (USR2)
    signal_delay_s: int = 120
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    #: stage whose model_final.pt the ``eval`` stage evaluates
    model_from: str = "ssl"


@dataclass
class RunSettings:
    """The run's sections that every stage shares; ``Config`` adds one schedule section per
    training stage."""

    conf: str = "???"
    stage: str = "src"
    run_dir: str = "runs/default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    init: InitConfig = field(default_factory=InitConfig)


#: schedule sections whose stage has settings beyond ``StageSchedule``
SCHEDULE_TYPES: dict[str, type] = {"ssl": SSLSchedule}


def _schedule_field(section: str) -> tuple[str, type, Any]:
    cls = SCHEDULE_TYPES.get(section, StageSchedule)
    return (section, cls, field(default_factory=cls))


Config = make_dataclass(
    "Config",
    [_schedule_field(section) for section in SCHEDULE_SECTIONS],
    bases=(RunSettings,),
    namespace={
        "__module__": __name__,
        "__doc__": """The whole run. ``conf`` names the preset (synthetic, gta2city, synthia2city);
    ``src``, ``sdca``, ``ssl``, ``oracle`` (``SCHEDULE_SECTIONS``) are the stages' schedules.

    ``stage`` and ``run_dir`` say which job this is, not how the run behaves: they are never part
    of the frozen run configuration's comparison (``sdca_dist.config.run_config``).""",
    },
)


@dataclass
class LaunchSettings:
    """The launcher's own settings; ``LaunchConfig`` adds one bool per reference stage's
    ``launch_flag`` (``with_oracle``: the target-label oracle, ``with_ablation``: sdca with the
    contrastive terms off, ``sdca_no_align``, and the paired difference)."""

    #: the most nodes the user grants; each stage's job takes what its plan needs (docs/scaling.md)
    nodes: int = 1
    stages: list[str] = field(default_factory=lambda: list(CHAIN))
    wait: bool = False
    dry_run: bool = False
    seeds: int = 1
    #: stages to run again although DONE; every stage after them becomes stale and reruns too
    redo: list[str] = field(default_factory=list)
    #: the stage cache (sdca_dist.stage_cache): a stage whose stage key was computed before reuses
    #: that result; cache_dir defaults to ``stage_cache/`` beside the run (or grid) folder
    cache: bool = True
    cache_dir: Optional[str] = None
    #: grids (sdca_dist.launch.grid): the point the others are compared with, e.g. method.tau=100 (default: the first)
    baseline: Optional[str] = None
    #: print where each stage of each seed (and grid point) stands, then exit (sdca_dist.launch.status)
    status: bool = False


LaunchConfig = make_dataclass(
    "LaunchConfig",
    [(flag, bool, field(default=False)) for flag in LAUNCH_FLAGS],
    bases=(LaunchSettings,),
    namespace={
        "__module__": __name__,
        "__doc__": """Settings of one launch (``python -m sdca_dist.launch``), not of the run: they
    never enter the frozen run configuration, so relaunching with other values is always allowed.""",
    },
)
