"""Model wrapping: DDP or DeepSpeed behind one small face the training loops use.

A training step is one or more micro-steps (sdca: a source micro-step and a target one) followed
by one optimiser step. DDP all-reduces gradients only on the last micro-step (``no_sync`` on the
others); DeepSpeed does the same through its gradient-accumulation boundary. Losses are summed,
never averaged over micro-steps, so the two engines compute the same update.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from typing import Any, Collection, Iterator

import torch
import torch.nn as nn

from sdca_dist.config.schema import EngineConfig, TrainConfig
from sdca_dist.engine.distributed import DistContext, broadcast_tensors
from sdca_dist.engine.schedule import apply_lr


@dataclass(frozen=True)
class SpeedSettings:
    """How the model runs on this device (``engine.amp``, ``engine.channels_last``,
    ``engine.cudnn_benchmark``, ``train.deterministic`` resolved for it). On the CPU every
    default is "nothing changes", so CPU results stay bitwise what they are without them."""

    #: DDP autocast dtype (None: none)
    amp: torch.dtype | None = None
    channels_last: bool = False
    cudnn_benchmark: bool = False
    deterministic: bool = False


def speed_settings(engine: EngineConfig, train: TrainConfig, device: torch.device) -> SpeedSettings:
    """The fast choice on CUDA, no change on the CPU, an explicit setting as given. ``engine.bf16``
    with DDP means bf16 autocast (DeepSpeed does its own bf16); ``train.deterministic`` turns cuDNN
    autotuning off whatever ``engine.cudnn_benchmark`` says (it picks kernels by timing)."""
    cuda = device.type == "cuda"
    amp = None
    if engine.name == "ddp":
        choice = engine.amp if engine.amp != "auto" else ("bf16" if cuda or engine.bf16 else "fp32")
        if engine.bf16:
            choice = "bf16"
        amp = torch.bfloat16 if choice == "bf16" else None
    channels_last = cuda if engine.channels_last is None else bool(engine.channels_last)
    benchmark = cuda if engine.cudnn_benchmark is None else bool(engine.cudnn_benchmark)
    return SpeedSettings(
        amp=amp,
        channels_last=channels_last and engine.name == "ddp",
        cudnn_benchmark=benchmark and not train.deterministic,
        deterministic=bool(train.deterministic),
    )


def inference_amp(engine: EngineConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of inference (eval, dist_init, pseudo_label, predict) under either
    engine: ``engine.amp`` resolved as for DDP training (auto: bf16 on CUDA, none on the CPU;
    ``engine.bf16`` means bf16). The weights stay as loaded; outputs are read as float32.
    ``engine``: an EngineConfig or the run configuration's ``engine`` section (same keys)."""
    choice = engine.amp if engine.amp != "auto" else ("bf16" if device.type == "cuda" or engine.bf16 else "fp32")
    if engine.bf16:
        choice = "bf16"
    return torch.bfloat16 if choice == "bf16" else None


