"""Which shard sets carry labels, and the one line that says what a run trains on and scores on.

A shard set packed from an unlabelled split (Dark Zurich's train images, a ``folder`` split
without ``labels/<split>``) records ``"labelled": false`` in its manifest's ``info``; its label
pixels are all ignore. sdca, pseudo_label and ssl never read target labels for training, so
such a set is a complete target; the oracle (trained on target labels) and the evaluation
(scored on them) refuse it in one line. No torch here: the launcher uses it to plan.
"""

from __future__ import annotations

import json
from pathlib import Path


def manifest_info(manifest: Path) -> dict:
    """A manifest's ``info`` (layout, split, options, ``labelled``); empty when it cannot be read."""
    try:
        data = json.loads(Path(manifest).read_text())
    except (OSError, ValueError):
        return {}
    info = data.get("info") if isinstance(data, dict) else None
    return info if isinstance(info, dict) else {}


def is_labelled(manifest: Path) -> bool:
    """False for a shard set packed from an unlabelled split (its label pixels are all ignore)."""
    return manifest_info(manifest).get("labelled", True) is not False


def unlabelled_reason(manifest: Path, key: str, why: str) -> str | None:
    """The one-line refusal for a stage that needs labels from ``manifest``, or None when it has them."""
    if is_labelled(manifest):
        return None
    return (
        f"{key}: {Path(manifest).parent} was packed from an unlabelled split and {why}; "
        "name a labelled shard set (docs/datasets.md, 'Targets without labels')"
    )


def data_line(cfg, manifest_of) -> str:
    """``source S -> target T (unlabelled); scored on V (labelled)``: what the launch trains on and
    which split every stage's mIoU is computed on. ``manifest_of(name)`` gives a set's manifest path."""

    def state(name: str) -> str:
        path = Path(manifest_of(name))
        if not path.is_file():
            return "not packed yet"
        return "labelled" if is_labelled(path) else "unlabelled"

    d = cfg.data
    classes = f"classes from {d.classes}" if d.get("classes") else f"{int(d.num_classes)} classes"
    return (
        f"data: source {d.source} -> target {d.target_train} ({state(d.target_train)}); "
        f"scored on {d.target_val} ({state(d.target_val)}); {classes}"
    )


def label_problems(cfg, stages: list[str], manifest_of) -> list[str]:
    """Planned stages that need labels a shard set lacks: a stage that trains on a set's labels
    (``StageSpec.trains_on_labels``: the source for src and sdca, target train for the oracle) and
    every scoring (a stage's evaluation at its end, the eval stage) on target val."""
    from sdca_dist.stage_table import spec

    problems, seen = [], set()
    for stage in stages:
        s = spec(stage)
        for key in s.trains_on_labels:
            if key in seen:
                continue
            seen.add(key)
            off = f" (leave {s.launch_flag} off)" if s.launch_flag else ""
            reason = unlabelled_reason(
                Path(manifest_of(cfg.data[key])), f"data.{key}={cfg.data[key]}", f"{stage} trains on its labels{off}"
            )
            problems += [reason] if reason else []
    if "eval" in stages or cfg.train.eval_at_end:
        reason = unlabelled_reason(
            Path(manifest_of(cfg.data.target_val)),
            f"data.target_val={cfg.data.target_val}",
            "every stage is scored on it",
        )
        problems += [reason] if reason else []
    return problems
