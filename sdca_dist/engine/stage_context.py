"""Everything one stage run needs, built once: config, ranks, run folder, observer, model."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from sdca_dist.config.reads import track_typed
from sdca_dist.config.schema import Config
from sdca_dist.engine.checkpoint import atomic_torch_save, atomic_write_text
from sdca_dist.engine.distributed import DistContext
from sdca_dist.engine.observe import StageObserver
from sdca_dist.lineage import StageInputError
from sdca_dist.rank_scaling import ScaledSchedule as Schedule
from sdca_dist.rank_scaling import scaled_schedule
from sdca_dist.run_folder import METRICS, MODEL_FINAL, PER_CLASS_IOU, RunDir
from sdca_dist.stage_table import inputs_of


@dataclass
class StageContext:
    cfg: DictConfig
    ctx: DistContext
    run: RunDir
    name: str
    observer: StageObserver
    _settings: Optional[Config] = field(default=None, repr=False)

    @property
    def settings(self) -> Config:
        """The run configuration as typed dataclasses (``OmegaConf.to_object`` once per stage):
        components take their section (MethodConfig, TrainConfig, EngineConfig), not casts."""
        if self._settings is None:
            self._settings = track_typed(OmegaConf.to_object(self.cfg))  # type: ignore[assignment]
        return self._settings  # type: ignore[return-value]

    @property
    def folder(self) -> Path:
        return self.run.stage(self.name)

    def input_file(self, file: str) -> Optional[Path]:
        """Where this stage reads ``file`` from an earlier stage: the producer the stage table
        names for it under the run's settings (``stage_table.inputs_of``), so that a stage function
        never names the stage that made its model and the table stays the one place that says so
        (the lineage hashes the same entries). None when the stage reads no such file under these
        settings (ssl started from ImageNet reads no model)."""
        found = [i for i in inputs_of(self.name, self.cfg) if i.file == file]
        if len(found) > 1:
            raise StageInputError(f"stage {self.name} reads {file} from {len(found)} stages; name one")
        return self.run.root / found[0].rel if found else None

    def required_input(self, file: str) -> Path:
        """``input_file`` for a file the stage cannot run without."""
        path = self.input_file(file)
        if path is None:
            raise StageInputError(f"stage {self.name} reads no {file} (sdca_dist/stage_table.py declares its inputs)")
        return path

    def schedule(self) -> Schedule:
        """The stage's schedule after ``train.iters`` and the scaled recipe (``train.scale``)."""
        return scaled_schedule(self.cfg, self.name)

    def build_model(self, init_from: Optional[Path] = None, freeze_bn: bool = True) -> torch.nn.Module:
        """The configured model, random/ImageNet init or the weights of an earlier stage."""
        from sdca_dist.models import build_model

        torch.manual_seed(self.cfg.seed)  # identical init on every rank
        pretrained = self.cfg.model.pretrained if init_from is None else None
        model = build_model(self.cfg.model.name, self.cfg.data.num_classes, pretrained=pretrained, freeze_bn=freeze_bn)
        if init_from is not None:
            try:
                state = torch.load(init_from, map_location="cpu", weights_only=True)
                model.load_state_dict(state)
            except Exception as exc:  # corrupt file, or weights of another model/class count
                detail = (
                    "not a weights-only torch state_dict (truncated, corrupt or foreign file)"
                    if isinstance(exc, pickle.UnpicklingError)
                    else " ".join(str(exc).split())[:300]
                )
                raise StageInputError(
                    f"cannot load model weights {init_from}: {type(exc).__name__}: {detail}"
                ) from None
            self.observer.log(f"initialised from {init_from}")
        return model.to(self.ctx.device)

    def save_model_final(self, state: dict[str, torch.Tensor]) -> Path:
        """A plain float32 state_dict, identical in form for DDP and DeepSpeed (bf16) runs."""
        path = self.folder / MODEL_FINAL
        if self.ctx.is_main:
            plain = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu() for k, v in state.items()}
            atomic_torch_save(plain, path)
        self.ctx.barrier()
        return path

    def write_json(self, name: str, payload: dict) -> Path:
        path = self.folder / name
        if self.ctx.is_main:
            atomic_write_text(path, json.dumps(payload, indent=1, sort_keys=False) + "\n")
        return path

    def write_metrics(self, report: dict, extra: Optional[dict] = None) -> Path:
        payload = {**report, **(extra or {})}
        path = self.write_json(METRICS, payload)
        if self.ctx.is_main and "table" in report:
            atomic_write_text(self.folder / PER_CLASS_IOU, report["table"] + "\n")
        return path
