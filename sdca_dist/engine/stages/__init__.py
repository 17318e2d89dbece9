"""One function per stage, all with the same face: ``run(sc: StageContext) -> dict``.

Each reads its inputs from earlier stages' folders (checked first, see ``run_dir``), writes its
outputs under ``<run_dir>/<stage>/`` and returns a summary; the caller writes DONE. Which
function runs which stage is the stage table's ``StageSpec.run`` (``sdca_dist.stage_table``).
"""
