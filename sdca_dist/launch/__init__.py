"""Run the SDCA chain: ``python -m sdca_dist.launch conf=NAME nodes=N [settings...] [launcher keys...]``
(``python launch/slurm.py ...`` is the same command).

On a SLURM cluster (``cluster=slurm``, the default of the real-dataset presets) it submits, with
submitit, one job per stage (src -> dist_init -> sdca -> pseudo_label -> ssl), chained with
``afterok`` dependencies, each with the shape the stage's plan gives it (``sdca_dist.rank_scaling``:
inference stages take all ``nodes x cluster.tasks_per_node`` ranks, training stages as many as
their global batch splits over, or all of them with ``train.scale``). With ``cluster=local`` it
runs the same chain on this machine, stage after stage, under torchrun.

* the run configuration is frozen in ``<run_dir>/config.yaml`` at the first launch; a relaunch
  with other settings is refused, naming each key (``sdca_dist.config.run_config``);
* a stage whose DONE still matches its settings and inputs is skipped (``sdca_dist.lineage``);
  ``redo=[sdca]`` reruns it and every stage after it; ``stages=[sdca,ssl]`` runs a subset;
* ``seeds=K`` runs the chain once per seed (a job array per stage) and writes
  ``<run_dir>/summary.json`` and ``summary.md`` (mean +- std per stage);
* ``with_oracle=true`` adds the oracle (target-label) reference, ``with_ablation=true`` the sdca
  stage without its contrastive terms and the paired difference (each reference stage's
  ``launch_flag`` in ``sdca_dist.stage_table``);
* ``dry_run=true`` prints each stage's plan and sbatch parameters, submits and writes nothing; it
  plans before the data exists, listing each missing shard set (with the command that packs it)
  and weights file as what the run will need;
* ``wait=true`` waits and exits 0 only when every stage completed.

Every plan that cannot run is refused before anything is written or queued (exit 2, one line).

Preemption: each job (``sdca_dist.jobs.StageJob``) is checkpointable the safe way. The engine
turns SIGUSR2/SIGTERM into an all-rank checkpoint at a step boundary and raises ``Preempted``;
only then does rank 0 hand the signal to submitit, whose ``checkpoint()`` requeues a fresh
instance that resumes from it. No collective ever runs inside a signal handler.

Modules: ``plan`` (seeds, run configurations, stage plan, shape checks, preflight, stages to
run), ``backends`` (where the jobs run: one module per ``cluster.name``), ``summary``
(summary.json / summary.md), ``grid`` (sweeps and their launch), ``grid_summary`` (a grid's
summary), ``seed_stats`` (mean, std and t intervals over seeds, for both summaries), ``status``
(the status view), ``cli`` (the command line). Nothing here imports torch.
"""
