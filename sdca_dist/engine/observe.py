"""What a stage shows: rank-0 progress with ETA, TensorBoard scalars/images, memory high-water.

Only rank 0 prints and writes TensorBoard events (the other ranks get a silent observer), so the
training code calls the same methods everywhere without rank checks.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch

from sdca_dist.classes import colorize
from sdca_dist.files import atomic_write_text
from sdca_dist.run_folder import PROGRESS, TENSORBOARD

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def memory_high_water_mb() -> float:
    """Peak resident memory of this process (and peak CUDA allocation when on a GPU), in MiB."""
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = rss_kb / 1024.0
    if torch.cuda.is_available():
        peak = max(peak, torch.cuda.max_memory_allocated() / 2**20)
    return peak


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def denormalize(image: torch.Tensor) -> np.ndarray:
    """[3,H,W] normalised float -> HxWx3 uint8."""
    arr = image.detach().float().cpu().numpy().transpose(1, 2, 0)
    arr = arr * IMAGENET_STD + IMAGENET_MEAN
    return (np.clip(arr, 0, 1) * 255).astype(np.uint8)


class StageObserver:
    """Progress, TensorBoard and memory reporting of one stage on one rank."""

    def __init__(
        self,
        stage: str,
        folder: Path,
        is_main: bool,
        total_iters: int = 0,
        start_iter: int = 0,
        num_classes: int = 19,
        palette=None,
        stream=None,
    ) -> None:
        self.stage = stage
        self.is_main = is_main
        self.total = total_iters
        self.start_iter = start_iter
        self.num_classes = num_classes
        self.palette = palette  # a classes file's colours (None: the built-in table's)
        self.stream = stream or sys.stdout
        self._t0 = time.time()
        self._tb = None
        self.progress_file = Path(folder) / PROGRESS
        if is_main:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(folder) / TENSORBOARD))

    def log(self, message: str) -> None:
        if self.is_main:
            print(f"[{self.stage}] {message}", file=self.stream, flush=True)

    def restart_clock(self, start_iter: int) -> None:
        self.start_iter = start_iter
        self._t0 = time.time()

    def progress(self, iteration: int, scalars: Mapping[str, float]) -> None:
        """One progress line: iteration/total, ETA from the rate since (re)start, chosen scalars."""
        if not self.is_main:
            return
        done = iteration - self.start_iter
        elapsed = time.time() - self._t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - iteration) / rate if rate > 0 else float("nan")
        parts = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
        eta_s = format_duration(eta) if eta == eta else "?"
        self.log(
            f"it {iteration}/{self.total} ({100.0 * iteration / max(self.total, 1):.0f}%) "
            f"{rate:.2f} it/s eta {eta_s} mem {memory_high_water_mb():.0f}MiB {parts}"
        )
        record = {"iteration": iteration, "total": self.total, "it_per_s": rate, "time": time.time()}
        record["eta_s"] = eta if eta == eta else None
        if "images_per_s" in scalars:
            record["images_per_s"] = float(scalars["images_per_s"])
        try:
            atomic_write_text(self.progress_file, json.dumps(record) + "\n")
        except OSError:
            pass  # a progress record is a convenience; never fail a stage for it

    def scalars(self, iteration: int, values: Mapping[str, float], prefix: str = "") -> None:
        if self._tb is None:
            return
        for k, v in values.items():
            self._tb.add_scalar(f"{prefix}{k}", float(v), iteration)

    def images(
        self,
        iteration: int,
        tag: str,
        image: Optional[torch.Tensor] = None,
        label: Optional[torch.Tensor] = None,
        pred: Optional[torch.Tensor] = None,
        pseudo: Optional[torch.Tensor] = None,
    ) -> None:
        """Input, ground truth, prediction and pseudo-label mask in the Cityscapes palette."""
        if self._tb is None:
            return
        if image is not None:
            self._tb.add_image(f"{tag}/input", denormalize(image), iteration, dataformats="HWC")
        for name, lab in (("label", label), ("prediction", pred), ("pseudo_label", pseudo)):
            if lab is not None:
                arr = lab.detach().cpu().numpy().astype(np.int64)
                self._tb.add_image(
                    f"{tag}/{name}", colorize(arr, self.num_classes, self.palette), iteration, dataformats="HWC"
                )

    def text(self, tag: str, text: str, iteration: int = 0) -> None:
        if self._tb is not None:
            self._tb.add_text(tag, text.replace("\n", "  \n"), iteration)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
