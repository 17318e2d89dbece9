"""``python -m sdca_dist.predict conf=NAME model=WEIGHTS.pt input=DIR|SHARD_SET out=DIR [options] [key=value ...]``

Predictions in the Cityscapes benchmark's format for every image of a folder (recursively: .png,
.jpg, .jpeg) or of a shard set (a folder holding ``manifest.json``):

  OUT/labelIds/<sub>/<stem>_labelIds.png   Cityscapes label ids (what the official evaluator reads)
  OUT/color/<sub>/<stem>_color.png         the Cityscapes palette

With ``data.classes=FILE`` (docs/datasets.md) labelIds holds each class's first label value of that
file (the user's own encoding) and color its colours.

``<stem>`` is the file name without ``_leftImg8bit.png`` (other images: without the extension);
``<sub>`` is the image's folder relative to DIR (empty for shard sets). The two kinds go to two
trees because the official ``evalPixelLevelSemanticLabeling`` globs ``<city>_<seq>_<frame>*.png``
recursively and refuses two matches: ``CITYSCAPES_RESULTS=OUT/labelIds`` works as is.

Preprocessing is the evaluation's (sdca_dist.engine.evaluation): decode, resize to
``data.eval_resize`` (bicubic, antialiased, DALI), ImageNet normalisation; logits are upsampled
bilinearly (align_corners=True) to the image's own resolution before the argmax. So the mIoU of
these files under the official evaluator equals the project's evaluation (tests/test_predict.py).

Options (not config keys): ``model=`` weights-only state_dict (a stage's model_final.pt or the
output of ``python -m sdca_dist.models.convert``) for ``model.name`` / ``data.num_classes`` of the
config; ``flip=true`` and ``scales=[0.75,1.0,1.25]`` average softmax probabilities over flips and
scales of eval_resize (test-time augmentation; off = the paper's protocol); ``batch=N`` images per
forward pass per rank (default train.eval_batch_size). Everything else is a config override
(``model=small`` still picks the model group: a ``model=`` value containing "/" or ending in .pt
is the weights file).

Under torchrun each rank predicts the inputs ``i % world_size == rank`` (each image once). Files
are written atomically (temp name + rename). When any rank fails (an unreadable image, no space
or a read-only ``out``), every rank removes the predictions it wrote in this command: ``out``
never holds a partial set that looks complete. Exit codes: 0 done, 2 bad argument, unreadable
image or weights, an ``out`` that cannot be written (one line naming it), 1 anything else.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CITYSCAPES_SUFFIX = "_leftImg8bit"
OWN_KEYS = ("input", "out", "flip", "scales", "batch")


class PredictError(ValueError):
    """A problem the user can fix (argument, unreadable image, weights); one line naming it."""


# --------------------------------------------------------------------------- arguments
@dataclass(frozen=True)
class PredictArgs:
    weights: Path
    input: Path
    out: Path
    flip: bool
    scales: tuple[float, ...]
    batch: Optional[int]
    overrides: list[str]


def _is_weights_path(value: str) -> bool:
    return "/" in value or value.endswith(".pt") or value.endswith(".pth")


def _parse_bool(key: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    raise PredictError(f"{key}={value!r} is not a boolean (true/false)")


def _parse_scales(value: str) -> tuple[float, ...]:
    text = value.strip().strip("[]")
    try:
        scales = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise PredictError(f"scales={value!r} is not a list of numbers, e.g. scales=[0.75,1.0,1.25]") from None
    if not scales or min(scales) <= 0:
        raise PredictError(f"scales={value!r} must be a non-empty list of positive numbers")
    return scales


def parse_args(argv: Sequence[str]) -> PredictArgs:
    """Split predict's own keys from config overrides (which go to ``compose_config`` untouched)."""
    own: dict[str, str] = {}
    weights: Optional[str] = None
    overrides: list[str] = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq:
            raise PredictError(f"argument {arg!r} is not of the form key=value")
        if key == "model" and _is_weights_path(value):
            weights = value
        elif key in OWN_KEYS:
            own[key] = value
        else:
            overrides.append(arg)
    for key, value in (("model", weights), ("input", own.get("input")), ("out", own.get("out"))):
        if not value:
            raise PredictError(
                f"missing {key}=... (usage: python -m sdca_dist.predict conf=NAME model=WEIGHTS.pt "
                f"input=DIR|SHARD_SET out=DIR)"
            )
    batch = None
    if "batch" in own:
        try:
            batch = int(own["batch"])
        except ValueError:
            batch = 0
        if batch < 1:
            raise PredictError(f"batch={own['batch']!r} must be an integer >= 1")
    return PredictArgs(
        weights=Path(weights),
        input=Path(own["input"]),
        out=Path(own["out"]),
        flip=_parse_bool("flip", own.get("flip", "false")),
        scales=_parse_scales(own["scales"]) if "scales" in own else (1.0,),
        batch=batch,
        overrides=overrides,
    )


