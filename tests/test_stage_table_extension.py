"""The stage table is the one list of stages: a stage added to a copy of the table, and nowhere
else, gets everything docs/extending.md promises - a schedule section, a launcher key, a planned
job with its scaled schedule, a train/test scale line, the scale-mismatch check and a summary row
with its paired difference.

The copy is ``sdca_dist/stage_table.py`` with one more ``StageSpec`` in ``TABLE``, loaded in a
fresh interpreter as ``sdca_dist.stage_table`` before anything else imports it; no other module
is touched. A module that kept its own list of stages would miss the new one and fail here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import sdca_dist.stage_table as stage_table

REPO = Path(__file__).resolve().parents[1]

#: a reference stage: sdca trained again under its own schedule section, paired with sdca
NEW_ENTRY = """
    StageSpec(
        "sdca_long",
        f"{_STAGES}.sdca:run",
        shard_sets=("source", "target_train", "target_val"),
        trains_on_labels=("source",),
        inputs=(StageInput("src", MODEL_FINAL), StageInput("dist_init", DISTRIBUTIONS)),
        outputs=(MODEL_FINAL,),
        schedule="sdca_long",
        in_chain=False,
        gates_chain=False,
        batch_keys=("batch_size", "target_batch_size"),
        launch_flag="with_sdca_long",
        paired_with="sdca",
        effect="length effect",
        reads=("sdca_long", *_SDCA_METHOD, "data.source_resize", "data.target_resize", "data.eval_resize"),
    ),
"""

CHECKS = """
import importlib.util, json, runpy, sys
from pathlib import Path

spec_ = importlib.util.spec_from_file_location("sdca_dist.stage_table", sys.argv[1])
table = importlib.util.module_from_spec(spec_)
sys.modules["sdca_dist.stage_table"] = table
spec_.loader.exec_module(table)
out, tmp = {}, Path(sys.argv[2])

from sdca_dist.config import ConfigError, compose_config
from sdca_dist.config.schema import Config, LaunchConfig
from sdca_dist.image_scale import scale_line

out["schedule_section"] = "sdca_long" in Config.__dataclass_fields__
out["launch_flag"] = "with_sdca_long" in LaunchConfig.__dataclass_fields__
cfg = compose_config(["conf=synthetic", "sdca_long.iters=7"])
out["iters"] = int(cfg.sdca_long.iters)
out["scale_line"] = scale_line(cfg, "sdca_long")
try:
    compose_config(["conf=synthetic", "sdca_long.iters=0"])
    out["schedule_check"] = ""
except ConfigError as exc:
    out["schedule_check"] = str(exc)
try:
    compose_config(["conf=synthetic", "data.target_resize=[160,320]"])
    out["mismatch"] = ""
except ConfigError as exc:
    out["mismatch"] = str(exc)

# the summary: two seeds of sdca and of the new stage, as finished stage folders leave them
from sdca_dist.launch.summary import write_summary

runs = []
for seed, (a, b) in enumerate([(30.0, 28.0), (32.0, 31.0)]):
    rd = tmp / f"seed_{seed}"
    for stage, miou in (("sdca", a), ("sdca_long", b)):
        (rd / stage).mkdir(parents=True)
        (rd / stage / "DONE").write_text(json.dumps({"wall_seconds": 1.0}))
        (rd / stage / "metrics.json").write_text(json.dumps({"mIoU": miou, "per_class": {"road": miou}}))
    runs.append((seed, rd))
write_summary(cfg, tmp, runs, ["sdca", "sdca_long"])
out["summary_md"] = (tmp / "summary.md").read_text()
out["summary"] = json.loads((tmp / "summary.json").read_text())
print("CHECKS " + json.dumps(out))

# the launcher: its key adds the stage to the plan, with the new section's schedule
sys.argv = ["sdca_dist.launch", "conf=synthetic", "with_sdca_long=true", "sdca_long.iters=7", "dry_run=true",
            f"run_dir={tmp / 'run'}", f"data.shards_root={tmp / 'shards'}"]
runpy.run_module("sdca_dist.launch", run_name="__main__")
"""


def test_a_stage_added_to_a_copy_of_the_table_gets_every_derived_piece(tmp_path):
    source = Path(stage_table.__file__).read_text()
    anchor = "\n)\n\nSTAGE_NAMES"
    assert source.count(anchor) == 1, "TABLE's closing parenthesis moved: update this test's anchor"
    copy = tmp_path / "stage_table.py"
    copy.write_text(source.replace(anchor, "\n" + textwrap.indent(NEW_ENTRY.strip("\n"), "") + "\n)\n\nSTAGE_NAMES"))
    script = tmp_path / "checks.py"
    script.write_text(CHECKS)
    proc = subprocess.run(
        [sys.executable, str(script), str(copy), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode in (0, None) or "SystemExit" in proc.stderr, proc.stderr[-3000:]
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("CHECKS ")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(line[len("CHECKS ") :])

    assert out["schedule_section"] and out["launch_flag"]
    assert out["iters"] == 7
    assert "sdca_long.iters" in out["schedule_check"]  # the schedule checks cover the new section
    # the scale line: the source and the target side, both from the settings the stage reads
    assert "source" in out["scale_line"] and "target 1.00x" in out["scale_line"], out["scale_line"]
    assert "sdca_long" in out["mismatch"] and "data.target_resize=[160, 320]" in out["mismatch"]
    # the summary: a row for the stage and its paired difference, sdca minus it, seed by seed
    assert "| sdca_long | 29.50 ± 2.12 |" in out["summary_md"], out["summary_md"]
    assert "Length effect (sdca - sdca_long, paired by seed): +1.50" in out["summary_md"], out["summary_md"]
    # the launcher: the key plans the stage, with the new section's schedule (iters 7 before scaling)
    planned = [ln for ln in proc.stdout.splitlines() if ln.startswith("[dry-run] sdca_long:")]
    assert planned, proc.stdout[-3000:] + proc.stderr[-2000:]
    row = json.loads(planned[0].split(":", 1)[1])
    assert row.get("iters") == 7, row
