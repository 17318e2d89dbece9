"""The training step's collectives off the critical path (2-rank efficiency).

Real gloo process groups (``run_distributed``). A step would block three times if each
collective were waited for at once (estimator all-reduce, gradient all-reduce, stop flag); the
estimator all-reduce travels while the segmentation loss is computed, and the stop vote is read
one step later; both must keep their contracts: identical distributions to the synchronous
update, and every rank stopping at the same step boundary.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from method_fixtures import random_batches, run_distributed, shard

from sdca_dist.engine.distributed import DistContext, StopVote
from sdca_dist.method import SemanticDistribution, update_distributions
from sdca_dist.method.distribution import start_update

C, A = 5, 8


def _vote_worker(rank: int, world: int) -> dict:
    ctx = DistContext(rank, world, rank, torch.device("cpu"), "gloo")
    vote = StopVote(ctx)
    agreed_at = None
    for step in range(10):
        if rank == world - 1:
            time.sleep(0.01 * step)  # ranks out of step, as in training
        requested = rank == 1 and step >= 3  # a signal reaches ONE rank after step 3
        if vote.vote(requested):
            agreed_at = step
            break
    vote.close()
    return {"agreed_at": agreed_at}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
def test_stop_vote_every_rank_stops_at_the_same_step_one_step_after_the_request(world: int):
    results = run_distributed(_vote_worker, world)
    assert [r["agreed_at"] for r in results] == [4] * world


def test_stop_vote_single_process_answers_at_once():
    vote = StopVote(DistContext(0, 1, 0, torch.device("cpu"), "gloo"))
    assert vote.vote(False) is False
    assert vote.vote(True) is True


def _update_worker(rank: int, world: int) -> dict:
    batches = random_batches(seed=3, num_batches=4, num_classes=C, dim=A, max_pixels=60, offset=20.0, scale=0.5)
    overlapped, blocking = SemanticDistribution(C, A), SemanticDistribution(C, A)
    unchanged_while_in_flight = True
    for f, l in batches:
        fr, lr = shard((f, l), rank, world)
        before = overlapped.state_dict()
        pending = start_update([(overlapped, fr, lr)])
        busy = torch.randn(200, 200).matmul(torch.randn(200, 200))  # other work meanwhile
        del busy
        after_start = overlapped.state_dict()
        unchanged_while_in_flight &= all(torch.equal(before[k], after_start[k]) for k in before)
        pending.finish()
        pending.finish()  # idempotent
        update_distributions([(blocking, fr, lr)])
    dist.barrier()
    return {
        "overlapped": overlapped.state_dict(),
        "blocking": blocking.state_dict(),
        "unchanged": unchanged_while_in_flight,
    }


@pytest.mark.timeout(120)
def test_estimator_update_in_flight_equals_the_blocking_update_bitwise():
    results = run_distributed(_update_worker, 2)
    for r in results:
        assert r["unchanged"]
        for key in ("count", "mean", "var"):
            assert torch.equal(r["overlapped"][key], r["blocking"][key]), key
            assert torch.equal(r["overlapped"][key], results[0]["overlapped"][key]), key