# --------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class InputImage:
    """One image to predict: where it comes from, where its outputs go, how to get its bytes."""

    source: str  # file path, or "shard:key" (named in errors)
    stem: str
    sub: str  # relative output folder ("" = top level)
    read: Callable[[], bytes]


def stem_of(name: str) -> str:
    """``x_leftImg8bit.png`` -> ``x``; any other image: its name without the extension."""
    base = Path(name).name
    for suffix in IMAGE_SUFFIXES:
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base[: -len(CITYSCAPES_SUFFIX)] if base.endswith(CITYSCAPES_SUFFIX) else base


def _read_file(path: Path) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise PredictError(f"cannot read image {path}: {exc.strerror or exc}") from None

    return read


def list_inputs(input_path: Path, rank: int = 0, world_size: int = 1) -> tuple[int, Iterator[InputImage]]:
    """(total number of images, this rank's images ``i % world_size == rank`` in a fixed order).

    A folder with ``manifest.json`` is a shard set (read with the ``webdataset`` library through
    ``sdca_dist.data.webdataset_reader``); any other folder is searched recursively for images.
    Two inputs with the same output name are refused up front (one would overwrite the other).
    """
    if (input_path / "manifest.json").is_file():
        from sdca_dist.data.shard_set import load_manifest
        from sdca_dist.data.webdataset_reader import iter_samples

        manifest = load_manifest(input_path / "manifest.json")
        stems = [_shard_stem(s) for s in manifest.samples]
        _refuse_duplicates([("", s) for s in stems], [f"{input_path}:{s['key']}" for s in manifest.samples])

        def shard_items() -> Iterator[InputImage]:
            for sample in iter_samples(manifest, rank, world_size):
                data = sample.image
                yield InputImage(
                    f"{input_path / sample.shard}:{sample.key}", stems[sample.index], "", lambda data=data: data
                )

        return manifest.num_samples, shard_items()
    if not input_path.is_dir():
        raise PredictError(f"input={input_path} is not a folder (a folder of images or a shard set with manifest.json)")
    files = sorted(p for p in input_path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise PredictError(f"input={input_path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    names = [(p.parent.relative_to(input_path).as_posix().strip("."), stem_of(p.name)) for p in files]
    _refuse_duplicates(names, [str(p) for p in files])
    mine = [
        InputImage(str(p), stem, sub, _read_file(p))
        for i, (p, (sub, stem)) in enumerate(zip(files, names))
        if i % world_size == rank
    ]
    return len(files), iter(mine)


def _shard_stem(rec: dict) -> str:
    return stem_of(rec.get("path") or rec["key"]) if "path" in rec else stem_of(rec["key"])


def _refuse_duplicates(names: list[tuple[str, str]], sources: list[str]) -> None:
    seen: dict[tuple[str, str], str] = {}
    for name, src in zip(names, sources):
        if name in seen:
            raise PredictError(f"inputs {seen[name]} and {src} would both write {name[1]}_labelIds.png")
        seen[name] = src


def batches(items: Iterable[InputImage], size: int) -> Iterator[list[InputImage]]:
    batch: list[InputImage] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def image_size(source: str, data: bytes) -> tuple[int, int]:
    """(H, W) from the image header; a file that is not an image is a one-line error."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise PredictError(f"cannot read image {source}: {' '.join(str(exc).split())}") from None
    return h, w


def check_decodable(source: str, data: bytes) -> None:
    """Fully decode with PIL: names the culprit when DALI fails on a batch (truncated data)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as exc:
        raise PredictError(f"cannot read image {source}: {' '.join(str(exc).split())}") from None


# --------------------------------------------------------------------------- preprocessing
class EvalPreprocessor:
    """Encoded images -> normalised [B, 3, h, w] float batches, one per scale of ``eval_resize``.

    The evaluation's own preprocessing (``sdca_dist.data.loader.eval_image``) after the same
    decode (decoders.image RGB, "mixed" on GPU) as the evaluation's loader.
    """

    def __init__(
        self,
        resize: Sequence[int],
        scales: Sequence[float],
        max_batch: int,
        num_threads: int = 2,
        cuda_device: torch.device | None = None,
    ):
        from sdca_dist.data.loader import cuda_available, pipeline_device_id

        self.sizes = [[max(1, round(int(resize[0]) * s)), max(1, round(int(resize[1]) * s))] for s in scales]
        self.gpu = cuda_available()
        #: this rank's GPU (the DistContext's device), never GPU 0 for every rank
        self.device_id = pipeline_device_id("gpu" if self.gpu else "cpu", cuda_device)
        self.max_batch = int(max_batch)
        self.num_threads = int(num_threads)
        self._pipe = self._build()

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        from sdca_dist.data.loader import eval_image

        gpu, sizes = self.gpu, self.sizes

        @pipeline_def(
            batch_size=self.max_batch,
            num_threads=self.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=1,
            exec_async=False,
            exec_pipelined=False,
        )
        def pipeline():
            encoded = fn.external_source(name="encoded", device="cpu", dtype=types.UINT8, ndim=1)
            image = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
            return tuple(eval_image(fn, types, image, size) for size in sizes)

        pipe = pipeline()
        pipe.build()
        return pipe

    def __call__(self, encoded: list[bytes]):
        """The views of a batch; DALI's own stderr lines on a failure are dropped (the caller names
        the file instead), on success they are passed through."""
        from sdca_dist.data.loader import _to_torch

        self._pipe.feed_input("encoded", [np.frombuffer(b, dtype=np.uint8) for b in encoded])
        with _native_stderr() as captured:
            outs = self._pipe.run()
        sys.stderr.write(captured.text())
        return [_to_torch(t) for t in outs]


class _native_stderr:
    """Capture file descriptor 2 (where DALI's C++ code prints) into a temporary file."""

    def __enter__(self):
        import tempfile

        sys.stderr.flush()
        self._file = tempfile.TemporaryFile(mode="w+b")
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)

    def text(self) -> str:
        self._file.seek(0)
        data = self._file.read().decode(errors="replace")
        self._file.close()
        return data


# --------------------------------------------------------------------------- outputs
def label_id_table(num_classes: int) -> np.ndarray:
    """256-entry LUT: the setting's class index -> Cityscapes label id (ignore -> 0, unlabeled)."""
    from sdca_dist.classes import CITYSCAPES_TRAINID_TO_ID, CITYSCAPES_UNLABELED_ID, SYNTHIA16_TO_CS19, lookup_table

    if num_classes == 19:
        mapping = dict(CITYSCAPES_TRAINID_TO_ID)
    elif num_classes == 16:
        mapping = {i: CITYSCAPES_TRAINID_TO_ID[cs] for i, cs in enumerate(SYNTHIA16_TO_CS19)}
    else:
        raise PredictError(f"data.num_classes={num_classes}: no Cityscapes label ids (expected 19 or 16)")
    return lookup_table(mapping, fill=CITYSCAPES_UNLABELED_ID)


def _png_bytes(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_output(path: Path, data: bytes) -> None:
    """One prediction file, atomically (``sdca_dist.files``): complete under its name or absent."""
    from sdca_dist.files import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


class OutputWriteError(PredictError):
    """A prediction file cannot be written (no space, read-only file system); names the path."""


def output_paths(out: Path, item: InputImage) -> tuple[Path, Path]:
    sub = Path(item.sub) if item.sub else Path()
    return (out / "labelIds" / sub / f"{item.stem}_labelIds.png", out / "color" / sub / f"{item.stem}_color.png")


# --------------------------------------------------------------------------- model
class Predictor:
    """A model in eval mode on a device; ``labels(views, sizes)`` gives per-image class maps."""

    def __init__(self, model, device, flip: bool):
        self.model = model.to(device).eval()
        self.device = device
        self.flip = flip

    def labels(self, views, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        import torch
        import torch.nn.functional as F

        tta = self.flip or len(views) > 1
        logits_per_view = []
        with torch.no_grad():
            for view in views:
                x = view.to(self.device)
                logits_per_view.append((self.model(x)[1].float(), False))
                if self.flip:
                    logits_per_view.append((self.model(x.flip(-1))[1].float(), True))
            out = []
            for i, (h, w) in enumerate(sizes):
                total = None
                for logits, flipped in logits_per_view:
                    one = logits[i : i + 1]
                    if flipped:
                        one = one.flip(-1)
                    up = F.interpolate(one, size=(h, w), mode="bilinear", align_corners=True)
                    score = up.softmax(1) if tta else up
                    total = score if total is None else total + score
                out.append(total[0].argmax(0).to(torch.uint8).cpu().numpy())
        return out


def class_value_table(table) -> np.ndarray:
    """256-entry LUT for a classes file's run: class index -> the first label value of the class
    (the user's own label encoding, as labelIds are Cityscapes'); unlabelled -> its first ignore value."""
    from sdca_dist.classes import IGNORE_INDEX, lookup_table

    fill = table.ignore[0] if table.ignore else IGNORE_INDEX
    return lookup_table({i: vs[0] for i, vs in enumerate(table.values)}, fill=fill)


# --------------------------------------------------------------------------- main
def run(args: PredictArgs, cfg, ctx, log=print, written: Optional[list[Path]] = None) -> int:
    """Predict this rank's share of the inputs; returns the number of images written.
    ``written`` collects the path of every file written (to remove them after a failure)."""
    from sdca_dist.classes import colorize, run_classes
    from sdca_dist.engine.observe import format_duration
    from sdca_dist.models.convert import load_converted

    num_classes = int(cfg.data.num_classes)
    table = run_classes(cfg.data)
    ids = label_id_table(num_classes) if not cfg.data.get("classes") else class_value_table(table)
    palette = table.palette()
    model = load_converted(args.weights, str(cfg.model.name), num_classes)
    total, items = list_inputs(args.input, ctx.rank, ctx.world_size)
    mine = len(range(ctx.rank, total, ctx.world_size))
    batch_size = args.batch or int(cfg.train.eval_batch_size)
    pre = EvalPreprocessor(
        list(cfg.data.eval_resize), args.scales, batch_size, int(cfg.data.num_threads), cuda_device=ctx.device
    )
    predictor = Predictor(model, ctx.device, args.flip)
    if ctx.is_main:
        tta = f", flip={args.flip}, scales={list(args.scales)}" if args.flip or args.scales != (1.0,) else ""
        log(
            f"predict: {total} images from {args.input} on {ctx.world_size} rank(s) -> {args.out} "
            f"(model {cfg.model.name}, {num_classes} classes, eval_resize {list(cfg.data.eval_resize)}{tta})"
        )
    t0 = last_report = time.time()
    done = 0
    for batch in batches(items, batch_size):
        encoded = [item.read() for item in batch]
        sizes = [image_size(item.source, data) for item, data in zip(batch, encoded)]
        try:
            views = pre(encoded)
        except Exception:  # DALI's message is opaque: find and name the file
            for item, data in zip(batch, encoded):
                check_decodable(item.source, data)
            raise
        for item, label in zip(batch, predictor.labels(views, sizes)):
            label_path, color_path = output_paths(args.out, item)
            outputs = (
                (label_path, _png_bytes(ids[label])),
                (color_path, _png_bytes(colorize(label, num_classes, palette))),
            )
            for path, data in outputs:
                try:
                    write_output(path, data)
                except OSError as exc:
                    raise OutputWriteError(f"cannot write {path}: {exc.strerror or exc}") from None
                if written is not None:
                    written.append(path)
        done += len(batch)
        now = time.time()
        if ctx.is_main and (now - last_report >= 10 or done == mine):
            rate = done / max(now - t0, 1e-9)
            log(
                f"predict: {done}/{mine} images on rank 0 ({rate:.2f} img/s, "
                f"ETA {format_duration((mine - done) / max(rate, 1e-9))})",
                flush=True,
            )
            last_report = now
    return done


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    from sdca_dist.config import ConfigError, compose_config
    from sdca_dist.data.errors import DataError
    from sdca_dist.models.convert import ConvertError

    user_errors = (
        PredictError,
        ConfigError,
        DataError,
        ConvertError,
        FileNotFoundError,
        NotADirectoryError,
        PermissionError,
    )
    try:
        args = parse_args(argv)
        cfg = compose_config(args.overrides)
    except user_errors as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    from sdca_dist.engine.distributed import init_distributed, shutdown_distributed

    ctx = init_distributed(str(cfg.engine.backend))
    t0 = time.time()
    error = None
    written = 0
    files: list[Path] = []
    try:
        written = run(args, cfg, ctx, written=files)
    except user_errors as exc:  # this rank stops; the others still meet it in the final count
        error = " ".join(str(exc).split())
    total, failures = _sum_over_ranks([written, int(error is not None)], ctx)
    if failures:  # no partial set under out: every rank removes what it wrote
        for path in files:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass
    if error is not None:
        removed = f" (removed the {len(files)} prediction files written before)" if files else ""
        print(f"error: {error}{removed}", file=sys.stderr)
    if ctx.is_main and not failures:
        print(f"predict: wrote {total} predictions under {args.out} (labelIds/, color/) in {time.time() - t0:.1f} s")
    shutdown_distributed()
    return 2 if failures else 0


def _sum_over_ranks(values: list[int], ctx) -> list[int]:
    import torch

    from sdca_dist.engine.distributed import all_reduce_sum

    t = torch.tensor(values, dtype=torch.int64, device=ctx.device)
    all_reduce_sum(t, ctx)
    return [int(v) for v in t.tolist()]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
