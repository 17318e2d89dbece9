"""The stage engine: runs one stage of the method on one group of ranks.

It knows torch.distributed (one home: ``distributed``), model wrapping (``model_engine``),
checkpoints (``checkpoint``), preemption signals (``preemption``) and logging, never SLURM.
"""
