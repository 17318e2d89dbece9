"""Compose a run's configuration from ``conf/`` with Hydra's compose API.

The compose API (not ``@hydra.main``) is used so that the engine and the launcher share one
code path, the working directory is never changed, and no ``outputs/`` folders appear.
Errors from Hydra/OmegaConf are turned into one line that names the key or option at fault
and the valid choices.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sdca_dist.config.schema import STAGES, Config

CONFIG_NAME = "sdca"


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
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key=value")
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
    except (ConfigCompositionException, MissingConfigException, OmegaConfBaseException) as exc:
        raise ConfigError(f"invalid configuration: {_one_line(exc)}") from None
    finally:
        GlobalHydra.instance().clear()
    _validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _validate(cfg: DictConfig) -> None:
    """Checks a type system cannot express; each failure names its key."""
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
    except Exception:  # pragma: no cover - older omegaconf
        missing = []
    if missing:
        raise ConfigError(f"missing value for {', '.join(missing)} (pick a preset with conf=NAME)")
    if cfg.stage not in STAGES:
        raise ConfigError(f"unknown stage={cfg.stage!r}; valid stages: {', '.join(STAGES)}")
    bad = [s for s in cfg.stages if s not in STAGES]
    if bad:
        raise ConfigError(f"unknown stage(s) {bad} in stages=; valid stages: {', '.join(STAGES)}")
    if cfg.nodes < 1:
        raise ConfigError(f"nodes={cfg.nodes} must be >= 1")
    if cfg.seeds < 1:
        raise ConfigError(f"seeds={cfg.seeds} must be >= 1")
    if cfg.engine.name not in ("ddp", "deepspeed"):
        raise ConfigError(f"engine.name={cfg.engine.name!r}; valid: ddp, deepspeed")
    if cfg.engine.zero_stage not in (0, 1, 2):
        # ZeRO-3 partitions the parameters themselves; the estimators and frozen-BN code need them whole
        raise ConfigError(f"engine.zero_stage={cfg.engine.zero_stage} must be 0, 1 or 2")
    if cfg.data.num_classes not in (16, 19):
        raise ConfigError(f"data.num_classes={cfg.data.num_classes} must be 19 or 16")
    for key in ("source_resize", "target_resize", "eval_resize", "ssl_crop"):
        value = list(cfg.data[key])
        if len(value) != 2 or min(value) < 1:
            raise ConfigError(f"data.{key}={value} must be [H, W] with positive sizes")


def config_to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
