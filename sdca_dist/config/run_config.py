"""The run configuration, frozen at the run's start: ``<run_dir>/config.yaml``.

A run folder has ONE configuration. The launcher (or, under torchrun, a stage's first start)
composes it once from ``conf/`` and the command line and writes it; every job after that only
carries (run folder, stage) and reads it back, so no rank re-composes presets that may have
changed on disk and a resumed stage runs exactly the settings its first iterations ran with.

Settings given again on an existing run folder must match: a relaunch or resume with other
values exits with one line naming each differing key (``src.lr: 0.01 -> 0.02``) and writes
nothing. A new run folder is the way to new settings. Only ``cluster.*`` (where the jobs run,
not what they compute) may change between launches; the file keeps the first values.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sdca_dist.config.compose import JOB_KEYS, ConfigError, compose_config, validate
from sdca_dist.config.schema import Config, LaunchConfig
from sdca_dist.files import atomic_write_text
from sdca_dist.run_folder import CONFIG as CONFIG_FILE
from sdca_dist.run_folder import CONFIG_LOCK
from sdca_dist.run_folder import CONFIG_ORIGIN as ORIGIN_FILE

#: sections that may differ between launches of one run: where jobs run, not what they compute
VOLATILE = ("cluster",)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(run settings, launcher settings) of a command line."""
    launch_keys = set(LaunchConfig.__dataclass_fields__)
    run, launch = [], []
    for arg in argv:
        key = arg.split("=", 1)[0].lstrip("+~")
        (launch if key in launch_keys else run).append(arg)
    return run, launch


def parse_launch(overrides: Sequence[str]) -> LaunchConfig:
    """Launcher settings, typed and range-checked; each failure one line naming the key."""
    from sdca_dist.stage_table import STAGE_NAMES

    base = OmegaConf.structured(LaunchConfig)
    try:
        given = OmegaConf.from_dotlist([o.lstrip("+") for o in overrides])
        merged = OmegaConf.merge(base, given)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "launcher setting"
        raise ConfigError(f"{key}: {' '.join(str(exc).split()).split(chr(10))[0][:200]}") from None
    launch: LaunchConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    if launch.nodes < 1:
        raise ConfigError(f"nodes={launch.nodes} must be >= 1")
    if launch.seeds < 1:
        raise ConfigError(f"seeds={launch.seeds} must be >= 1")
    if not launch.stages:
        raise ConfigError("stages=[] names no stage; valid stages: " + ", ".join(STAGE_NAMES))
    for key in ("stages", "redo"):
        bad = [s for s in getattr(launch, key) if s not in STAGE_NAMES]
        if bad:
            raise ConfigError(f"unknown stage(s) {bad} in {key}=; valid stages: {', '.join(STAGE_NAMES)}")
    return launch


