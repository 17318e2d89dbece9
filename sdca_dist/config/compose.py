"""Compose a run's configuration from ``conf/`` with Hydra's compose API.

The compose API (not ``@hydra.main``) is used so that the engine and the launcher share one
code path, the working directory is never changed, and no ``outputs/`` folders appear.
Errors from Hydra/OmegaConf are turned into one line that names the key or option at fault
and the valid choices.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sdca_dist.config.schema import Config, LaunchConfig
from sdca_dist.stage_table import SCHEDULE_SECTIONS, STAGE_NAMES, TABLE

CONFIG_NAME = "sdca"
#: dict-valued settings that take keys of the user's choosing (``+cluster.extra.reservation=x``);
#: everywhere else a key must exist in the schema
FREE_FORM = ("cluster.extra.", "data.synthetic_gap.")
#: keys that name the job (which stage, which run folder, which model the eval stage scores), not
#: how the run behaves: given per job, never frozen
JOB_KEYS = ("stage", "run_dir", "eval.model_from")


class ConfigError(ValueError):
    """A configuration that cannot be composed or validated; its message is one line."""


def conf_dir() -> Path:
    """The ``conf/`` folder: $SDCA_CONF_DIR, else the repository's ``conf/`` beside the package."""
    env = os.environ.get("SDCA_CONF_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "conf"
    if not (path / f"{CONFIG_NAME}.yaml").is_file():
        raise ConfigError(f"config folder {path} has no {CONFIG_NAME}.yaml (set SDCA_CONF_DIR)")
    return path


def _register_schema() -> None:
    ConfigStore.instance().store(name="sdca_schema", node=Config)


def _choices(group: str) -> list[str]:
    folder = conf_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text += " (" + " ".join(str(cause).split()) + ")"
    return text


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``conf/sdca.yaml`` + overrides into a validated, read-only ``DictConfig``."""
    overrides = list(overrides)
    launch_keys = set(LaunchConfig.__dataclass_fields__)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key=value")
        key = ov.split("=", 1)[0]
        bare = key.lstrip("+~")
        if key != bare and not bare.startswith(FREE_FORM):
            # Hydra would add (+) or delete (~) a key the schema does not have: a typo such as
            # +train.itres=20 must not pass silently
            raise ConfigError(
                f"{key}: adding or deleting settings is only allowed under "
                f"{', '.join(f + '*' for f in FREE_FORM)}; settings are fixed by the schema"
            )
        if bare in launch_keys:
            raise ConfigError(f"{bare} is a setting of the launcher (launch/slurm.py), not of a run")
    # Name an unknown preset/group option up front, with the valid choices.
    for ov in overrides:
        key, _, value = ov.lstrip("+~").partition("=")
        if key in ("conf", "model", "engine", "cluster"):
            valid = _choices(key)
            if value not in valid:
                raise ConfigError(f"unknown {key}={value!r}; valid choices: {', '.join(valid)}")
    _register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name=CONFIG_NAME, overrides=overrides)
    except (ConfigCompositionException, MissingConfigException, OverrideParseException, OmegaConfBaseException) as exc:
        raise ConfigError(_explain(exc)) from None
    finally:
        GlobalHydra.instance().clear()
    apply_classes_file(cfg)
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def apply_classes_file(cfg: DictConfig) -> None:
    """``data.classes=FILE``: check the file (one line naming it on any fault), record its absolute
    path (every stage job finds the same file whatever its working directory) and set
    ``data.num_classes`` from it, so that the model head, the distributions and the metrics follow it."""
    path = cfg.data.get("classes")
    if not path:
        return
    from sdca_dist.classes import ClassesError, load_classes

    try:
        table = load_classes(Path(str(path)).expanduser())
    except ClassesError as exc:
        raise ConfigError(f"data.classes={path}: {exc}") from None
    cfg.data.classes = str(Path(str(path)).expanduser().resolve())
    cfg.data.num_classes = table.num_classes


def _schema_keys() -> list[str]:
    """Every settable key of the schema, dotted (free-form dicts as one key)."""
    import dataclasses

    def walk(cls, prefix: str) -> list[str]:
        out = []
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out += walk(type(default), f"{prefix}{f.name}.") if dataclasses.is_dataclass(default) else [prefix + f.name]
        return out

    return walk(Config, "")


def _explain(exc: BaseException) -> str:
    """Hydra's message as one line; an unknown key is named with the nearest real one (Hydra's
    own hint, "use +key=value", would add the typo as a new setting)."""
    text = _one_line(exc)
    m = re.search(r"Could not override '([^']+)'", text)
    if m and re.search(r"Key '[^']+' (is )?not in", text):
        key = m.group(1)
        close = difflib.get_close_matches(key, _schema_keys(), n=1)
        return f"unknown setting {key!r}" + (f" (did you mean {close[0]}?)" if close else "")
    return f"invalid configuration: {text}"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def non_finite_settings(cfg: DictConfig) -> list[str]:
    """``key=value`` of every float setting (lists and free-form dicts included) that is NaN or inf."""
    import math

    def walk(node, prefix: str) -> list[str]:
        if isinstance(node, dict):
            return [k for key, v in node.items() for k in walk(v, f"{prefix}{key}.")]
        if isinstance(node, list):
            return [k for i, v in enumerate(node) for k in walk(v, f"{prefix.rstrip('.')}[{i}].")]
        if isinstance(node, float) and not math.isfinite(node):
            return [f"{prefix.rstrip('.')}={node}"]
        return []

    return walk(OmegaConf.to_container(cfg, resolve=True), "")


def check_finite(cfg: DictConfig) -> None:
    """Every number of a run is finite: ``src.lr=inf`` would train on NaN from the first step."""
    bad = non_finite_settings(cfg)
    if bad:
        raise ConfigError(f"{', '.join(bad)}: settings must be finite numbers (not inf or nan)")


def validate(cfg: DictConfig) -> None:
    """Checks a type system cannot express; each failure names its key."""
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
    except Exception:  # pragma: no cover - older omegaconf
        missing = []
    if missing:
        raise ConfigError(f"missing value for {', '.join(missing)} (pick a preset with conf=NAME)")
    if cfg.stage not in STAGE_NAMES:
        raise ConfigError(f"unknown stage={cfg.stage!r}; valid stages: {', '.join(STAGE_NAMES)}")
    check_finite(cfg)
    _check(bool(str(cfg.run_dir).strip()), "run_dir is empty; name the run folder (run_dir=runs/NAME)")
    _check(cfg.seed >= 0, f"seed={cfg.seed} must be >= 0")
    for name in SCHEDULE_SECTIONS:
        s = cfg[name]
        _check(s.iters >= 1, f"{name}.iters={s.iters} must be >= 1")
        _check(
            s.schedule_iters >= s.iters,
            f"{name}.schedule_iters={s.schedule_iters} must be >= {name}.iters={s.iters} "
            "(the poly schedule ends at its horizon)",
        )
        _check(s.lr > 0, f"{name}.lr={s.lr} must be > 0")
        _check(s.batch_size >= 1, f"{name}.batch_size={s.batch_size} must be >= 1")
        _check(s.target_batch_size >= 0, f"{name}.target_batch_size={s.target_batch_size} must be >= 0")
    for name in dict.fromkeys(st.schedule for st in TABLE if "target_batch_size" in st.batch_keys):
        n = cfg[name].target_batch_size
        _check(n >= 1, f"{name}.target_batch_size={n} must be >= 1")
    t = cfg.train
    _check(t.iters is None or t.iters >= 1, f"train.iters={t.iters} must be >= 1")
    for key in ("checkpoint_every", "keep_checkpoints", "log_every", "image_every", "eval_batch_size", "select_every"):
        _check(t[key] >= 1, f"train.{key}={t[key]} must be >= 1")
    # checkpoint selection: best_val evaluates during training, so it needs the evaluation
    _check(t.select in ("final", "best_val"), f"train.select={t.select!r}; valid: final, best_val")
    _check(
        t.select != "best_val" or t.eval_at_end,
        "train.select=best_val selects by evaluating on target val; it needs train.eval_at_end=true",
    )
    _check(t.warmup_iters >= -1, f"train.warmup_iters={t.warmup_iters} must be >= 0 (or -1 for the default rule)")
    from sdca_dist.rank_scaling import ScaleError, parse_scale

    try:
        parse_scale(t.scale)
    except ScaleError as exc:
        raise ConfigError(str(exc)) from None
    _check(
        t.momentum >= 0 and t.weight_decay >= 0 and t.poly_power > 0 and t.classifier_lr_mult > 0,
        "train.momentum, train.weight_decay must be >= 0 and train.poly_power, train.classifier_lr_mult > 0",
    )
    m = cfg.method
    _check(m.tau > 0, f"method.tau={m.tau} must be > 0")
    _check(0 < m.delta < 1, f"method.delta={m.delta} must be in (0, 1)")
    _check(0 < m.pseudo_label_cap <= 1, f"method.pseudo_label_cap={m.pseudo_label_cap} must be in (0, 1]")
    for key in ("lovasz_weight", "feat_weight", "out_weight"):
        _check(m[key] >= 0, f"method.{key}={m[key]} must be >= 0")
    _check(m.threshold_bins >= 2, f"method.threshold_bins={m.threshold_bins} must be >= 2")
    c = cfg.cluster
    _check(c.tasks_per_node >= 1, f"cluster.tasks_per_node={c.tasks_per_node} must be >= 1")
    _check(c.gpus_per_node >= 0, f"cluster.gpus_per_node={c.gpus_per_node} must be >= 0")
    _check(c.cpus_per_task >= 1, f"cluster.cpus_per_task={c.cpus_per_task} must be >= 1")
    _check(c.time_min >= 1, f"cluster.time_min={c.time_min} must be >= 1")
    _check(c.max_requeues >= 0, f"cluster.max_requeues={c.max_requeues} must be >= 0")
    _check(cfg.data.num_threads >= 1, f"data.num_threads={cfg.data.num_threads} must be >= 1")
    lo, hi = (float(x) for x in cfg.data.ssl_scale) if len(cfg.data.ssl_scale) == 2 else (0.0, -1.0)
    _check(0 < lo <= hi, f"data.ssl_scale={list(cfg.data.ssl_scale)} must be [low, high] with 0 < low <= high")
    _check(
        len(cfg.data.synthetic_counts) == 3 and min(cfg.data.synthetic_counts) >= 1,
        f"data.synthetic_counts={list(cfg.data.synthetic_counts)} must be 3 counts >= 1 (source, target train, val)",
    )
    _check(cfg.ssl.init in ("imagenet", "sdca"), f"ssl.init={cfg.ssl.init!r}; valid: imagenet, sdca")
    _check(
        cfg.init.src is None or str(cfg.init.src).endswith(".pt"),
        f"init.src={cfg.init.src!r} must be a .pt weights file (python -m sdca_dist.models.convert makes one)",
    )
    _check(
        cfg.model.pretrained is None or cfg.model.name != "small",
        f"model.pretrained={cfg.model.pretrained}: model {cfg.model.name!r} has no ImageNet weights "
        "(set model.pretrained=null, or pick model=deeplabv2_r101 / deeplabv2_vgg16)",
    )
    from sdca_dist.stage_table import MODEL_STAGES

    mf = str(cfg.eval.model_from)
    _check(
        mf in MODEL_STAGES or mf.endswith(".pt"),
        f"eval.model_from={mf!r}: a stage with a model ({', '.join(MODEL_STAGES)}) or a .pt weights file",
    )
    if cfg.engine.name not in ("ddp", "deepspeed"):
        raise ConfigError(f"engine.name={cfg.engine.name!r}; valid: ddp, deepspeed")
    if cfg.engine.amp not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"engine.amp={cfg.engine.amp!r}; valid: auto, bf16, fp32")
    if cfg.engine.name == "ddp" and cfg.engine.bf16 and cfg.engine.amp == "fp32":
        raise ConfigError("engine.bf16=true asks DDP for bf16 but engine.amp=fp32 forbids it; set one of them")
    if cfg.engine.zero_stage not in (0, 1, 2):
        # ZeRO-3 partitions the parameters themselves; the estimators and frozen-BN code need them whole
        raise ConfigError(f"engine.zero_stage={cfg.engine.zero_stage} must be 0, 1 or 2")
    if cfg.data.num_classes not in (16, 19) and not cfg.data.get("classes"):
        raise ConfigError(
            f"data.num_classes={cfg.data.num_classes} must be 19 or 16 (other classes: data.classes=FILE, "
            "docs/datasets.md)"
        )
    for key in ("source_resize", "target_resize", "eval_resize", "ssl_crop"):
        value = list(cfg.data[key])
        if len(value) != 2 or min(value) < 1:
            raise ConfigError(f"data.{key}={value} must be [H, W] with positive sizes")
    from sdca_dist.image_scale import scale_mismatch, ssl_zoom_below_crop

    for problem in (ssl_zoom_below_crop(cfg.data), scale_mismatch(cfg)):
        _check(problem is None, str(problem))


def config_to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
