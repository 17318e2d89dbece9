"""Checkpoints: atomic, newest-2 kept, weights_only loading, corrupt newest falls back."""

import random

import numpy as np
import pytest
import torch

from sdca_dist.engine.checkpoint import Checkpointer, rng_state, set_rng_state
from sdca_dist.engine.distributed import DistContext

CTX = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")


def _save(ck, it):
    ck.save(it, {"iteration": it, "model": {"w": torch.full((3,), float(it))}}, {"rng": rng_state()})


def test_keeps_newest_two_and_loads_weights_only(tmp_path):
    ck = Checkpointer(tmp_path, CTX, keep=2, log=lambda m: None)
    for it in (10, 20, 30):
        _save(ck, it)
    names = [p.name for p in ck.complete_checkpoints()]
    assert names == ["iter_00000020", "iter_00000030"]
    assert not list(tmp_path.glob("*.tmp"))
    common, mine = ck.load(ck.latest_valid())
    assert common["iteration"] == 30 and torch.equal(common["model"]["w"], torch.full((3,), 30.0))


@pytest.mark.parametrize("damage", ["truncate", "flip", "remove_marker"])
def test_corrupt_newest_is_reported_and_previous_used(tmp_path, damage):
    seen = []
    ck = Checkpointer(tmp_path, CTX, keep=2, log=seen.append)
    _save(ck, 1)
    _save(ck, 2)
    newest = tmp_path / "iter_00000002"
    f = newest / "common.pt"
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        f.write_bytes(data[:-10] + bytes(b ^ 0xFF for b in data[-10:]))
    else:
        (newest / "COMPLETE.json").unlink()
    chosen = ck.latest_valid()
    assert chosen.name == "iter_00000001"
    if damage != "remove_marker":  # without its marker it is simply not a checkpoint
        assert seen and "iter_00000002" in seen[0] and ("truncated" in seen[0] or "sha256" in seen[0])


def test_rng_state_round_trip_restores_every_library():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_rng_state_restores_when_the_checkpoint_is_loaded_onto_a_device(tmp_path):
    """Resume loads checkpoints with ``map_location=ctx.device`` (cuda:N on a GPU node). The meta
    device stands in for CUDA here: its tensors, like CUDA's, cannot be read by numpy or
    ``torch.set_rng_state``. The rank file's RNG state must still restore; the optimizer shard goes
    to the device asked for."""
    ck = Checkpointer(tmp_path, CTX, keep=2, log=lambda m: None)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ck.save(5, {"iteration": 5}, {"rng": rng_state(), "optimizer": {"m": torch.ones(2)}})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    common, mine = ck.load(ck.latest_valid(), map_location=torch.device("meta"))
    set_rng_state(mine["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert mine["optimizer"]["m"].device.type == "meta"
