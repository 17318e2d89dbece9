"""The reference's class-balanced sampler (BIT-DA/SDCA core/datasets/gtav.py) and the sample order.

The expected frequencies come from a plain, independent transcription of the published rule
(``_rule``), not from the sampler under test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from sdca_dist.data.sampling import SUB_EPOCH, ClassBalancedSampler, epoch_order
from sdca_dist.data.shard_set import Manifest

K = 4


def _presence() -> list[list[int]]:
    """200 images: class 0 everywhere, 1 in 60%, 2 in 20% (always with 1), 3 in 4 images (2%)."""
    pres = []
    for i in range(200):
        c = [0] + ([1] if i < 120 else []) + ([2] if i < 40 else []) + ([3] if i in (50, 100, 150, 199) else [])
        pres.append(c)
    return pres


def _rule(pres, draws: int, count_every_present_class: bool, seed: int) -> np.ndarray:
    """The rule as published: weights 1/log(1.01 + f), f over the counts since the last reset
    (every 3,000 draws), per-class lists walked and reshuffled when exhausted."""
    rng = np.random.default_rng(seed)
    lists = [[i for i, p in enumerate(pres) if k in p] for k in range(K)]
    pos, counts, out = [0] * K, np.zeros(K), []
    for d in range(draws):
        if d % 3000 == 0:
            counts[:] = 0
        f = counts / counts.sum() if counts.sum() else counts
        w = 1 / np.log(1.01 + f)
        k = rng.choice(K, p=w / w.sum())
        if pos[k] == len(lists[k]):
            rng.shuffle(lists[k])
            pos[k] = 0
        img = lists[k][pos[k]]
        pos[k] += 1
        out.append(img)
        if count_every_present_class:
            counts[pres[img]] += 1
        else:  # a common misreading: only the drawn class is counted
            counts[k] += 1
    return np.asarray(out)


def _share(pres, draws: np.ndarray) -> np.ndarray:
    """Per class: the share of draws whose image contains it."""
    p = np.zeros((len(pres), K))
    for i, c in enumerate(pres):
        p[i, c] = 1
    return p[draws].mean(axis=0)


def test_frequencies_follow_the_reference_rule_not_the_drawn_class_rule():
    pres, n = _presence(), 15_000
    ours = _share(pres, ClassBalancedSampler(pres, K, seed=1).draws(0, n))
    official = _share(pres, _rule(pres, n, True, seed=2))
    drawn_only = _share(pres, _rule(pres, n, False, seed=2))
    assert np.abs(ours - official).max() < 0.015, (ours, official)
    # counting every present class makes the rare class 3 far more frequent (~36% vs ~26%)
    assert ours[3] - drawn_only[3] > 0.07, (ours, drawn_only)


def test_counts_reset_every_3000_draws(monkeypatch):
    seen = []
    orig = ClassBalancedSampler.weights

    def spy(counts, available):
        seen.append(int(counts.sum()))
        return orig(counts, available)

    monkeypatch.setattr(ClassBalancedSampler, "weights", staticmethod(spy))
    pres = _presence()
    ClassBalancedSampler(pres, K, seed=0).draws(0, 2 * SUB_EPOCH + 5)
    zero = [d for d, total in enumerate(seen) if total == 0]
    assert SUB_EPOCH == 3000 and zero == [0, SUB_EPOCH, 2 * SUB_EPOCH]
    # between resets every present class of every drawn image counts (>= 1 per draw: class 0)
    assert seen[SUB_EPOCH - 1] >= SUB_EPOCH - 1


def test_each_class_list_is_walked_without_replacement():
    """Disjoint classes (each image holds one): within a class, no image is drawn twice more than another."""
    pres = [[i % 3] for i in range(30)] + [[3]]  # classes 0-2: 10 images each, class 3: one image
    s = ClassBalancedSampler(pres, K, seed=4)
    for blocks in (1, 2, 3):
        hits = np.bincount(s.draws(0, blocks * SUB_EPOCH), minlength=len(pres))
        for k in range(3):
            mine = hits[[i for i in range(30) if i % 3 == k]]
            assert mine.max() - mine.min() <= 1, (k, mine)  # with replacement: spread of ~+-10


def test_first_walk_is_in_manifest_order():
    pres = [[0] for _ in range(50)]
    s = ClassBalancedSampler(pres, 1, seed=0, block=50)
    first = s.draws(0, 50)
    assert sorted(first) == list(range(50))  # one full cycle per 50 draws, then the next cycle
    assert sorted(s.draws(50, 100)) == list(range(50))


def test_resume_mid_block_and_from_nothing_continue_identically():
    pres = _presence()
    ref = ClassBalancedSampler(pres, K, seed=9)
    want = ref.draws(0, 8000)
    snap = ref.state(4321)
    again = ClassBalancedSampler(pres, K, seed=9)
    again.load_state(snap)
    assert again.walk_at.keys() == {0, 1}  # resumed at block 1 without generating block 0
    assert np.array_equal(again.draws(4321, 8000), want[4321:])
    assert np.array_equal(ClassBalancedSampler(pres, K, seed=9).draws(6000, 8000), want[6000:])
    assert not np.array_equal(ClassBalancedSampler(pres, K, seed=10).draws(0, 100), want[:100])


def _fake_manifest(n: int, presence=None) -> Manifest:
    samples = [{"key": f"k{i}", "shard": 0, "classes": (presence[i] if presence else [0])} for i in range(n)]
    return Manifest(
        path=Path("/nonexistent/manifest.json"),
        num_samples=n,
        num_classes=K,
        shards=[{"name": "x.tar", "index": "x.idx", "count": n}],
        class_pixels=[0] * K,
        samples=samples,
    )


def test_ranks_slice_one_global_sequence():
    """The same global batch on 1, 2 or 4 ranks draws the same images: class-balanced, the same
    images at every step; uniform, the same images in every epoch (each sample exactly once, as
    on one rank; the order within the epoch is each rank's part of one permutation)."""
    from sdca_dist.data.loader import ShardLoader

    m = _fake_manifest(200, _presence())
    for balanced in (True, False):
        one = ShardLoader(m, 8, train=True, class_balanced=balanced, seed=3, device="cpu")
        for world in (2, 4):
            ranks = [
                ShardLoader(
                    m, 8 // world, rank=r, world_size=world, train=True, class_balanced=balanced, seed=3, device="cpu"
                )
                for r in range(world)
            ]
            for g in (0, 1, 37):
                got = np.concatenate([ld.batch_indices(g)[0] for ld in ranks])
                if balanced:
                    assert np.array_equal(got, one.batch_indices(g)[0])
                else:
                    assert len(set(got)) == len(got)
            if not balanced:  # each rank its contiguous part of the epoch permutation
                steps = one.steps_per_epoch
                assert all(ld.steps_per_epoch == steps for ld in ranks)
                for epoch in (0, 1):
                    gs = range(epoch * steps, (epoch + 1) * steps)
                    alone = np.concatenate([one.batch_indices(g)[0][one.batch_indices(g)[1]] for g in gs])
                    spread = np.concatenate(
                        [ld.batch_indices(g)[0][ld.batch_indices(g)[1]] for ld in ranks for g in gs]
                    )
                    assert sorted(alone) == list(range(200)), (world, epoch)
                    assert sorted(spread) == sorted(alone), (world, epoch)


def test_uniform_training_order_is_a_full_shuffle():
    """One rank, 3,000 samples: any sample can come first (a 1,024-sample shuffle buffer
    could only start with one of the first 1,024 on disk)."""
    from sdca_dist.data.loader import ShardLoader

    n = 3000
    loader = ShardLoader(_fake_manifest(n), 8, train=True, seed=1, device="cpu")
    firsts = np.concatenate([loader.batch_indices(e * loader.steps_per_epoch)[0] for e in range(40)])
    assert (firsts >= 1024).mean() > 0.5  # ~2/3 expected
    for e in range(3):
        assert sorted(epoch_order(n, 1, e)) == list(range(n))
    assert not np.array_equal(epoch_order(n, 1, 0), epoch_order(n, 1, 1))


def test_cli_prints_keys(shard_sets, tmp_path):
    m = shard_sets["gta5"]
    cmd = [sys.executable, "-m", "sdca_dist.data.sampling", str(m), "--draws", "25", "--seed", "3"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
    assert len(out) == 25
    from sdca_dist.data.shard_set import load_manifest

    man = load_manifest(m)
    keys = [s["key"] for s in man.samples]
    assert set(out) <= set(keys)
    want = ClassBalancedSampler(man.presence(), man.num_classes, 3).draws(0, 25)
    assert out == [keys[i] for i in want]
    again = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
    assert again == out
    bad = subprocess.run(
        [sys.executable, "-m", "sdca_dist.data.sampling", str(tmp_path / "nope"), "--draws", "3"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "nope" in bad.stderr


def test_cli_streams_long_draws_in_chunks(shard_sets, capsys):
    """More draws than one output chunk (300,000): the per-class shares summed chunk by chunk are
    those of the whole sequence drawn at once, and the keys come out in draw order."""
    from sdca_dist.data.sampling import main
    from sdca_dist.data.shard_set import load_manifest

    man = load_manifest(shard_sets["gta5"])
    n = 100 * SUB_EPOCH + 7
    assert main([str(shard_sets["gta5"]), "--draws", str(n), "--seed", "2", "--summary"]) == 0
    shares = [float(line.split("\t")[1]) for line in capsys.readouterr().out.splitlines()]
    whole = ClassBalancedSampler(man.presence(), man.num_classes, 2)
    idx = whole.draws(0, n)
    assert shares == [round(float(x), 4) for x in whole.present[idx].mean(axis=0)]
    assert main([str(shard_sets["gta5"]), "--draws", str(n), "--seed", "2"]) == 0
    keys = capsys.readouterr().out.split()
    assert keys == [man.samples[int(i)]["key"] for i in idx]


def test_class_with_one_image():
    """The reference divides by (len - 1) when a one-image class wraps; here it simply repeats."""
    pres = [[0, 1]] * 5 + [[0, 2]]
    draws = ClassBalancedSampler(pres, 3, seed=0).draws(0, 500)
    assert (draws == 5).sum() > 50