def settings_of(cfg: DictConfig) -> dict[str, Any]:
    """The settings that define what a run computes, as plain data (no job keys, no volatile ones)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    for key in (*JOB_KEYS, *VOLATILE):
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return data


def settings_hash(cfg: DictConfig) -> str:
    return hashlib.sha256(json.dumps(settings_of(cfg), sort_keys=True).encode()).hexdigest()


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): node}


def flat_settings(cfg: DictConfig) -> dict[str, Any]:
    """``settings_of`` as flat ``dotted.key: value`` (what DONE records keep, to name differences)."""
    return _flatten(settings_of(cfg))


def differences(old: DictConfig, new: DictConfig) -> list[str]:
    """``key: old -> new`` for every setting that differs."""
    a, b = _flatten(settings_of(old)), _flatten(settings_of(new))
    return [
        f"{k}: {a.get(k, '(absent)')} -> {b.get(k, '(absent)')}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def _fmt(cfg: DictConfig) -> str:
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    data.pop("stage", None)
    data.pop("run_dir", None)
    return OmegaConf.to_yaml(OmegaConf.create(data))


def config_path(run_dir: Path | str) -> Path:
    return Path(run_dir) / CONFIG_FILE


def load_frozen(run_dir: Path | str, stage: str | None = None) -> DictConfig:
    """The frozen configuration of ``run_dir``, read-only, with ``run_dir`` and ``stage`` set for
    this job. It is validated as a composed one is (the schema's types and every range check), so
    a hand-edited value, or a value this version of the code reads differently (a ``data.ssl_scale``
    of the stored image where the evaluation size is meant), is refused in one line naming the
    file and the key instead of running."""
    path = config_path(run_dir)
    try:
        data = OmegaConf.load(path)
        cfg = OmegaConf.merge(OmegaConf.structured(Config), data)
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist: {run_dir} is not a run folder (start one with conf=NAME)") from None
    except (OSError, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read as a run configuration: {' '.join(str(exc).split())[:200]}") from None
    assert isinstance(cfg, DictConfig)
    cfg.run_dir = str(run_dir)
    if stage is not None:
        cfg.stage = stage
    try:
        validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _origin(run_dir: Path) -> list[str]:
    try:
        return list(json.loads((run_dir / ORIGIN_FILE).read_text())["overrides"])
    except (OSError, ValueError, KeyError):
        return []


def _atomic_write(path: Path, text: str) -> None:
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None


def without_job_keys(overrides: Sequence[str]) -> list[str]:
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in JOB_KEYS]


def resolve(
    run_dir: Path | str, overrides: Sequence[str], stage: str | None = None, adjust=None
) -> tuple[DictConfig, bool]:
    """The run configuration of ``run_dir`` for a command line's ``overrides``.

    Existing run folder: the frozen file; the overrides (if any) must give the same settings,
    else ``ConfigError`` listing each difference. New run folder: the overrides composed (``conf=``
    needed). Returns (config, is_new); nothing is written here (see ``freeze``). ``adjust``
    (cfg -> cfg) lets the launcher derive a seed's configuration or resolve ``train.scale=auto``
    before the comparison."""
    run_dir = Path(run_dir)
    settings = without_job_keys(overrides)
    job = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "eval.model_from"}
    if config_path(run_dir).is_file():
        frozen = load_frozen(run_dir, stage)
        if job:
            frozen = with_values(frozen, eval__model_from=job["eval.model_from"])
            compose_config([f"conf={frozen.conf}", f"eval.model_from={frozen.eval.model_from}"])  # validates it
        if not settings:
            return frozen, False
        # the first command line, then this one (later values of a key win), on the frozen preset
        merged = {o.split("=", 1)[0].lstrip("+"): o for o in [f"conf={frozen.conf}", *_origin(run_dir), *settings]}
        job_args = [run_dir_override(run_dir)] + ([f"stage={stage}"] if stage else [])
        cfg = compose_config(list(merged.values()) + job_args)
        if adjust is not None:
            cfg = adjust(cfg)
        diff = differences(frozen, cfg)
        if diff:
            raise ConfigError(
                f"{run_dir} was started with other settings ({'; '.join(diff)}); "
                "a run folder keeps its settings: use a new run_dir for new ones"
            )
        return frozen, False
    if not any(o.split("=", 1)[0] == "conf" for o in settings):
        raise ConfigError(
            f"{config_path(run_dir)} does not exist: start a new run with conf=NAME (synthetic, gta2city, synthia2city)"
        )
    cfg = compose_config(
        list(settings)
        + [f"{k}={v}" for k, v in job.items()]
        + [run_dir_override(run_dir)]
        + ([f"stage={stage}"] if stage else [])
    )
    if adjust is not None:
        cfg = adjust(cfg)
    return cfg, True


def run_dir_override(run_dir: Path | str) -> str:
    """``run_dir=...`` for composing, quoted for Hydra's grammar (a grid point's folder is named
    like ``method.tau=10``)."""
    text = str(run_dir)
    if re.fullmatch(r"[\w./+-]*", text):
        return f"run_dir={text}"
    return "run_dir='" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def freeze(run_dir: Path | str, cfg: DictConfig, overrides: Sequence[str]) -> bool:
    """Write ``<run_dir>/config.yaml`` once (atomically, under a lock so concurrent first starts
    agree); an existing file must hold the same settings. True when this call wrote it (the
    caller may then take it back if the start is refused: ``unfreeze``)."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create run folder {run_dir}: {exc.strerror or exc}") from None
    if not run_dir.is_dir():
        raise ConfigError(f"run_dir={run_dir} is not a folder")
    from sdca_dist.locks import FileLock, LockError

    path = config_path(run_dir)
    lock = FileLock(run_dir / CONFIG_LOCK, setting="run_dir")
    try:
        lock.acquire(poll_s=0.2)
    except LockError as exc:
        raise ConfigError(str(exc)) from None
    with lock:
        if path.is_file():
            diff = differences(load_frozen(run_dir), cfg)
            if diff:
                raise ConfigError(f"{run_dir} was started with other settings ({'; '.join(diff)})")
            return False
        _atomic_write(run_dir / ORIGIN_FILE, json.dumps({"overrides": without_job_keys(overrides)}, indent=1) + "\n")
        _atomic_write(path, _fmt(cfg))
    return True


def with_values(cfg: DictConfig, **dotted: Any) -> DictConfig:
    """A copy of ``cfg`` with ``key=value`` settings replaced (``train__scale=2`` -> train.scale)."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    out = OmegaConf.merge(OmegaConf.structured(Config), out)
    for key, value in dotted.items():
        OmegaConf.update(out, key.replace("__", "."), value, merge=False)
    OmegaConf.set_readonly(out, True)
    assert isinstance(out, DictConfig)
    return out


def differing_from_preset(cfg: DictConfig) -> list[str]:
    """``key: value`` for each setting that differs from the plain preset (what a stage prints)."""
    try:
        preset = compose_config([f"conf={cfg.conf}"])
    except ConfigError:
        return []
    a, b = _flatten(settings_of(preset)), _flatten(settings_of(cfg))
    return [f"{k}={b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