def inference_autocast(amp: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``amp`` on ``device``; nothing (the exact fp32 path) for None."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp)


def apply_backend_settings(speed: SpeedSettings) -> None:
    """Process-wide switches: cuDNN autotuning and deterministic algorithms. Deterministic mode
    warns (``warn_only``) for an op without a deterministic kernel instead of failing the run: a
    run that printed such a warning is not bitwise reproducible on a GPU."""
    torch.backends.cudnn.benchmark = speed.cudnn_benchmark
    if speed.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reads it at its first call
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def build_optimizer(
    model: nn.Module, momentum: float, weight_decay: float, classifier_lr_mult: float
) -> torch.optim.Optimizer:
    """SGD over the model's groups; each group remembers its LR multiplier (classifier 10x)."""
    groups = [g for g in model.param_groups(1.0) if g["params"]]
    for g in groups:
        g["lr_mult"] = classifier_lr_mult if g.get("name") == "classifier" else 1.0
    return torch.optim.SGD(groups, lr=1.0, momentum=momentum, weight_decay=weight_decay)


def ddp_buffer_keywords(sync: bool, accepted: Collection[str] | None = None) -> dict[str, bool]:
    """DDP's switch for syncing buffers at each forward, in the installed torch's spelling.

    torch 2.13 added ``forward_sync_buffers`` (and deprecated ``broadcast_buffers``); older torch,
    still common on cluster images, only knows ``broadcast_buffers``. ``accepted``: the keyword
    names of ``DistributedDataParallel.__init__`` (the installed torch's when omitted). The two
    spellings differ in one point: ``broadcast_buffers=False`` also skips DDP's broadcast of the
    buffers at construction; :class:`DDPEngine` then broadcasts them itself.
    """
    if accepted is None:
        accepted = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": sync} if "forward_sync_buffers" in accepted else {"broadcast_buffers": sync}


class ModelEngine:
    """Common face of the DDP and DeepSpeed engines."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    micro_steps: int
    #: floating dtype the model runs in (bf16 under DeepSpeed bf16)
    dtype: torch.dtype = torch.float32

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @contextlib.contextmanager
    def micro_step(self, index: int) -> Iterator[None]:
        yield

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self, lr: float) -> None:
        raise NotImplementedError

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)  # a frozen-BN model keeps its BN in eval mode (SegmentationModel.train)

    def eval(self) -> None:
        self.module.eval()

    def sync_buffers(self) -> None:
        """Make every rank's buffers (BN running statistics) rank 0's: DDP syncs them at the START
        of each forward, so after the last training step the ranks differ by one local update."""
        broadcast_tensors(list(self.module.buffers()), self.ctx)

    # --- checkpoint ----------------------------------------------------------------------------
    def model_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def final_state(self) -> dict[str, torch.Tensor]:
        """The weights to publish as model_final.pt: the optimizer's own copy of the parameters
        (for mixed precision its fp32 master, not the rounded module). Collective."""
        return self.model_state()

    def optimizer_state(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(replicated state saved once by rank 0, per-rank shard)."""
        raise NotImplementedError

    def load(self, model: dict[str, torch.Tensor], common_opt: dict | None, rank_opt: dict | None) -> None:
        raise NotImplementedError


class DDPEngine(ModelEngine):
    def __init__(
        self,
        model: nn.Module,
        ctx: DistContext,
        optimizer: torch.optim.Optimizer,
        micro_steps: int,
        freeze_bn: bool,
        accepted: Collection[str] | None = None,
        speed: SpeedSettings | None = None,
    ) -> None:
        """``accepted``: DDP's keyword names (the installed torch's when omitted; tests pass an
        older torch's to build the engine as that torch would). ``speed``: autocast dtype and
        memory format (none by default)."""
        self.speed = speed or SpeedSettings()
        self.module = model.to(ctx.device)
        if self.speed.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.ctx = ctx
        self.optimizer = optimizer
        self.micro_steps = micro_steps
        self.freeze_bn = freeze_bn
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # Frozen BN (src/sdca) has nothing to sync; trainable BN is SyncBN on GPUs. On CPU (no
        # SyncBN there) rank 0's running statistics are broadcast so every rank holds the same model.
        sync_buffers = (not freeze_bn) and ctx.device.type != "cuda"
        buffer_keywords = ddp_buffer_keywords(sync_buffers, accepted)
        if buffer_keywords == {"broadcast_buffers": False}:  # torch < 2.13 skips the start-up broadcast
            broadcast_tensors(list(model.buffers()), ctx)
        self.wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **buffer_keywords)
        self._last = True

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.speed.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.speed.amp is None:
            return self.wrapped(images)
        with torch.autocast(device_type=self.ctx.device.type, dtype=self.speed.amp):
            feats, logits = self.wrapped(images)
        return feats.float(), logits.float()  # the loss and the estimator statistics in fp32

    @contextlib.contextmanager
    def micro_step(self, index: int) -> Iterator[None]:
        last = index == self.micro_steps - 1
        with contextlib.nullcontext() if last else self.wrapped.no_sync():
            yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float) -> None:
        apply_lr(self.optimizer.param_groups, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_state(self):
        return self.optimizer.state_dict(), None

    def load(self, model, common_opt, rank_opt) -> None:
        self.module.load_state_dict(model)
        if common_opt is not None:
            self.optimizer.load_state_dict(common_opt)


class DeepSpeedEngine(ModelEngine):
    """DeepSpeed (ZeRO 0-3, optional bf16) with our SGD and poly schedule."""

    def __init__(
        self,
        model: nn.Module,
        ctx: DistContext,
        optimizer: torch.optim.Optimizer,
        micro_steps: int,
        micro_batch: int,
        zero_stage: int,
        bf16: bool,
        freeze_bn: bool,
    ) -> None:
        import deepspeed  # imported here: DDP runs must not pay DeepSpeed's start-up

        config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": max(1, micro_batch),
            "gradient_accumulation_steps": micro_steps,
            "zero_optimization": {"stage": zero_stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if bf16:
            config["bf16"] = {"enabled": True}
            # a BatchNorm that trains has bf16 parameters: its buffers must be bf16 too, else "expected
            # scalar type BFloat16 but found Float"; frozen BatchNorms get fp32 back below
            config["data_types"] = {"buffer_dtype": "bf16"}
        self.ctx = ctx
        self.micro_steps = micro_steps
        self.freeze_bn = freeze_bn
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self._base_groups = optimizer.param_groups
        model = model.to(ctx.device)
        fp32 = _frozen_batchnorm_state(model) if bf16 else {}
        engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.engine = engine
        self.module = engine.module
        _restore_fp32(self.module, fp32)
        self.optimizer = ds_opt
        self.zero_stage = zero_stage

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, logits = self.engine(images.to(self.dtype))
        return feats.float(), logits.float()

    def backward(self, loss: torch.Tensor) -> None:
        # summed over micro-steps (as DDP), not averaged
        self.engine.backward(loss, scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # only advances DeepSpeed's micro-step counter

    def step(self, lr: float) -> None:
        apply_lr(self.optimizer.param_groups, lr)
        self.engine.step()

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def eval(self) -> None:
        self.engine.eval()

    def final_state(self) -> dict[str, torch.Tensor]:
        """bf16: every parameter from DeepSpeed's fp32 master (the bf16 module is that master
        rounded to 8 bits of mantissa: publishing it would throw away the last updates); buffers
        from the module (they have no master). Collective under ZeRO (the master is partitioned)."""
        state = self.model_state()
        if self.dtype == torch.float32:
            return state
        from deepspeed.utils import safe_get_full_fp32_param

        for name, param in self.module.named_parameters():
            master = safe_get_full_fp32_param(param)
            if master is not None and name in state:
                state[name] = master.detach().clone().reshape(state[name].shape)
        return state

    def optimizer_state(self):
        # DeepSpeed's optimizer state mixes tensors with its own objects (LossScaler, enums,
        # fragment mappings) that ``weights_only`` loading refuses; keep the plain entries
        # (momentum buffers, fp32 master partitions, ...) and rebuild the rest on load.
        state = _plain_entries(self.optimizer.state_dict())
        if self.zero_stage == 0:
            return state, None
        return None, state  # ZeRO: every rank holds its own partition

    def load(self, model, common_opt, rank_opt) -> None:
        self.module.load_state_dict(model)
        saved = common_opt if self.zero_stage == 0 else rank_opt
        if saved is not None:
            state = self.optimizer.state_dict()
            state.update(saved)
            accepts = inspect.signature(self.optimizer.load_state_dict).parameters
            if "state_dict_list" in accepts:
                # DeepSpeed's optimizers take one state per data-parallel rank and read their own;
                # the fp32 master copy comes from the checkpoint, not from the (bf16) model
                self.optimizer.load_state_dict([state] * self.ctx.world_size, load_from_fp32_weights=True)
            else:
                self.optimizer.load_state_dict(state)


def _frozen_batchnorm_state(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """fp32 copies of the parameters and buffers of every BatchNorm whose parameters are all
    frozen (``freeze_bn``: the published setting), by module name, taken before DeepSpeed's bf16
    cast rounds them. A BatchNorm that trains keeps DeepSpeed's bf16 (its parameters live in the
    optimizer's flat bf16 groups)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            out[name] = {k: v.detach().clone() for k, v in m.state_dict().items()}
    return out


def _restore_fp32(module: nn.Module, saved: dict[str, dict[str, torch.Tensor]]) -> None:
    """Give the frozen BatchNorms back their fp32 statistics and affine parameters (exact values,
    not the bf16-rounded ones): BN then runs on bf16 inputs with fp32 statistics, as under DDP's
    autocast, and ``model_state()`` / ``model_final.pt`` hold them in fp32."""
    for name, state in saved.items():
        m = module.get_submodule(name)
        m.float()
        m.load_state_dict(state)


def _is_plain(value: Any) -> bool:
    # exact types: DeepSpeed's enums subclass int but weights_only loading refuses them
    if isinstance(value, torch.Tensor) or type(value) in (bool, int, float, str, type(None)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _is_plain(v) for k, v in value.items())
    return False


def _plain_entries(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if _is_plain(v)}


def build_engine(
    model: nn.Module,
    ctx: DistContext,
    engine: EngineConfig,
    train: TrainConfig,
    *,
    micro_steps: int,
    micro_batch: int,
    freeze_bn: bool = True,
) -> ModelEngine:
    """The model wrapped for this rank group as ``engine`` says, with the SGD settings of ``train``."""
    optimizer = build_optimizer(model, train.momentum, train.weight_decay, train.classifier_lr_mult)
    speed = speed_settings(engine, train, ctx.device)
    apply_backend_settings(speed)
    if engine.name == "ddp":
        return DDPEngine(model, ctx, optimizer, micro_steps, freeze_bn, speed=speed)
    if engine.name == "deepspeed":
        return DeepSpeedEngine(
            model, ctx, optimizer, micro_steps, micro_batch, engine.zero_stage, engine.bf16, freeze_bn
        )
    raise ValueError(f"engine.name={engine.name!r}; valid: ddp, deepspeed")
